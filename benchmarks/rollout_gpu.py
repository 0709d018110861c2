"""Issue 14's GPU numbers in one command (< 5 minutes on one H200): the engine's decode step against the HBM
roofline, and the GSM8K-length workload against today's sampler, side by side in one process.

    python benchmarks/rollout_gpu.py                         # on the GPU machine
    python benchmarks/rollout_gpu.py --smoke                 # the same parts at toy sizes, on any machine
    python benchmarks/rollout_gpu.py --write-lengths F.json  # here: the workload's lengths, for a machine
                                                             # without ../shared (then --lengths F.json there)

Model: TinyLlama-1.1B's shape (22 layers, width 2048, 32 query / 4 kv heads, Llama 2 vocabulary), random
weights, bfloat16 parameters, compute and KV cache. Greedy or temperature 1, no stop tokens: every row generates
exactly its `max_new_tokens`, so both sides do the same work.

Parts, every timing the median of `--reps` interleaved repetitions (engine, sampler, engine, ...) after a first
call that compiles (reported apart):
  * bandwidth: the best device-to-device copy, (bytes read + bytes written) / time, over a 4 GiB array;
  * step, batch 64 and 512: 128-token random prompts, greedy, NEW new tokens. The engine runs `batch` slots (one
    request per slot), the sampler one call. A decode step = (t(NEW) - t(1)) / (NEW - 1): generate minus its
    prefill and first token, per token. HBM roofline = (parameter bytes + mean KV bytes a step reads) / copy
    bandwidth, the mean KV bytes being batch x (128 + NEW / 2) x KV bytes per token. Done means engine step /
    roofline <= 1.5 at batch 64 and <= 2 at 512;
  * workload: REQUESTS GSM8K train problems drawn at random (seed 0), each a random-token prompt of its
    question's length and exactly its reference answer's length of new tokens (both lengths with the Llama 2
    tokenizer from ../shared, or `--lengths`; a random-weight model makes only the lengths matter), temperature 1.
    The engine runs the queue through 64 slots; the sampler runs static batches of 64 in queue order, each call
    decoding to its longest row (what `generate` costs on this workload). Done means engine tok/s >= 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling import Sampler, SamplingParams, kv_bytes_per_token, param_count
from rise_jax.sampling.engine import Engine, Request

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"

SIZE = {  # TinyLlama-1.1B's shape, and a toy for --smoke
    "gpu": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                       num_kv_heads=4, head_dim=64, max_position_embeddings=2048),
    "smoke": ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=32, max_position_embeddings=2048),
}
# (batches, prompt tokens, new tokens, workload requests, copy GiB) per mode.
SHAPES = {"gpu": ((64, 512), 128, 256, 512, 4.0), "smoke": ((4, 16), 16, 12, 24, 0.05)}
STATIC_BATCH = 64      # today's sampler batch on the workload, and the engine's slots there
MAX_SEQ_LEN = 1024     # the longest GSM8K question + answer is ~715 Llama 2 tokens


def gsm8k_lengths(count: int, seed: int = 0) -> list[tuple[int, int]]:
  """(prompt tokens with BOS, reference-answer tokens) of `count` random GSM8K train problems (Llama 2 tokenizer)."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
  rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
  picked = np.random.default_rng(seed).choice(len(rows), count, replace=False)
  return [(1 + len(sp.encode(rows[i]["question"])), len(sp.encode(rows[i]["answer"]))) for i in picked]


def read_lengths(path: str | None, count: int) -> list[tuple[int, int]] | None:
  """The workload's lengths from `path` (written by --write-lengths), else from ../shared, else None."""
  if path:
    pairs = json.loads(pathlib.Path(path).read_text())
    if len(pairs) < count:
      raise SystemExit(f"{path}: {len(pairs)} (prompt, answer) pairs, the workload needs {count}")
    return [(int(p), int(a)) for p, a in pairs[:count]]
  if TOKENIZER.is_file() and GSM8K_TRAIN.is_file():
    return gsm8k_lengths(count)
  return None


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
  """(first-call seconds, median seconds of `reps` interleaved repetitions) per function."""
  first = {name: timed(fn) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return first, {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(gib: float, reps: int = 10) -> float:
  """Best (read + write) bytes/s of a jitted copy of a `gib` GiB bfloat16 array."""
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))  # an elementwise op: one read and one write of every byte
  copy(x).block_until_ready()
  best = min(timed(lambda: copy(x)) for _ in range(reps))
  return 2 * x.nbytes / best


def engine_call(engine: Engine, prompts, max_new, temperature=0.0):
  def call():
    return engine.run([Request(p, uid=i, max_new_tokens=m, temperature=temperature, stop_ids=[])
                       for i, (p, m) in enumerate(zip(prompts, max_new))], seed=0)
  return call


def sampler_call(sampler: Sampler, prompts, max_new: int, temperature=0.0, first_id=0):
  params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop_token_ids=[])
  return lambda: sampler.generate(prompts, params, seed=0, prompt_ids=list(range(first_id, first_id + len(prompts))))


