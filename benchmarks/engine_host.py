"""The engine's host bookkeeping, this tree against an earlier commit's, side by side.

    python benchmarks/engine_host.py --baseline 656e834 --passes 5

Why. Between decode chunks the host refills slots, builds the chunk's inputs and reads its outputs back, one
Python pass over every slot. On a GPU a 1B model's decode step is ~1-2 ms, so at hundreds of slots that pass is
a large part of each chunk. A tiny model makes the device's share small on a CPU too, so the run time here is
mostly that host work: 1,024 requests (40-token prompts, 16-200 new tokens, temperature 1, no stops) through
512 slots, chunks of 8 steps, no prefix cache.

Passes alternate (baseline, this tree, baseline, ...), each a fresh process running its own tree's `Engine` on
the same requests after a warm-up run that compiles; each pass reports the median of 3 timed runs. Medians over
passes and their ratio are printed, and whether both trees drew the same tokens.
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

CHILD = r"""
import hashlib, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling.engine import Engine, Request
config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=32, max_position_embeddings=1024)
model = build_model(config, seed=0)
rng = np.random.default_rng(0)
spec = [(rng.integers(3, 512, 40).tolist(), int(rng.integers(16, 201))) for _ in range(1024)]
requests = [Request(p, uid=i, max_new_tokens=m, temperature=1.0, stop_ids=[]) for i, (p, m) in enumerate(spec)]
engine = Engine(model, slots=512, max_seq_len=256, chunk_steps=8, prefix_cache=False)
outs = engine.run(requests, seed=0)
times = []
for _ in range(3):
  start = time.perf_counter()
  engine.run(requests, seed=0)
  times.append(time.perf_counter() - start)
digest = hashlib.sha256(json.dumps([o[0].token_ids for o in outs]).encode()).hexdigest()[:16]
import rise_jax
print(json.dumps({"seconds": statistics.median(times), "tokens": digest, "module": rise_jax.__file__}))
"""


def one_pass(tree: pathlib.Path) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, str(tree)], capture_output=True, text=True, check=True,
                       cwd=tree, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if not result.pop("module").startswith(str(tree)):  # an installed rise_jax must not stand in for the tree's
    raise SystemExit(f"{tree}: the child imported rise_jax from elsewhere")
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", required=True, help="the commit to compare against")
  parser.add_argument("--passes", type=int, default=5)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    base = pathlib.Path(tmp) / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                   capture_output=True)
    try:
      results = {"baseline": [], "this tree": []}
      for i in range(args.passes):
        for name, tree in (("baseline", base), ("this tree", REPO)):
          results[name].append(one_pass(tree))
        print(f"pass {i}: " + ", ".join(f"{n} {r[-1]['seconds']:.2f} s" for n, r in results.items()), flush=True)
    finally:
      subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
  median = {n: statistics.median(r["seconds"] for r in rs) for n, rs in results.items()}
  same = {r["tokens"] for rs in results.values() for r in rs}
  print(f"median: baseline {median['baseline']:.2f} s, this tree {median['this tree']:.2f} s; "
        f"this tree is {median['baseline'] / median['this tree']:.2f}x the baseline's speed; "
        f"identical tokens: {len(same) == 1}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
