"""The rollout engine (continuous batching, shared prompt blocks) against today's `Sampler`, side by side.

    python benchmarks/rollout_engine.py                  # 128 requests, 2 repetitions
    python benchmarks/rollout_engine.py --requests 256 --reps 3 --chunk-steps 16
    python benchmarks/rollout_engine.py --reps 0         # slot counts and memory only (no steady-state timing)
    python benchmarks/rollout_engine.py --requests 1024 --slots-only   # useful-slot fractions of a long queue
    python benchmarks/rollout_engine.py --requests 64 --fixed-length 40   # one batch, every row 40 tokens: the
                                                                          # cost of a decode step, no waste to remove

Workload: `--requests` GSM8K train problems drawn at random; each request's prompt is its question and its
generation length is its reference answer's length, both tokenised with the real Llama 2 tokenizer from
`../shared` (relative to the repository; the script exits with a message when it is absent). Stops are disabled
and each request's `max_new_tokens` is its drawn length, so every request generates exactly that many tokens:
the workload is the length distribution. Temperature 1, one sample per request, a random-weight Llama-shaped
model with the Llama 2 vocabulary (32,000), float32.

Today's sampler runs static batches of 64 requests in queue order; one call decodes until its longest row is
done (a call has one max_new_tokens: the batch's longest drawn length), which is what `generate` costs on this
workload. The engine runs the whole queue through 64 slots. Reported:
  * useful-slot fraction = tokens produced by decode steps / (decode steps x slots); the first token of each
    request comes from its prefill on both sides and is left out of both;
  * tokens/s (drawn tokens / wall time) both, and the ratio; first call (compiles every bucket) apart from the
    steady state (median of `--reps` interleaved repetitions);
  * best-of-16 KV memory at a 400-token shared history: the engine's peak pool blocks x block bytes against the
    sampler's cache arrays (the prefill row and the 16 forked rows it holds while forking).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling import Sampler, SamplingParams
from rise_jax.sampling.engine import Engine, Request

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
  engine.run([Request(prompt, uid=i, max_new_tokens=length, temperature=1.0) for i, (prompt, length)
              in enumerate(workload)], seed=0)
  return {k: engine.stats[k] - before.get(k, 0) for k in ("decode_tokens", "slot_steps", "admitted", "chunks")}


def static_batches(workload):
  """The sampler's calls on this workload: static batches of STATIC_BATCH in queue order."""
  return [workload[start:start + STATIC_BATCH] for start in range(0, len(workload), STATIC_BATCH)]


def static_batch_counts(workload) -> dict:
  """Decode-step tokens and slots of static batching: a call decodes until its longest row is done."""
  batches = static_batches(workload)
  return dict(decode_tokens=sum(length - 1 for b in batches for _, length in b),  # the rest of each row is waste
              slot_steps=sum(STATIC_BATCH * (max(length for _, length in b) - 1) for b in batches))


def run_sampler(sampler: Sampler, workload) -> dict:
  for i, batch in enumerate(static_batches(workload)):
    params = SamplingParams(max_new_tokens=max(length for _, length in batch), temperature=1.0, stop_token_ids=[])
    sampler.generate([p for p, _ in batch], params, seed=0,
                     prompt_ids=list(range(i * STATIC_BATCH, i * STATIC_BATCH + len(batch))))
  return static_batch_counts(workload)


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def best_of_16_memory(model, history: list[int], max_new: int) -> dict:
  """KV bytes held for 16 samples of one 400-token history: engine peak blocks vs the sampler's arrays."""
  block_bytes = 16 * MODEL.kv_bytes_per_token("float32")
  engine = Engine(model, slots=16, max_seq_len=MAX_SEQ_LEN, block_size=16, num_blocks=16 * 64 + 2)
  engine.run([Request(history, uid=0, n=16, max_new_tokens=max_new, temperature=1.0)], seed=0)
  sampler = Sampler(model, None, max_cache_length=MAX_SEQ_LEN)
  outs = sampler.generate([history], SamplingParams(max_new_tokens=max_new, n=16, temperature=1.0,
                                                    stop_token_ids=[]), seed=0)
  cache = outs[0][0].conversation._store.cache
  forked = 2 * cache.k.nbytes  # k and v of the 16 decode rows
  prefill_row = forked // cache.k.shape[1]  # the prefilled row the 16 are copied from (alive while forking)
  return dict(max_new=max_new, engine_bytes=engine.stats["peak_blocks"] * block_bytes,
              sampler_bytes=forked + prefill_row, sampler_cache_slots=cache.k.shape[2])


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
  if args.slots_only:  # the useful-slot fractions alone: the engine runs once, static batching is counted
    counts = {"engine": run_engine(engine, workload), "sampler (counted)": static_batch_counts(workload)}
    for name, c in counts.items():
      print(f"{name}: useful-slot fraction {c['decode_tokens'] / c['slot_steps']:.3f} ({c['decode_tokens']:,} / "
            f"{c['slot_steps']:,})", flush=True)
    return 0
  sampler = Sampler(model, None, max_cache_length=MAX_SEQ_LEN)
  runs = {"engine": lambda: run_engine(engine, workload), "sampler": lambda: run_sampler(sampler, workload)}
  first, counts, times = {}, {}, {name: [] for name in runs}
  for name, fn in runs.items():
    first[name], counts[name] = timed(fn)
    print(f"{name}: first call {first[name]:.1f} s", flush=True)
  for rep in range(args.reps):  # interleaved: the machine is shared, so only side-by-side ratios are meaningful
    for name, fn in runs.items():
      times[name].append(timed(fn)[0])
    print(f"rep {rep}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)
  tokens = int(lengths.sum())
  fraction = {name: c["decode_tokens"] / c["slot_steps"] for name, c in counts.items()}
  for name in runs:
    c = counts[name]
    print(f"{name:>7}: useful-slot fraction {fraction[name]:.3f} ({c['decode_tokens']:,} / {c['slot_steps']:,}), "
          f"first call {first[name]:.1f} s", flush=True)
  if args.reps:  # --reps 0: the counts (hardware-independent) and the memory lines only
    steady = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
      print(f"{name:>7}: steady {steady[name]:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[name])}), "
            f"{tokens / steady[name]:.0f} tok/s", flush=True)
    print(f"engine / sampler: tokens/s {steady['sampler'] / steady['engine']:.2f}x", flush=True)
  print(f"engine / sampler: useful-slot fraction {fraction['engine'] / fraction['sampler']:.2f}x; engine compiles "
        f"{engine.compile_counts()}, sampler compiles {sampler.compile_counts()}", flush=True)
  history = [t for p, _ in gsm8k_workload(12, seed=1) for t in p][:400]
  for max_new in (1, int(lengths.mean())):
    m = best_of_16_memory(model, history, max_new)
    print(f"best-of-16, 400-token history, max_new {max_new}: engine {m['engine_bytes'] / 2**20:.2f} MiB, sampler "
          f"{m['sampler_bytes'] / 2**20:.2f} MiB ({m['sampler_cache_slots']} slots per row): "
          f"{m['engine_bytes'] / m['sampler_bytes']:.3f} of today's", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
