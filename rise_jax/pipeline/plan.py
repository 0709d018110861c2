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
