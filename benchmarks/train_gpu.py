"""The training table on one GPU, rise_jax beside transformers + torch, in one command (< 5 minutes):

    python benchmarks/train_gpu.py                 # on the GPU machine; prints a markdown table
    python benchmarks/train_gpu.py --smoke         # the same rows at toy sizes, on any machine (CPU check)

Rows: the TinyLlama-shaped 1.1B (float32 parameters + AdamW, bfloat16 compute, batch 8 x 1,024, random tokens, no
remat) with `attention="auto"` (cuDNN on an NVIDIA GPU) and `"xla"`, transformers + torch (eager, sdpa, fused
AdamW, autocast), and the Llama-2-7B shape at batch 4 x 1,024 with bf16 Adam moments, `scan_layers` and
`remat="full"` (`--more` adds `remat="dots_with_no_batch_dims"`). Each row runs in its own process so peak memory
is its own (`memory_stats()['peak_bytes_in_use']` without preallocation; `torch.cuda.max_memory_allocated()`);
MFU is the analytic FLOPs (`optim.train_flops_per_token`, the same for both sides) over the bf16 matmul peak
measured on the same GPU (best of 10 8192^3 matmuls), and over the datasheet peak when the device is known.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, size, batch, seq, side, options)
ROWS = [
    ("rise_jax, attention=auto", "1b", 8, 1024, "jax", dict(attention="auto")),
    ("transformers + torch (eager, sdpa, fused AdamW, autocast)", "1b", 8, 1024, "torch", {}),
    ("rise_jax, attention=xla", "1b", 8, 1024, "jax", dict(attention="xla")),
    ("rise_jax 7B, remat=full, bf16 moments", "7b", 4, 1024, "jax",
     dict(attention="auto", remat="full", scan_layers=True, moments="bfloat16")),
]
MORE = [("rise_jax 7B, remat=dots_with_no_batch_dims, bf16 moments", "7b", 4, 1024, "jax",
         dict(attention="auto", remat="dots_with_no_batch_dims", scan_layers=True, moments="bfloat16"))]
SMOKE = {"1b": "tiny", "7b": "tiny"}


def _config(size: str):
  sys.path.insert(0, HERE)
  from train_memory import SIZES
  from train_step import SIZES as SPEED_SIZES
  return {**SPEED_SIZES, **SIZES}[size]


def child(args) -> dict:
  """One row, in this process: warm up, time `--steps` steps, report tok/s and peak memory."""
  import numpy as np
  sys.path.insert(0, HERE)
  from train_step import RecipeCfg, jax_step, torch_step
  opts = json.loads(args.options)
  c = _config(args.size)
  tokens = args.batch * args.seq
  if args.side == "torch":
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = np.random.default_rng(0).integers(3, c.vocab_size, (1, args.batch, args.seq + 1)).astype(np.int32)
    step = torch_step(c, ids, bf16=True, device=device)
    peak = lambda: torch.cuda.max_memory_allocated() if device == "cuda" else None
  else:
    import jax
    moments = opts.pop("moments", "float32")
    step, _ = jax_step(c, args.batch, args.seq, "bfloat16", recipe=RecipeCfg(moments_dtype=moments), **opts)
    peak = lambda: (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  t = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t
  step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return {"tok_s": tokens / med, "step_s": med, "first_step_s": compile_s, "peak_bytes": peak()}


def matmul_peak_child() -> dict:
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, HERE)
  from train_step import matmul_peak
  from rise_jax.train import optim
  n = 8192 if jax.default_backend() == "gpu" else 1024
  return {"bf16_peak": matmul_peak(jnp.bfloat16, n=n, repeats=10), "device": jax.devices()[0].device_kind,
          "datasheet": optim.device_peak_flops()}


def run_child(argv: list[str], timeout: int) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=os.pathsep.join(
      [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  try:
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  for line in reversed(out.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="toy sizes (any machine): checks the script runs")
  parser.add_argument("--more", action="store_true", help="also the 7B dots_with_no_batch_dims row")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--child", choices=["jax", "torch", "peak"], help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    args.side = args.child
    print(json.dumps(matmul_peak_child() if args.child == "peak" else child(args)), flush=True)
    return

  from rise_jax.train import optim
  peak = run_child(["--child", "peak"], 120)
  print(f"device: {peak.get('device')}; measured bf16 matmul peak "
        f"{peak.get('bf16_peak', float('nan')) / 1e12:.0f} TFLOP/s", flush=True)
  print("| side | model | batch x seq | tok/s | of measured bf16 matmul peak | of datasheet | peak memory | "
        "first step |\n|---|---|---|---|---|---|---|---|", flush=True)
  for label, size, batch, seq, side, opts in ROWS + (MORE if args.more else []):
    if args.smoke:
      size, batch, seq = SMOKE[size], 2, 64
    argv = ["--child", side, "--size", size, "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps),
            "--options", json.dumps(opts)]
    r = run_child(argv, 240)
    if "error" in r:
      print(f"| {label} | {size} | {batch} x {seq} | failed: {r['error']} | | | | |", flush=True)
      continue
    flops = optim.train_flops_per_token(_config(size), seq) * r["tok_s"]
    mfu = f"{100 * flops / peak['bf16_peak']:.0f}%" if "bf16_peak" in peak else "-"
    sheet = f"{100 * flops / peak['datasheet']:.0f}%" if peak.get("datasheet") else "-"
    mem = f"{r['peak_bytes'] / 2 ** 30:.1f} GiB" if r["peak_bytes"] else "-"
    print(f"| {label} | {size} | {batch} x {seq} | {r['tok_s']:,.0f} | {mfu} | {sheet} | {mem} | "
          f"{r['first_step_s']:.0f} s |", flush=True)


if __name__ == "__main__":
  main()
