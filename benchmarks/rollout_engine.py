"""The rollout engine (continuous batching, shared prompt blocks) on GSM8K-length requests.

    python benchmarks/rollout_engine.py                  # 128 requests, 2 repetitions
    python benchmarks/rollout_engine.py --requests 256 --reps 3 --chunk-steps 16
    python benchmarks/rollout_engine.py --reps 0         # slot counts and memory only (no steady-state timing)
    python benchmarks/rollout_engine.py --requests 1024 --slots-only   # useful-slot fractions of a long queue
    python benchmarks/rollout_engine.py --requests 64 --fixed-length 40   # every row 40 tokens: the decode step
                                                                          # alone, no length waste to remove

Workload: `--requests` GSM8K train problems drawn at random; each request's prompt is its question and its
generation length is its reference answer's length, both tokenised with the real Llama 2 tokenizer from
`../shared` (relative to the repository; the script exits with a message when it is absent). Stops are disabled
and each request's `max_new_tokens` is its drawn length, so every request generates exactly that many tokens:
the workload is the length distribution. Temperature 1, one sample per request, a random-weight Llama-shaped
model with the Llama 2 vocabulary (32,000), float32. The engine runs the whole queue through 64 slots.
Reported:
  * useful-slot fraction = tokens produced by decode steps / (decode steps x slots), the engine's measured and
    static batching's counted (batches of 64 in queue order, each decoding until its longest row is done, as a
    static `generate` would); the first token of each request comes from its prefill and is left out of both;
  * tokens/s (drawn tokens / wall time); first call (compiles every bucket) apart from the steady state (median
    of `--reps` repetitions);
  * best-of-16 KV memory at a 400-token shared history: the engine's peak pool blocks x block bytes, beside the
    counted bytes of 16 unshared rows of history + reply.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import jax
import numpy as np

from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling.engine import Engine
from rise_jax.sampling.requests import Request
from timing import timed  # this directory: the timing the benchmarks share

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"
# Llama-shaped, Llama 2 vocabulary, small enough that the CPU run takes minutes.
MODEL = ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=2,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
STATIC_BATCH = 64
MAX_SEQ_LEN = 1024  # the longest GSM8K question + answer is ~715 tokens


def gsm8k_workload(count: int, seed: int) -> list[tuple[list[int], int]]:
  """(question ids with BOS, reference-answer length) for `count` random GSM8K train problems."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
  rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
  picked = np.random.default_rng(seed).choice(len(rows), count, replace=False)
  return [([sp.bos_id()] + sp.encode(rows[i]["question"]), len(sp.encode(rows[i]["answer"]))) for i in picked]


def run_engine(engine: Engine, workload) -> dict:
  before = dict(engine.stats)
  engine.forget_prefix_cache()  # an earlier run's prompts would be free hits: every run pays its own prefill
  engine.run([Request(prompt, uid=i, max_new_tokens=length, temperature=1.0) for i, (prompt, length)
              in enumerate(workload)], seed=0)
  return {k: engine.stats[k] - before.get(k, 0) for k in ("decode_tokens", "slot_steps", "admitted", "chunks")}


def static_batches(workload):
  """Static batching on this workload: batches of STATIC_BATCH in queue order."""
  return [workload[start:start + STATIC_BATCH] for start in range(0, len(workload), STATIC_BATCH)]


def static_batch_counts(workload) -> dict:
  """Decode-step tokens and slots of static batching: a call decodes all its rows until its longest is done."""
  batches = static_batches(workload)
  return dict(decode_tokens=sum(length - 1 for b in batches for _, length in b),  # the rest of each row is waste
              slot_steps=sum(len(b) * (max(length for _, length in b) - 1) for b in batches))


def best_of_16_memory(model, history: list[int], max_new: int) -> dict:
  """KV bytes held for 16 samples of one 400-token history: the engine's peak blocks, and 16 unshared rows."""
  token_bytes = MODEL.kv_bytes_per_token("float32")
  engine = Engine(model, slots=16, max_seq_len=MAX_SEQ_LEN, block_size=16, num_blocks=16 * 64 + 2)
  engine.run([Request(history, uid=0, n=16, max_new_tokens=max_new, temperature=1.0)], seed=0)
  return dict(max_new=max_new, engine_bytes=engine.stats["peak_blocks"] * 16 * token_bytes,
              unshared_bytes=16 * (len(history) + max_new) * token_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--requests", type=int, default=128)
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--chunk-steps", type=int, default=8)
  parser.add_argument("--fixed-length", type=int, default=0,
                      help="every request generates this many tokens (the per-step cost, static batching's best case)")
  parser.add_argument("--slots-only", action="store_true",
                      help="only the useful-slot fractions (the engine runs once; static batching is counted)")
  args = parser.parse_args()
  if not (TOKENIZER.is_file() and GSM8K_TRAIN.is_file()):
    print(f"skipped: {TOKENIZER} or {GSM8K_TRAIN} is absent (the shared data sits beside the checkout)")
    return 0
  workload = gsm8k_workload(args.requests, seed=0)
  if args.fixed_length:
    workload = [(prompt, args.fixed_length) for prompt, _ in workload]
  lengths = np.asarray([length for _, length in workload])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(workload)} GSM8K requests, prompt mean "
        f"{np.mean([len(p) for p, _ in workload]):.0f} tokens, answer mean {lengths.mean():.0f} / p99 "
        f"{np.percentile(lengths, 99):.0f} / max {lengths.max()} tokens", flush=True)
  model = build_model(MODEL, seed=0)
  engine = Engine(model, slots=STATIC_BATCH, max_seq_len=MAX_SEQ_LEN, block_size=16, chunk_steps=args.chunk_steps)
  first, counts = timed(lambda: run_engine(engine, workload))
  static = static_batch_counts(workload)
  fraction = {name: c["decode_tokens"] / c["slot_steps"] for name, c in (("engine", counts), ("static", static))}
  print(f"engine: useful-slot fraction {fraction['engine']:.3f} ({counts['decode_tokens']:,} / "
        f"{counts['slot_steps']:,}); static batches of {STATIC_BATCH}, counted: {fraction['static']:.3f} "
        f"({static['decode_tokens']:,} / {static['slot_steps']:,}); engine / static "
        f"{fraction['engine'] / fraction['static']:.2f}x", flush=True)
  if args.slots_only:
    return 0
  tokens = int(lengths.sum())
  print(f"engine: first call {first:.1f} s ({tokens / first:.0f} tok/s), compiles {engine.compile_counts()}",
        flush=True)
  if args.reps:  # --reps 0: the counts (hardware-independent) and the memory lines only
    times = []
    for rep in range(args.reps):
      times.append(timed(lambda: run_engine(engine, workload))[0])
      print(f"rep {rep}: {times[-1]:.1f} s", flush=True)
    steady = statistics.median(times)
    print(f"engine: steady {steady:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), {tokens / steady:.0f} "
          f"tok/s; first call / steady {first / steady:.2f}; compiles after the runs {engine.compile_counts()}",
          flush=True)
  history = [t for p, _ in gsm8k_workload(12, seed=1) for t in p][:400]
  for max_new in (1, int(lengths.mean())):
    m = best_of_16_memory(model, history, max_new)
    print(f"best-of-16, 400-token history, max_new {max_new}: engine pool {m['engine_bytes'] / 2**20:.2f} MiB; "
          f"16 unshared rows (counted) {m['unshared_bytes'] / 2**20:.2f} MiB: "
          f"{m['engine_bytes'] / m['unshared_bytes']:.3f} of that", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
