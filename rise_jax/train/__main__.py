"""python -m rise_jax.train --config=configs/<name>.py [--config.train.lr=...]: train on sft/1 records.

Writes under the config's output_dir (docs/contracts.md §6 layout for one training stage): ckpt/, metrics.jsonl,
data_report.json and the HF export hf/. Re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from rise_jax import compile_cache
from rise_jax import config as config_lib
from rise_jax import files
from rise_jax.pipeline.plan import StopAfter
from rise_jax.train import demo, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).", lock_config=True)
_DATA = flags.DEFINE_string("data", None, "sft/1 records (jsonl, parquet or a directory); default train.data_path.")
_OUT = flags.DEFINE_string("out_dir", None, "Run directory; default the config's output_dir.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO

  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  trainer.initialize_distributed(_CONFIG.value)  # before anything asks jax for its devices
  cfg = config_lib.validate(_CONFIG.value, require_training=True, num_devices=jax.device_count())
  stop = StopAfter.parse(cfg.debug.stop_after)  # only "train:N" applies to this one stage
  compile_cache.enable()
  data = _DATA.value or cfg.train.data_path
  if data is None:
    raise app.UsageError("no training data: pass --data or set --config.train.data_path")
  if cfg.train.demo_data:
    demo.ensure_demo_data(data, cfg.tokenizer.path)
  out_dir = _OUT.value or cfg.output_dir
  with files.cli_errors("rise_jax.train", out_dir):  # refused directory: exit 2; disk full: exit 4
    result = trainer.train(cfg, data, out_dir, stop_after_step=stop.units_for("train") if stop else None)
  last = result.metrics[-1] if result.metrics else {}
  print(f"trained {result.steps} steps (resumed from {result.resumed_from}); final loss "
        f"{last.get('loss', float('nan')):.4f}; {result.encode_report.summary()}; HF export: {result.hf_dir}")


if __name__ == "__main__":
  if any(a in ("--help", "-h", "--helpshort", "-?", "--helpfull") for a in sys.argv[1:]):
    print(__doc__)  # absl exits 1 after --help; asking for help is a success
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  app.run(main)
