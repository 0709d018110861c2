"""The RISE loop: run (or resume) every stage of `pipeline.plan` over a run directory (docs/contracts.md §6).

`run(config)` checks the config and every input first, then runs each stage without a `DONE` marker, in order,
and writes the final summary. Stage bodies live in `pipeline.stages`; the command line is `rise_jax.run`.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

import jax

from rise_jax import config as config_lib
from rise_jax import files
from rise_jax.pipeline import stages as stages_lib
from rise_jax.pipeline import summary as summary_lib
from rise_jax.pipeline.plan import StopAfter, StopRequested, plan
from rise_jax.pipeline.resources import Resources
from rise_jax.pipeline.rundir import RunDir
from rise_jax.train.trainer import initialize_distributed


def run(config, *, log: Callable[[str], None] = print,
        on_open: Callable[[pathlib.Path], Any] | None = None) -> dict[str, Any]:
  """Run (or resume) every stage of `config`; returns the final summary. `on_open(run_dir)` is called once the
  run directory is known to be this config's (the command line starts its log file there)."""

  initialize_distributed(config)  # before anything asks jax for its devices
  config_lib.validate(config, require_training=True, num_devices=jax.device_count())
  config_lib.check_command(config, "run")
  stop = StopAfter.parse(config.debug.stop_after)
  run_dir = RunDir(config.output_dir, config)
  res = Resources(config, run_dir.root)
  res.preflight(plan(config))  # every input a later stage reads, checked before the directory is touched
  run_dir.check()
  with files.RunLock(run_dir.root):
    run_dir.open()
    if on_open is not None:
      on_open(run_dir.root)
    start = time.perf_counter()
    for stage in plan(config):
      if run_dir.done(stage.name):
        missing = stages_lib.missing_output(run_dir.root, stage, config)
        if missing is None:
          log(f"[rise_jax.run] {stage.name}: done (skipped)")
          continue
        # The stage resumes from what it kept (logs, checkpoints), so recomputing the lost file is cheap.
        log(f"[rise_jax.run] {stage.name}: marked done but {missing} is missing; recomputing the stage")
        run_dir.clear_done(stage.name)
      log(f"[rise_jax.run] {stage.name}: running")
      limit = stop.units_for(stage.name) if stop else None
      t0 = time.perf_counter()
      info = stages_lib.run_stage(res, stage, run_dir, limit=limit)
      info["seconds"] = time.perf_counter() - t0
      run_dir.mark_done(stage.name, info)
      log(f"[rise_jax.run] {stage.name}: done in {info['seconds']:.1f} s")
      if stop and stop.stage == stage.name and stop.units is None:
        raise StopRequested(f"debug.stop_after={config.debug.stop_after}: stopped after {stage.name}")
    summary = summary_lib.write_run_summary(config, run_dir.root, plan(config))
  summary["wall_s_this_invocation"] = time.perf_counter() - start
  return summary
