"""rise_jax's sampler vs transformers `generate`, side by side on the same random model, plus measured rooflines.

    python benchmarks/sampler.py                 # CPU suite: tiny / ~100M models, batch 1/8/32, RISE workload
    python benchmarks/sampler.py --only tiny     # one part: tiny | base | batch1 | rise | gpu
    python benchmarks/sampler.py --only gpu      # ~1B random model, bfloat16, batch 64 (rise_jax only)

Both sides run float32 with the same weights (a random transformers LlamaForCausalLM saved and loaded into
rise_jax), the same prompts, greedy decoding, no stop tokens (every row generates exactly `max_new_tokens`),
`torch.set_num_threads(os.cpu_count())`. Repetitions are interleaved (ours, theirs, ours, ...) and medians
reported, because the machine may be shared: ratios within one run are meaningful, absolute times less so.
On a loaded machine torch's thread pool with every core is much slower than one thread (busy-waiting workers),
so transformers is also timed with one thread and the ratio against the faster of the two is reported too; the
RISE-workload reference runs with one thread only (with all cores it took 5 minutes here).

Rooflines measured here, not assumed:
  * matmul floor: the weight matmuls of one decode step at batch B (every layer's q/k/v/o/gate/up/down and the
    unembedding), jitted alone with the same shapes — what a perfect decode step cannot beat on this machine;
  * read-bandwidth bound (batch 1): parameter bytes / the best `x.sum()` bandwidth over a 1 GiB array.
A decode step's time is (t(max_new = N) - t(max_new = 1)) / (N - 1): generate minus its prefill, per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.models import ModelConfig, load_hf_checkpoint
from rise_jax.sampling import Sampler, SamplingParams

SIZES = {
    # ~3M parameters: per-step overhead dominates.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4,
                        num_kv_heads=4, head_dim=48, max_position_embeddings=2048),
    # ~110M parameters: weight matmuls dominate.
    "base": ModelConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                        num_kv_heads=12, head_dim=64, max_position_embeddings=2048),
    # ~0.85B parameters (GPU): TinyLlama's width with 16 layers and 8 kv heads.
    "1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, max_position_embeddings=4096),
}


def make_models(config: ModelConfig, directory: str, dtype="float32", with_torch=True):
  """(torch model or None, rise_jax model) with identical random weights."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(config.to_hf()).eval()
  hf.save_pretrained(directory)
  return (hf if with_torch else None), load_hf_checkpoint(directory, dtype=dtype)


