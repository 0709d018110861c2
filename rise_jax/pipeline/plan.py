"""The stage plan of a RISE run: which stages, in which order, which model and data each one reads, and the
`debug.stop_after` hook that interrupts a run at a known point (the resume tests use it).

    iter_0/collect   boost data (only with rise.boost)         iter_0/train   the boost SFT (only with rise.boost)
    iter_0/eval      the starting model (base, or base + boost)
    iter_T/collect   Algorithm 1 with the newest model          iter_T/train   pi_T        iter_T/eval   Algorithm 2
    iter_T/control/train, iter_T/control/eval   (rise.single_turn_control) the same data, history stripped

Which model and data iteration T trains from is the paper's schedule (`rise.algorithm.training_start`,
`training_data`); this module maps it onto stage directories.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rise_jax import config as config_lib
from rise_jax.rise import algorithm


class StopRequested(Exception):
  """Raised by the `debug.stop_after` hook; the run exits with status 3 and resumes on the next invocation."""


@dataclasses.dataclass(frozen=True)
class StopAfter:
  stage: str
  units: int | None  # None: right after the stage's DONE marker

  @classmethod
  def parse(cls, text: str | None) -> "StopAfter | None":
    if not text:
      return None
    stage, sep, n = text.rpartition(":")
    if not sep or not stage:
      raise ValueError(f"config field debug.stop_after: {text!r} is not '<stage>:<n>' or '<stage>:done'")
    if n == "done":
      return cls(stage, None)
    if not n.isdigit():
      raise ValueError(f"config field debug.stop_after: {n!r} in {text!r} is not a count or 'done'")
    return cls(stage, int(n))

  def units_for(self, stage: str) -> int | None:
    """How many units the named stage may do before stopping (None: no limit)."""
    return self.units if self.stage == stage else None


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str                  # its directory, e.g. "iter_1/train"
  kind: str                  # collect | boost_data | train | eval
  iteration: int
  control: bool = False      # the single-turn control chain


def plan(config) -> list[Stage]:
  """Every stage of the run, in order (rise.evaluate="final": no evaluation of intermediate iterations)."""
  r = config.rise
  evaluated = lambda t: r.evaluate == "all" or t in (0, r.iterations)
  stages = []
  if r.boost:
    stages += [Stage("iter_0/collect", "boost_data", 0), Stage("iter_0/train", "train", 0)]
  stages.append(Stage("iter_0/eval", "eval", 0))
  for t in range(1, r.iterations + 1):
    stages += [Stage(f"iter_{t}/collect", "collect", t), Stage(f"iter_{t}/train", "train", t)]
    stages += [Stage(f"iter_{t}/eval", "eval", t)] if evaluated(t) else []
    if r.single_turn_control:
      stages += [Stage(f"iter_{t}/control/train", "train", t, control=True)]
      stages += [Stage(f"iter_{t}/control/eval", "eval", t, control=True)] if evaluated(t) else []
  return stages


def model_stage(config, iteration: int, control: bool = False) -> str | None:
  """The train stage whose exported model is the model of `iteration` (None: the base model)."""
  if iteration == 0:
    return "iter_0/train" if config.rise.boost else None
  return f"iter_{iteration}/control/train" if control else f"iter_{iteration}/train"


def init_stage(config, iteration: int, control: bool = False) -> str | None:
  """The train stage whose model iteration T starts from (rise.init_from); None: the base model."""
  start = algorithm.training_start(config, iteration)
  if start is None:
    return None
  return model_stage(config, start, control and start > 0)


def data_stages(config, iteration: int) -> list[str]:
  """The collect stages whose data trains iteration T (rise.data)."""
  return [f"iter_{t}/collect" for t in algorithm.training_data(config, iteration)]


# -- which config fields each stage's outputs depend on ---------------------------------------------------------
# The one mapping (docs/contracts.md §6). A finished stage records the values of its fields in its DONE marker; a
# later invocation may change any field no finished (or started) stage recorded. Dotted prefixes; a field under no
# prefix of NO_STAGE or KIND_FIELDS is used by every stage (seed, model, tokenizer, mesh, task, rise.boost, and any
# field added later, until it is placed here).

# Where the run lives, debug hooks, how processes find each other, report titles, which stages exist (a stage's
# outputs do not depend on how many iterations follow it or which are evaluated), and checkpoint/log cadence.
NO_STAGE = ("output_dir", "debug", "distributed", "name", "rise.iterations", "rise.evaluate", "train.log_every",
            "train.profile_steps", "train.ckpt_every", "train.keep")
KIND_FIELDS = {
    "boost_data": ("sampling", "collect", "rise.boost_data", "rise.boost_size"),
    "boost_train": ("train", "sampling", "rise.boost_lr", "rise.boost_epochs", "rise.boost_validate_every",
                    "rise.boost_stop_accuracy"),
    "collect": ("sampling", "collect", "rise.iteration_overrides", "rise.fresh_problems",
                "rise.single_turn_control", "rise.mix_single_turn"),
    "train": ("train", "rise.iteration_overrides", "rise.init_from", "rise.data"),
    "eval": ("sampling", "eval", "collect.max_resample_rounds"),
}


def _under(field: str, prefixes) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def field_kind(stage: Stage) -> str:
  """The stage's key in KIND_FIELDS (the boost's training reads the boost fields and validation sampling)."""
  return "boost_train" if stage.kind == "train" and stage.iteration == 0 else stage.kind


def uses(stage: Stage, field: str) -> bool:
  """Whether `field` (dotted) could change `stage`'s own outputs, its inputs aside."""
  if _under(field, NO_STAGE):
    return False
  owners = [kind for kind, prefixes in KIND_FIELDS.items() if _under(field, prefixes)]
  return not owners or field_kind(stage) in owners


def stage_named(name: str) -> Stage:
  """The Stage a stage directory names (`iter_2/control/train`); iter_0/collect is the boost's data."""
  head, *rest = name.split("/")
  iteration, kind = int(head.removeprefix("iter_")), rest[-1]
  if kind == "collect" and iteration == 0:
    kind = "boost_data"
  return Stage(name, kind, iteration, control=rest[0] == "control")


def input_stages(config, stage: Stage) -> list[Stage]:
  """The stages whose outputs `stage` reads: the model it samples or starts from, the data it trains on."""
  t = stage.iteration
  if stage.kind == "collect":
    names = [model_stage(config, t - 1)]
  elif stage.kind == "train":
    names = data_stages(config, t) + [init_stage(config, t, stage.control)]
  elif stage.kind == "eval":
    names = [model_stage(config, t, stage.control)]
  else:
    names = []
  return [stage_named(n) for n in names if n is not None]


def stage_fields(config, stage: Stage) -> dict[str, Any]:
  """{dotted field: value} of every config field that could change `stage`'s outputs, through its inputs too
  (a stage trained on data collected under collect.tau = 0.4 depends on it), as its DONE marker records them."""
  leaves = config_lib.leaves(config_lib.identity(config_lib.to_dict(config)))
  todo, seen, names = [stage], set(), set()
  while todo:
    s = todo.pop()
    if s.name in seen:
      continue
    seen.add(s.name)
    names.update(f for f in leaves if uses(s, f))
    todo += input_stages(config, s)
  return {f: leaves[f] for f in sorted(names)}

