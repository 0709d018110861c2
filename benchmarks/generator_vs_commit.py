"""This tree's generator against an earlier commit's best path, workload by workload, side by side.

    python benchmarks/generator_vs_commit.py --baseline e1fcfb9 --checkpoint runs/toy/iter_3/train/hf \
        --tokenizer runs/toy/tokenizer                       # every part, 3 passes each
    python benchmarks/generator_vs_commit.py --parts gsm8k_queue,multi_turn --passes 2

Each pass of each part is a fresh process in its tree (`git archive` of the baseline into a temporary directory,
this checkout as is) with an empty compilation cache, and passes alternate (baseline, this tree, baseline, ...)
so load on a shared machine hits both alike; medians over passes and their ratio (baseline / this tree, > 1 = this
tree faster) are printed. The baseline's best path per workload is what it ran there: on e1fcfb9 the static
Sampler for the toy (its default, `sampling.engine = "static"`) and the paged engine for GSM8K lengths.
Parts:
  toy_eval     `python -m rise_jax.evaluate` on a trained toy checkpoint, 2,000 test problems, 5 sequential turns
               (window 2) and 5 parallel samples, 20 new tokens: the toy main job's evaluation stage. Wall time
               of the command (compiles included: the main job pays them) and the headline metrics, which may
               differ only through sampling order.
  gsm8k_queue  128 GSM8K-length single-turn requests (benchmarks/rollout_engine.py's draw: Llama 2 tokenizer
               lengths from ../shared, random Llama-shaped model, stops off) through 64 slots: steady-state tokens/s
               (the second run in the process) and the first run (compiles).
  multi_turn   64 conversations x 3 turns, each turn's prompt = the last prompt + its reply + a 16-token feedback,
               every next turn submitted the moment its reply is back (the runner's streamed episodes).
The first two GSM8K parts need ../shared (skipped with a message when absent).
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
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The GSM8K-length parts run the same code in both trees: `Engine` and `Request` live in rise_jax.sampling.engine
# at e1fcfb9; this tree keeps `Engine` there and `Request` in rise_jax.sampling.requests.
ENGINE_CHILD = r"""
import json, sys, time
import numpy as np
import sentencepiece as spm
from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling.engine import Engine
try:
  from rise_jax.sampling.requests import Request
except ImportError:
  from rise_jax.sampling.engine import Request
shared, part = sys.argv[1], sys.argv[2]
sp = spm.SentencePieceProcessor(model_file=shared + "/tokenizers/llama2/tokenizer.model")
rows = [json.loads(line) for line in open(shared + "/data/gsm8k/train.jsonl") if line.strip()]

def gsm8k_workload(count, seed):  # (question ids, reference-answer length), as benchmarks/rollout_engine.py draws
  picked = np.random.default_rng(seed).choice(len(rows), count, replace=False)
  return [([sp.bos_id()] + sp.encode(rows[i]["question"]), len(sp.encode(rows[i]["answer"]))) for i in picked]

MODEL = ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=2,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
model = build_model(MODEL, seed=0)
engine = Engine(model, slots=64, max_seq_len=1024, block_size=16, chunk_steps=8)

def queue():
  work = gsm8k_workload(128, seed=0)
  engine.run([Request(p, uid=i, max_new_tokens=n, temperature=1.0) for i, (p, n) in enumerate(work)], seed=0)
  return sum(n for _, n in work)

def turns():
  work = gsm8k_workload(64 * 3, seed=1)
  feedback = list(range(100, 116))
  stream = engine.stream(seed=0)
  tokens = 0
  for i in range(64):
    stream.submit(Request(work[3 * i][0], uid=(i, 1), max_new_tokens=work[3 * i][1], temperature=1.0), tag=(i, 1, work[3 * i][0]))
  while stream.busy:
    for (i, t, prompt), samples in stream.step():
      tokens += len(samples[0].token_ids)
      if t < 3:
        nxt = prompt + list(samples[0].token_ids) + feedback
        stream.submit(Request(nxt, uid=(i, t + 1), max_new_tokens=work[3 * i + t][1], temperature=1.0),
                      tag=(i, t + 1, nxt))
  return tokens