def median_time(fn, reps):
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def interleaved(fns: dict, reps: int) -> dict:
  """Median wall time of each callable, repetitions interleaved across callables."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def hf_generate(model, prompts: np.ndarray, max_new: int, threads: int | None = None):
  import torch
  torch.set_num_threads(threads or os.cpu_count())
  ids = torch.as_tensor(prompts)
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
  assert out.shape[1] == prompts.shape[1] + max_new
  return out


def ours_generate(sampler: Sampler, prompts, max_new: int):
  outs = sampler.generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=[]))
  assert all(len(o[0].token_ids) == max_new for o in outs)
  return outs


def matmul_floor(config: ModelConfig, batch: int, dtype=jnp.float32, reps: int = 20) -> float:
  """Seconds for the weight matmuls of one decode step at `batch`, jitted alone."""
  c = config
  rng = np.random.default_rng(0)
  d, hd = c.hidden_size, c.head_dim
  shapes = [(d, c.num_heads * hd), (d, c.num_kv_heads * hd), (d, c.num_kv_heads * hd), (c.num_heads * hd, d),
            (d, c.intermediate_size), (d, c.intermediate_size), (c.intermediate_size, d)]
  weights = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02, dtype) for s in shapes]
             for _ in range(c.num_layers)]
  head = jnp.asarray(rng.standard_normal((d, c.vocab_size), np.float32) * 0.02, dtype)
  x = jnp.asarray(rng.standard_normal((batch, d), np.float32), dtype)

  @jax.jit
  def step(x, weights, head):
    kv = []  # returned, so the k / v projections are not dead code
    for q, k, v, o, g, u, dn in weights:
      kv += [x @ k, x @ v]
      x = x + (x @ q) @ o
      x = x + ((x @ g) * (x @ u)) @ dn
    return x @ head, kv

  run = lambda: jax.block_until_ready(step(x, weights, head))
  run()
  return min(median_time(run, 3) for _ in range(max(1, reps // 3)))


def read_bandwidth(gib: float = 1.0, reps: int = 10) -> float:
  """Best bytes/s of a jitted float32 `x.sum()` over a `gib` GiB array."""
  x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = min(median_time(lambda: f(x).block_until_ready(), 1) for _ in range(reps))
  return x.nbytes / best


def bench_decode(name: str, config: ModelConfig, batches, prompt_len: int, max_new: int, reps: int, workdir: str,
                 bandwidth: float | None = None):
  hf, model = make_models(config, os.path.join(workdir, name))
  rng = np.random.default_rng(1)
  rows = []
  for batch in batches:
    sampler = Sampler(model, None, max_cache_length=prompt_len + max_new)
    prompts = rng.integers(3, config.vocab_size, (batch, prompt_len))
    prompt_list = prompts.tolist()
    ours_generate(sampler, prompt_list, max_new)  # compile both buckets before timing
    ours_generate(sampler, prompt_list, 1)
    hf_generate(hf, prompts, 2)
    t = interleaved({"ours": lambda: ours_generate(sampler, prompt_list, max_new),
                     "hf": lambda: hf_generate(hf, prompts, max_new),
                     "hf_1thread": lambda: hf_generate(hf, prompts, max_new, threads=1),
                     "ours_prefill": lambda: ours_generate(sampler, prompt_list, 1)}, reps)
    tokens = batch * max_new
    step = (t["ours"] - t["ours_prefill"]) / (max_new - 1)
    floor = matmul_floor(config, batch)
    row = dict(model=name, params=config.param_count(), batch=batch, prompt=prompt_len, new=max_new,
               ours_tok_s=tokens / t["ours"], hf_tok_s=tokens / t["hf"], hf_1thread_tok_s=tokens / t["hf_1thread"],
               ratio=t["hf"] / t["ours"], ratio_vs_best_hf=min(t["hf"], t["hf_1thread"]) / t["ours"],
               step_ms=step * 1e3, matmul_floor_ms=floor * 1e3, step_over_floor=step / floor)
    if bandwidth is not None:
      bound = config.param_count() * 4 / bandwidth
      row.update(bw_bound_ms=bound * 1e3, step_over_bw=step / bound)
    print(row, flush=True)
    rows.append(row)
  return rows


def bench_rise(config: ModelConfig, conversations: int, turns: int, max_new: int, reps: int, workdir: str):
  """64 conversations x 5 turns, each turn appending feedback: continuation vs re-generate per turn (HF)."""
  hf, model = make_models(config, os.path.join(workdir, "rise"))
  rng = np.random.default_rng(2)
  questions = [rng.integers(3, config.vocab_size, int(rng.integers(40, 80))).tolist() for _ in range(conversations)]
  feedback = [rng.integers(3, config.vocab_size, 12).tolist() for _ in range(turns)]
  params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=[])
  sampler = Sampler(model, None, max_cache_length=1024)

  def ours():
    prompts, history = questions, None
    for t in range(turns):
      outs = sampler.generate(prompts, params, prompt_ids=list(range(conversations)), history=history)
      history = [o[0].conversation for o in outs]
      prompts = [p + o[0].token_ids + feedback[t] for p, o in zip(prompts, outs)]
    return prompts

  def reference():
    finals = []
    for q in questions:  # one conversation at a time, the whole history re-generated every turn
      ids = q
      for t in range(turns):
        out = hf_generate(hf, np.asarray([ids]), max_new, threads=1)
        ids = out[0].tolist() + feedback[t]
      finals.append(ids)
    return finals

  ours()  # compile every bucket the workload uses
  t = interleaved({"ours": ours, "reference": reference}, reps)
  tokens = conversations * turns * max_new
  row = dict(workload=f"{conversations} conversations x {turns} turns x {max_new} new tokens",
             ours_s=t["ours"], reference_s=t["reference"], ours_tok_s=tokens / t["ours"],
             reference_tok_s=tokens / t["reference"], ratio=t["reference"] / t["ours"],
             reprefill_rows=sampler.stats["reprefill_rows"])
  print(row, flush=True)
  return row


def bench_gpu(workdir: str, batch: int = 64, prompt_len: int = 128, max_new: int = 256, reps: int = 3):
  config = SIZES["1b"]
  _, model = make_models(config, os.path.join(workdir, "1b"), dtype="bfloat16", with_torch=False)
  sampler = Sampler(model, None, max_cache_length=prompt_len + max_new)
  prompts = np.random.default_rng(3).integers(3, config.vocab_size, (batch, prompt_len)).tolist()
  ours_generate(sampler, prompts, max_new)
  t = median_time(lambda: ours_generate(sampler, prompts, max_new), reps)
  row = dict(model="1b", params=config.param_count(), dtype="bfloat16", batch=batch, new=max_new,
             device=str(jax.devices()[0]), tok_s=batch * max_new / t)
  print(row, flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", choices=["tiny", "base", "batch1", "rise", "gpu"], action="append")
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  parts = args.only or ["tiny", "base", "batch1", "rise"]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    if "tiny" in parts:
      bench_decode("tiny", SIZES["tiny"], [8, 32], prompt_len=32, max_new=32, reps=args.reps, workdir=workdir)
    if "base" in parts:
      bench_decode("base", SIZES["base"], [8, 32], prompt_len=32, max_new=16, reps=args.reps, workdir=workdir)
    if "batch1" in parts:
      bw = read_bandwidth()
      print(dict(read_bandwidth_gb_s=bw / 1e9), flush=True)
      bench_decode("base", SIZES["base"], [1], prompt_len=32, max_new=16, reps=args.reps, workdir=workdir,
                   bandwidth=bw)
    if "rise" in parts:
      bench_rise(SIZES["tiny"], conversations=64, turns=5, max_new=16, reps=1, workdir=workdir)
    if "gpu" in parts:
      bench_gpu(workdir)


if __name__ == "__main__":
  main()
