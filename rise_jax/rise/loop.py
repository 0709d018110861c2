"""The RISE loop as a list of resumable stages over a run directory (contracts.md §6).

`plan(config)` lists the stages; `run(config)` runs each one without a `DONE` marker, in order, and writes the
final summary. Stage bodies live in `rise_jax.rise.stages`; the command line is `rise_jax.run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

from rise_jax import config as config_lib
from rise_jax import rundir
from rise_jax.rundir import ConfigMismatch  # noqa: F401 - raised by RunDir, caught by rise_jax.run

RUN_SCHEMA = "rise_jax.run/1"


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


class RunDir:
  """The run directory: config.json and run.json at the top, one directory per stage with its DONE marker."""

  def __init__(self, root: str | os.PathLike, config):
    self.root = pathlib.Path(root)
    self.config = config
    self.hash = config_lib.config_hash(config)

  def check(self) -> bool:
    """Whether the directory holds results of this config (False: new, or nothing in it yet). Raises
    ConfigMismatch naming the differing fields. Writes nothing, so a refused config leaves no trace."""
    if rundir.check_config(self.root, self.config) is None:
      return False
    run_json = self.root / "run.json"
    if not run_json.is_file():
      raise ConfigMismatch(f"{self.root} holds results but no run.json: it is not a RISE run directory (an "
                           "evaluation's?). Use another output_dir.")
    saved_hash = json.loads(run_json.read_text()).get("config_hash")
    if saved_hash != self.hash:
      raise ConfigMismatch(
          f"{self.root} was made under config hash {saved_hash}, this config's is {self.hash}, though config.json "
          "names no differing field: the directory predates output_dir leaving the hash (docs/contract_changes.md) "
          "or config.json was edited. Finish it with the code that made it, or use another output_dir.")
    return True

  def open(self) -> None:
    """Check the directory (under the run's lock) and initialise it when it is new."""
    if self.check():
      return
    self.root.mkdir(parents=True, exist_ok=True)
    current = config_lib.to_dict(self.config)
    current.pop("debug", None)
    rundir.atomic_write_json(self.root / "run.json", {
        "schema": RUN_SCHEMA, "config_hash": self.hash, "versions": _versions(), "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv})
    # written last: its presence means the directory is initialised
    rundir.atomic_write_json(self.root / rundir.CONFIG_FILE, current)

  def stage_dir(self, stage: str) -> pathlib.Path:
    return self.root / stage

  def done(self, stage: str) -> bool:
    return (self.stage_dir(stage) / "DONE").exists()

  def mark_done(self, stage: str, info: dict[str, Any]) -> None:
    rundir.atomic_write_json(self.stage_dir(stage) / "DONE", {"stage": stage, **info})

  def info(self, stage: str) -> dict[str, Any]:
    return json.loads((self.stage_dir(stage) / "DONE").read_text())


def _versions() -> dict[str, str]:
  from importlib import metadata
  out = {}
  for name in ("rise_jax", "jax", "flax", "optax", "orbax-checkpoint", "transformers"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _git_commit() -> str | None:
  import subprocess
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent, capture_output=True,
                          text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


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
  """The train stage whose model iteration T starts from (rise.init_from)."""
  if iteration == 0:
    return None
  if iteration == 1 or config.rise.init_from == "base":
    return model_stage(config, 0)
  return model_stage(config, iteration - 1, control)


def data_stages(config, iteration: int) -> list[str]:
  """The collect stages whose data trains iteration T (rise.data)."""
  if iteration == 0:
    return ["iter_0/collect"]
  first = 1 if config.rise.data == "accumulated" else iteration
  return [f"iter_{t}/collect" for t in range(first, iteration + 1)]


def run(config, *, log: Callable[[str], None] = print,
        on_open: Callable[[pathlib.Path], Any] | None = None) -> dict[str, Any]:
  """Run (or resume) every stage of `config`; returns the final summary. `on_open(run_dir)` is called once the
  run directory is known to be this config's (the command line starts its log file there)."""
  from rise_jax.rise import loop_report
  from rise_jax.rise import stages as stages_lib

  import jax

  from rise_jax.train.trainer import initialize_distributed
  initialize_distributed(config)  # before anything asks jax for its devices
  config_lib.validate(config, require_training=True, num_devices=jax.device_count())
  stop = StopAfter.parse(config.debug.stop_after)
  run_dir = RunDir(config.output_dir, config)
  ctx = stages_lib.Context(config, run_dir.root)
  ctx.preflight(plan(config))  # every input a later stage reads, checked before the directory is touched
  run_dir.check()
  with rundir.RunLock(run_dir.root):
    run_dir.open()
    if on_open is not None:
      on_open(run_dir.root)
    start = time.perf_counter()
    for stage in plan(config):
      if run_dir.done(stage.name):
        log(f"[rise_jax.run] {stage.name}: done (skipped)")
        continue
      log(f"[rise_jax.run] {stage.name}: running")
      limit = stop.units_for(stage.name) if stop else None
      t0 = time.perf_counter()
      info = stages_lib.run_stage(ctx, stage, run_dir, limit=limit)
      info["seconds"] = time.perf_counter() - t0
      run_dir.mark_done(stage.name, info)
      log(f"[rise_jax.run] {stage.name}: done in {info['seconds']:.1f} s")
      if stop and stop.stage == stage.name and stop.units is None:
        raise StopRequested(f"debug.stop_after={config.debug.stop_after}: stopped after {stage.name}")
    summary = loop_report.write_summary(config, run_dir.root, plan(config))
  summary["wall_s_this_invocation"] = time.perf_counter() - start
  return summary