fn = queue if part == "gsm8k_queue" else turns
start = time.perf_counter(); tokens = fn(); first = time.perf_counter() - start
start = time.perf_counter(); fn(); steady = time.perf_counter() - start
print(json.dumps({"first_s": first, "steady_s": steady, "tokens": tokens, "tokens_per_s": tokens / steady}))
"""


def toy_eval_args(checkpoint: str, tokenizer: str, out: str) -> list[str]:
  return ["-m", "rise_jax.evaluate", "--config=configs/eval_toy.py", "--config.model.source=hf",
          f"--config.model.hf_path={checkpoint}", f"--config.tokenizer.path={tokenizer}",
          "--config.task.test_size=2000", "--config.sampling.batch_size=2000", "--config.sampling.max_new_tokens=20",
          "--config.sampling.max_cache_length=256", "--config.eval.window=2", "--config.sampling.slots=512",
          "--config.sampling.num_blocks=20000", "--config.sampling.chunk_steps=16",
          f"--config.output_dir={out}"]


def run_pass(tree: pathlib.Path, part: str, args) -> dict:
  cache = tempfile.mkdtemp(prefix="rise_jax_cc_")  # cold: the main job compiles every program once
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_COMPILATION_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
  if part == "toy_eval":
    out = tempfile.mkdtemp(prefix="rise_jax_eval_")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *toy_eval_args(args.checkpoint, args.tokenizer, out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
      raise SystemExit(f"{tree}: evaluation failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((pathlib.Path(out) / "metrics.json").read_text())
    headline = {k: metrics.get(k, {}).get("value") if isinstance(metrics.get(k), dict) else metrics.get(k)
                for k in ("m1@t1", "m1@t5", "p1@t5", "m5@t1")}
    return {"seconds": wall, "headline": headline}
  proc = subprocess.run([sys.executable, "-c", ENGINE_CHILD, str(SHARED), part], cwd=tree, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{tree}: {part} failed:\n{proc.stderr[-3000:]}")
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"seconds": row["steady_s"], "first_s": row["first_s"], "tokens_per_s": row["tokens_per_s"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--baseline", default="e1fcfb9")
  parser.add_argument("--parts", default="toy_eval,gsm8k_queue,multi_turn")
  parser.add_argument("--passes", type=int, default=3)
  parser.add_argument("--checkpoint", help="toy_eval: a trained toy model's HF export (e.g. runs/toy/iter_3/train/hf)")
  parser.add_argument("--tokenizer", help="toy_eval: that run's tokenizer directory (e.g. runs/toy/tokenizer)")
  args = parser.parse_args()
  parts = args.parts.split(",")
  if "toy_eval" in parts and not (args.checkpoint and args.tokenizer):
    raise SystemExit("toy_eval needs --checkpoint and --tokenizer (a finished `python -m rise_jax.run "
                     "--config=configs/toy.py` has both)")
  if any(p != "toy_eval" for p in parts) and not (SHARED / "data" / "gsm8k" / "train.jsonl").is_file():
    print(f"skipped gsm8k_queue / multi_turn: {SHARED} is absent")
    parts = [p for p in parts if p == "toy_eval"]
  for value in ("checkpoint", "tokenizer"):
    if getattr(args, value):
      setattr(args, value, str(pathlib.Path(getattr(args, value)).resolve()))
  baseline = pathlib.Path(tempfile.mkdtemp(prefix="rise_jax_baseline_"))
  archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
  trees = {f"baseline {args.baseline}": baseline, "this tree": REPO}
  print(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "load_average": os.getloadavg(),
                    "baseline": args.baseline}), flush=True)
  rows = []
  for part in parts:
    results = {name: [] for name in trees}
    for i in range(args.passes):
      for name, tree in trees.items():
        results[name].append(run_pass(tree, part, args))
        print(json.dumps({"part": part, "pass": i, "tree": name, **results[name][-1]}), flush=True)
    medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in results.items()}
    base, ours = medians[f"baseline {args.baseline}"], medians["this tree"]
    rows.append((part, base, ours, base / ours, results))
  print(f"\n| part | baseline {args.baseline} s | this tree s | this tree speed-up | passes (baseline; this) |")
  print("|---|---|---|---|---|")
  for part, base, ours, ratio, results in rows:
    passes = "; ".join(", ".join(f"{r['seconds']:.1f}" for r in rs) for rs in results.values())
    print(f"| {part} | {base:.1f} | {ours:.1f} | {ratio:.2f}x | {passes} |")
  print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
