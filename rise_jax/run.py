"""`python -m rise_jax.run --config=configs/<experiment>.py`: RISE end to end, resumably (a thin command line
over `rise_jax.pipeline.loop`).

The run is a fixed list of stages (`plan`), each writing into its own directory of the run directory
(docs/contracts.md §6) and finished by an atomic `DONE` marker written last:

    iter_0/collect   boost data (only with rise.boost): given SFT records, the task's reference solutions, or
                     correct samples of the improvement policy
    iter_0/train     the boost SFT (only with rise.boost)
    iter_0/eval      the starting model (base, or base + boost)
    iter_T/collect   Algorithm 1 with the newest model -> rollouts.jsonl, data/ (D_T), control/data/
    iter_T/train     reward-weighted training from the base or from iteration T-1, on D_T or D_1..D_T
    iter_T/eval      Algorithm 2: sequential (eval.turns, eval.draws) and parallel (k samples), optional Self-Refine:
                     the one evaluation stage `rise_jax.evaluate` runs too (`rise_jax.pipeline.evaluation`)
    iter_T/control/train, iter_T/control/eval   (rise.single_turn_control) the same data, history stripped

Re-running the same command skips every stage with a `DONE` marker and resumes the first one without it (the
runner resumes from its rollout log, the trainer from its last checkpoint). A changed config field that a
finished (or started) stage used is refused, naming the field and the stage; other changes go on, logged.
`--config.debug.stop_after=<stage>:<n>` stops the run after n units of a stage (episodes for collect/eval,
optimiser steps for train) or, with `<stage>:done`, right after the stage's marker: the resume tests use it to
interrupt a run at a known point.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the printed wall time includes imports and compilation

import pathlib  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rise_jax import compile_cache, logs  # noqa: E402
from rise_jax.pipeline.loop import run  # noqa: E402
from rise_jax.pipeline.plan import StopRequested  # noqa: E402
from rise_jax.files import cli_errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py).",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  logs.setup()
  compile_cache.enable()
  try:
    with cli_errors("rise_jax.run", config.output_dir):  # refused directory: exit 2; disk full: exit 4
      summary = run(config, log=logs.announce, on_open=logs.to_file)
  except StopRequested as e:
    logs.announce(f"[rise_jax.run] {e}; re-run the same command to resume")
    logs.announce(f"wall time: {time.perf_counter() - _START:.1f} s")
    sys.exit(3)
  print(summary["table_md"])
  for path in summary["plots"]:
    print(f"plot: {path}")
  out = pathlib.Path(config.output_dir)
  print(f"summary: {out / 'summary.md'}")
  print(f"log: {out / logs.LOG_NAME}")
  logs.announce(f"wall time: {time.perf_counter() - _START:.1f} s")


def cli():
  if any(a in ("--help", "-h", "--helpshort", "-?", "--helpfull") for a in sys.argv[1:]):
    print(__doc__)  # absl exits 1 after --help; a help request is a success
    print(flags.FLAGS.main_module_help())
    return
  app.run(main)


if __name__ == "__main__":
  cli()
