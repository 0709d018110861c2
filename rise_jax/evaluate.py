"""`python -m rise_jax.evaluate --config=configs/eval_toy.py`: RISE's evaluation (Algorithm 2) of one model.

A thin command line over the one evaluation stage the RISE loop runs too (`rise_jax.pipeline.evaluation`), with
the one seed rule (`rise_jax.rise.algorithm.eval_seed`). It runs:
- the sequential protocol: `eval.turns` turns, one sample each, the failure feedback after every turn (no oracle
  unless `eval.oracle`), the history window `eval.window`; `m1@t1`, `m1@tk` and `p1@tk` are all read from this log
  (before the first correct turn the feedback is the same with or without an oracle). With `eval.draws > 1` it runs
  that many independent draws (draw d samples with seed + 1 + 2d), for `m1@t1` as a mean over draws;
- the parallel protocol: `eval.parallel_k` first-turn samples per problem (`mk@t1`, `pk@t1`), seed + 2;
- optionally (`eval.self_refine`) the Self-Refine prompting baseline: the sequential protocol with the
  `self_refine` prompt set.
Then writes `metrics.json`, `report.md` and plots with `rise_jax.rise.report`. Every log resumes: rerunning the
same command after a crash skips the problems already logged.

Output directory (`output_dir`):
  config.json  rollouts.jsonl (sequential)  [rollouts_draw<d>.jsonl]  rollouts_parallel.jsonl  throughput.json
  metrics.json  report.md  *.png  [self_refine/{rollouts.jsonl, metrics.json, report.md, *.png}]  run.log (the full log)
(`rollouts.jsonl` and `rollouts_parallel.jsonl` are the names the RISE loop uses in `iter_<T>/eval/`.)
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from rise_jax import compile_cache, logs
from rise_jax import files
from rise_jax.pipeline.evaluation import evaluate_config as evaluate  # the API tests and notebooks call


def main(cfg, on_open=None) -> dict[str, Any]:
  metrics = evaluate(cfg, on_open=on_open)
  print(json.dumps({k: v for k, v in metrics.items() if "@" in k and isinstance(v, float)}, indent=2))
  return metrics


_HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")


def cli(argv: Sequence[str] | None = None):
  """`python -m rise_jax.evaluate --config=configs/<name>.py [--config.<field>=<value> ...]`."""

  argv = list(sys.argv if argv is None else argv)
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file; override fields "
                                           "with --config.<section>.<field>=<value>.", lock_config=True)
  if any(a in _HELP_FLAGS for a in argv[1:]):
    # absl exits 1 after --help; a help request is a success.
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  flags.mark_flag_as_required("config")

  def run(_):
    compile_cache.enable()
    logs.setup()  # the terminal: progress, warnings, errors (--verbosity for more); the full log in output_dir
    with files.cli_errors("rise_jax.evaluate", config.value.output_dir):
      main(config.value, on_open=logs.to_file)

  app.run(run, argv=argv)


if __name__ == "__main__":
  cli()
