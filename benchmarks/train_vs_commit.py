"""The toy boost's training throughput in this tree against an earlier commit's, side by side.

    python benchmarks/train_vs_commit.py --baseline 86c3dd5       # the trainer before the toy's speed work

`benchmarks/train_loop.py` times the old loop *emulated on this tree's training step*; this script times the
earlier commit's own code, so every change since then counts (the loop, the padding buckets, the model's
backward). Both trees run their own `trainer.train()` with their own `configs/toy.py` training settings, on the
same records (today's toy boost: the task's reference answers after the toy prompt set's opening turns) and the
same toy tokenizer, from the `toy-llama` preset's random initialisation, with the boost's learning rate (2e-3) and
batch 16. Passes alternate (baseline, this tree, baseline, ...), each a fresh process, so load on a shared machine
hits both alike. A pass reports examples/s over its log intervals after the first (which holds compilation), read
from the trainer's own metrics.jsonl; medians over passes and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs inside each tree: its own configs/toy.py and trainer, the shared records and tokenizer.
CHILD = r"""
import json, runpy, sys
tree, records, tokenizer, out, log_every = sys.argv[1:6]
c = runpy.run_path(tree + "/configs/toy.py")["get_config"]()
c = c.unlock() if hasattr(c, "unlock") else c
c.output_dir = out
c.tokenizer.path = tokenizer
c.train.lr = c.rise.boost_lr
c.train.epochs = 1
c.train.ckpt_every = 10**9
c.train.log_every = int(log_every)
from rise_jax import config as config_lib
from rise_jax.train import trainer
trainer.train(config_lib.validate(c, require_training=True), records, out)
"""


def examples_per_second(metrics_path: pathlib.Path) -> float:
  """Examples/s over the log intervals after the first: each interval ends at a record with tokens_per_s."""
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  intervals, examples, tokens = [], 0, 0
  for row in rows:
    examples += row["examples"]
    tokens += row["tokens"]
    if "tokens_per_s" in row:
      intervals.append(examples / (tokens / row["tokens_per_s"]))
      examples = tokens = 0
  if len(intervals) < 2:
    raise SystemExit(f"{metrics_path}: {len(intervals)} log intervals; raise --steps")
  return statistics.median(intervals[1:])


def run_pass(tree: pathlib.Path, records: str, tokenizer: str, log_every: int) -> float:
  out = tempfile.mkdtemp(prefix="rise_jax_bench_")
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR="")  # no persistent cache: both compile alike
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), records, tokenizer, out, str(log_every)],
                        cwd=tree, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{tree}: training failed:\n{proc.stderr[-3000:]}")
  return examples_per_second(pathlib.Path(out) / "metrics.jsonl")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--baseline", default="86c3dd5", help="commit to compare against (default: the trainer before the toy's speed work)")
  parser.add_argument("--steps", type=int, default=400, help="optimiser steps per pass")
  parser.add_argument("--log_every", type=int, default=50, help="the same metric interval in both trees")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  sys.path.insert(0, str(REPO / "benchmarks"))
  import train_loop
  records, tokenizer = train_loop.toy_records(args.steps * 16)  # one epoch of batch 16 = --steps steps
  work = pathlib.Path(tempfile.mkdtemp(prefix="rise_jax_vs_commit_"))
  (work / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  baseline = work / "baseline"
  baseline.mkdir()
  archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
  trees = {f"baseline {args.baseline}": baseline, "this tree": REPO}
  rates = {name: [] for name in trees}
  for i in range(args.repeats):
    for name, tree in trees.items():
      rates[name].append(run_pass(tree, str(work / "records.jsonl"), tokenizer, args.log_every))
      print(f"pass {i}: {name}: {rates[name][-1]:.0f} examples/s", flush=True)
  base = statistics.median(rates[f"baseline {args.baseline}"])
  print(f"\n| tree | examples/s (median of {args.repeats}) | ratio | per pass |\n|---|---|---|---|")
  for name, r in rates.items():
    print(f"| {name} | {statistics.median(r):.0f} | {statistics.median(r) / base:.2f}x | "
          f"{', '.join(f'{x:.0f}' for x in r)} |")


if __name__ == "__main__":
  main()