def bench_step(model, config, batch: int, prompt_len: int, new: int, bandwidth: float, chunk_steps: int,
               reps: int) -> dict:
  prompts = np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
  engine = Engine(model, slots=batch, max_seq_len=prompt_len + new, chunk_steps=chunk_steps,
                  prefill_tokens=max(4096, prompt_len * 16), prefix_cache=False)
  sampler = Sampler(model, None, max_cache_length=prompt_len + new)
  first, t = interleaved({
      "engine": engine_call(engine, prompts, [new] * batch), "engine_1": engine_call(engine, prompts, [1] * batch),
      "sampler": sampler_call(sampler, prompts, new), "sampler_1": sampler_call(sampler, prompts, 1)}, reps)
  kv_bytes = batch * (prompt_len + new / 2) * kv_bytes_per_token(config, "bfloat16")
  roofline = (param_count(config) * 2 + kv_bytes) / bandwidth
  row = dict(part="step", batch=batch, prompt=prompt_len, new=new, chunk_steps=chunk_steps,
             roofline_ms=roofline * 1e3, first_call_s={k: round(v, 1) for k, v in first.items()})
  for side in ("engine", "sampler"):
    step = (t[side] - t[f"{side}_1"]) / (new - 1)
    row.update({f"{side}_step_ms": step * 1e3, f"{side}_over_roofline": step / roofline,
                f"{side}_tok_s": batch * new / t[side]})
  row["engine_compiles"] = engine.compile_counts()
  return row


def bench_workload(model, config, lengths, chunk_steps: int, reps: int) -> dict:
  rng = np.random.default_rng(7)
  prompts = [rng.integers(3, config.vocab_size, p).tolist() for p, _ in lengths]
  answers = [a for _, a in lengths]
  engine = Engine(model, slots=STATIC_BATCH, max_seq_len=MAX_SEQ_LEN, chunk_steps=chunk_steps, prefix_cache=False)
  sampler = Sampler(model, None, max_cache_length=MAX_SEQ_LEN)
  calls = [sampler_call(sampler, prompts[s:s + STATIC_BATCH], max(answers[s:s + STATIC_BATCH]), 1.0, first_id=s)
           for s in range(0, len(prompts), STATIC_BATCH)]
  before = dict(engine.stats)
  first, t = interleaved({"engine": engine_call(engine, prompts, answers, 1.0),
                          "sampler": lambda: [call() for call in calls]}, reps)
  runs = 1 + reps
  useful = (engine.stats["decode_tokens"] - before.get("decode_tokens", 0)) / max(
      1, engine.stats["slot_steps"] - before.get("slot_steps", 0))
  tokens = sum(answers)
  return dict(part="workload", requests=len(lengths), slots=STATIC_BATCH, chunk_steps=chunk_steps, tokens=tokens,
              answer_mean=float(np.mean(answers)), answer_p99=float(np.percentile(answers, 99)),
              engine_tok_s=tokens / t["engine"], sampler_tok_s=tokens / t["sampler"],
              engine_over_sampler=t["sampler"] / t["engine"], engine_useful_slots=useful, runs_each=runs,
              first_call_s={k: round(v, 1) for k, v in first.items()}, engine_compiles=engine.compile_counts(),
              sampler_compiles=sampler.compile_counts())


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="toy sizes, any machine (checks the script runs)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--chunk-steps", type=int, default=32,
                      help="engine decode steps per jitted chunk (the host schedules between chunks)")
  parser.add_argument("--parts", default="bandwidth,step,workload")
  parser.add_argument("--lengths", help="a JSON list of [prompt, answer] token counts (from --write-lengths)")
  parser.add_argument("--write-lengths", metavar="PATH", help="write the workload's lengths here and exit")
  parser.add_argument("--out", help="also write every row as JSON lines here")
  args = parser.parse_args()
  mode = "smoke" if args.smoke else "gpu"
  batches, prompt_len, new, requests, gib = SHAPES[mode]
  if args.write_lengths:
    lengths = read_lengths(None, requests)
    if lengths is None:
      raise SystemExit(f"{TOKENIZER} or {GSM8K_TRAIN} is absent (the shared data sits beside the checkout)")
    pathlib.Path(args.write_lengths).write_text(json.dumps(lengths))
    print(f"wrote {len(lengths)} (prompt, answer) token counts to {args.write_lengths}")
    return 0
  parts = set(args.parts.split(","))
  config = SIZE[mode]
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {param_count(config) / 1e6:,.1f}M "
        f"parameters, bfloat16", flush=True)
  rows = []

  def report(row):
    row["elapsed_s"] = round(time.perf_counter() - start, 1)  # since the start: the 5-minute budget, part by part
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")

  start = time.perf_counter()
  model = build_model(config, param_dtype="bfloat16", dtype="bfloat16", seed=0)
  bandwidth = copy_bandwidth(gib)
  if "bandwidth" in parts:
    report(dict(part="bandwidth", copy_gb_s=bandwidth / 1e9))
  if "step" in parts:
    for batch in batches:
      report(bench_step(model, config, batch, prompt_len, new, bandwidth, args.chunk_steps, args.reps))
  if "workload" in parts:
    lengths = read_lengths(args.lengths, requests)
    if lengths is None:
      print(f"workload skipped: {TOKENIZER} or {GSM8K_TRAIN} is absent; pass --lengths", flush=True)
    else:
      report(bench_workload(model, config, lengths, args.chunk_steps, args.reps))
  print(f"total {time.perf_counter() - start:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
