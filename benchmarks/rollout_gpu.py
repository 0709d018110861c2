"""The rollout engine's GPU numbers in one command (< 5 minutes on one H200): the device's copy bandwidth, the
engine's decode step against the HBM roofline, and the GSM8K-length workload, in one process.

    python benchmarks/rollout_gpu.py                         # on the GPU machine
    python benchmarks/rollout_gpu.py --smoke                 # the same parts at toy sizes, on any machine
    python benchmarks/rollout_gpu.py --write-lengths F.json  # here: the workload's lengths, for a machine
                                                             # without ../shared (then --lengths F.json there)

Model: TinyLlama-1.1B's shape (22 layers, width 2048, 32 query / 4 kv heads, Llama 2 vocabulary), random
weights, bfloat16 parameters, compute and KV cache. Greedy or temperature 1, no stop tokens: every row generates
exactly its `max_new_tokens`.

Parts, every timing the median of `--reps` interleaved repetitions after a first call that compiles (reported
apart):
  * bandwidth: the best device-to-device copy, (bytes read + bytes written) / time, over a 4 GiB array;
  * step, batch 64 and 512: 128-token random prompts, greedy, NEW new tokens, the engine with `batch` slots (one
    request per slot). A decode step = (t(NEW) - t(1)) / (NEW - 1): generation minus its prefill and first token,
    per token. HBM roofline = (parameter bytes + mean KV bytes a step reads) / copy bandwidth, the mean KV bytes
    being batch x (128 + NEW / 2) x KV bytes per token. Done means step / roofline <= 1.5 at batch 64 and <= 2
    at 512;
  * workload: REQUESTS GSM8K train problems drawn at random (seed 0), each a random-token prompt of its
    question's length and exactly its reference answer's length of new tokens (both lengths with the Llama 2
    tokenizer from ../shared, or `--lengths`; a random-weight model makes only the lengths matter), temperature 1,
    through 64 slots: tokens/s, and the useful-slot fraction beside static batching's counted one (batches of 64
    in queue order, each decoding to its longest row, as `rollout_engine.py` counts it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling.engine import Engine
from rise_jax.sampling.requests import Request

# The CPU benchmark's workload (the same GSM8K draw and static-batch counts) and the shared timing.
from rollout_engine import (GSM8K_TRAIN, MAX_SEQ_LEN, STATIC_BATCH, TOKENIZER, gsm8k_workload, run_engine,
                            static_batch_counts)
from timing import interleaved, timed

SIZE = {  # TinyLlama-1.1B's shape, and a toy for --smoke
    "gpu": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                       num_kv_heads=4, head_dim=64, max_position_embeddings=2048),
    "smoke": ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=32, max_position_embeddings=2048),
}
# (batches, prompt tokens, new tokens, workload requests, copy GiB) per mode.
SHAPES = {"gpu": ((64, 512), 128, 256, 512, 4.0), "smoke": ((4, 16), 16, 12, 24, 0.05)}


def read_lengths(path: str | None, count: int) -> list[tuple[int, int]] | None:
  """The workload's lengths from `path` (written by --write-lengths), else from ../shared, else None."""
  if path:
    pairs = json.loads(pathlib.Path(path).read_text())
    if len(pairs) < count:
      raise SystemExit(f"{path}: {len(pairs)} (prompt, answer) pairs, the workload needs {count}")
    return [(int(p), int(a)) for p, a in pairs[:count]]
  if TOKENIZER.is_file() and GSM8K_TRAIN.is_file():
    return [(len(prompt), answer) for prompt, answer in gsm8k_workload(count, seed=0)]
  return None


def first_and_steady(fns: dict, reps: int) -> tuple[dict, dict]:
  """(first-call seconds, median seconds of `reps` interleaved repetitions) per function."""
  return {name: timed(fn)[0] for name, fn in fns.items()}, interleaved(fns, reps)


def copy_bandwidth(gib: float, reps: int = 10) -> float:
  """Best (read + write) bytes/s of a jitted copy of a `gib` GiB bfloat16 array."""
  x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))  # an elementwise op: one read and one write of every byte
  copy(x).block_until_ready()
  best = min(timed(lambda: copy(x).block_until_ready())[0] for _ in range(reps))
  return 2 * x.nbytes / best


def engine_call(engine: Engine, prompts, max_new: list[int]):
  requests = [Request(p, uid=i, max_new_tokens=m, temperature=0.0)
              for i, (p, m) in enumerate(zip(prompts, max_new))]
  return lambda: engine.run(requests, seed=0)


def bench_step(model, config, batch: int, prompt_len: int, new: int, bandwidth: float, chunk_steps: int,
               reps: int) -> dict:
  prompts = np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
  engine = Engine(model, slots=batch, max_seq_len=prompt_len + new, chunk_steps=chunk_steps,
                  prefill_tokens=max(4096, prompt_len * 16), prefix_cache=False)
  first, t = first_and_steady({"engine": engine_call(engine, prompts, [new] * batch),
                               "engine_1": engine_call(engine, prompts, [1] * batch)}, reps)
  kv_bytes = batch * (prompt_len + new / 2) * config.kv_bytes_per_token("bfloat16")
  roofline = (config.param_count() * 2 + kv_bytes) / bandwidth
  row = dict(part="step", batch=batch, prompt=prompt_len, new=new, chunk_steps=chunk_steps,
             roofline_ms=roofline * 1e3, first_call_s={k: round(v, 1) for k, v in first.items()})
  step = (t["engine"] - t["engine_1"]) / (new - 1)
  row.update(step_ms=step * 1e3, step_over_roofline=step / roofline, tok_s=batch * new / t["engine"],
             compiles=engine.compile_counts())
  return row


def bench_workload(model, config, lengths, chunk_steps: int, reps: int) -> dict:
  rng = np.random.default_rng(7)  # random prompts of the drawn lengths: a random-weight model reads only lengths
  workload = [(rng.integers(3, config.vocab_size, p).tolist(), answer) for p, answer in lengths]
  engine = Engine(model, slots=STATIC_BATCH, max_seq_len=MAX_SEQ_LEN, chunk_steps=chunk_steps, prefix_cache=False)
  run = lambda: run_engine(engine, workload)
  first, counts = timed(run)  # the first call compiles; its slot counts are every run's
  t = interleaved({"engine": run}, reps)["engine"]
  static = static_batch_counts(workload)
  answers = [answer for _, answer in lengths]
  tokens = sum(answers)
  return dict(part="workload", requests=len(lengths), slots=STATIC_BATCH, chunk_steps=chunk_steps, tokens=tokens,
              answer_mean=float(np.mean(answers)), answer_p99=float(np.percentile(answers, 99)),
              tok_s=tokens / t, first_call_s=round(first, 1),
              useful_slots=counts["decode_tokens"] / counts["slot_steps"],
              static_useful_slots_counted=static["decode_tokens"] / static["slot_steps"],
              compiles=engine.compile_counts())


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
  print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); {config.param_count() / 1e6:,.1f}M "
        f"parameters, bfloat16", flush=True)

  def report(row):
    row["elapsed_s"] = round(time.perf_counter() - start, 1)  # since the start: the 5-minute budget, part by part
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
