"""Training-step throughput: rise_jax's jitted step vs a transformers + torch AdamW step, side by side.

Same architecture (Llama), size, batch, sequence and dtype on both sides; steps are interleaved (one rise_jax
step, one torch step, ...) so machine noise hits both alike; medians are reported with the ratio. rise_jax's MFU
is measured against the f32 matmul peak this script measures on the same device (on an accelerator with a known
peak, against that too). `--bf16` also times bfloat16 compute (rise_jax: model.dtype=bfloat16 with float32
parameters; torch: autocast) — reported, no target.

    python benchmarks/train_step.py --size tiny --batch 8 --seq 256
    python benchmarks/train_step.py --size 100m --batch 1 --seq 512 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax import sharding as sharding_lib
from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig, get_preset
from rise_jax.train import optim
from rise_jax.train import trainer as trainer_lib

SIZES = {
    # The toy experiment's 0.43M-parameter char-level model (configs/toy.py).
    "toy": get_preset("toy-llama").config,
    # ~3M parameters (2.1M of them embeddings).
    "tiny": ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=4, head_dim=32),
    # ~106M parameters: Llama 2's vocabulary, 8 layers of width 768.
    "100m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                        num_kv_heads=12, head_dim=64),
    # ~1.2B parameters (for an accelerator).
    "1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, head_dim=64),
}


@dataclasses.dataclass
class RecipeCfg:
  lr: float = 1e-5
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  max_grad_norm: float | None = None
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  moments_dtype: str = "float32"


def num_params(c: ModelConfig) -> int:
  per_layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * \
      c.intermediate_size + 2 * c.hidden_size
  return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
  """Best sustained FLOP/s of an n x n x n jnp matmul on the default device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def jax_step(c: ModelConfig, batch: int, seq: int, dtype: str, seed: int = 0, recipe: RecipeCfg | None = None,
             **model_options):
  """A rise_jax train step (one micro-batch, every target trained, weight 1) as a zero-argument callable.
  `model_options`: attention, remat, scan_layers (build_model's)."""
  mesh = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = build_model(c, mesh=mesh, dtype=dtype, seed=seed, **model_options)
  tx, lr = optim.optimizer(recipe or RecipeCfg(), 1000)
  trainer = trainer_lib.Trainer(model, mesh, tx, lr)
  holder = {"state": trainer.initial_state(model, seed)}
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, c.vocab_size, (1, batch, seq + 1)).astype(np.int32)
  arrays = {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
            "segment_ids": np.ones((1, batch, seq), np.int32),
            "weights": np.full((1, batch, seq), 1.0 / seq, np.float32)}  # sample_mean: w_e / n_e
  device_batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in arrays.items()}
  normalizer = jnp.float32(batch)

  def step():
    with jax.set_mesh(mesh):
      holder["state"], metrics = trainer.step(holder["state"], device_batch, normalizer)
    return float(metrics["loss"])  # fetching the loss waits for the step

  return step, ids


def torch_step(c: ModelConfig, ids: np.ndarray, bf16: bool, device: str = "cpu"):
  """The same step in transformers + torch: Llama forward, per-example mean NLL, backward, AdamW (fused on
  CUDA; attention through torch's sdpa)."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                 intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                 num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                 head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                                 max_position_embeddings=max(4096, ids.shape[-1]), tie_word_embeddings=False,
                                 attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          fused=device == "cuda")
  x = torch.tensor(ids[0, :, :-1], dtype=torch.long, device=device)
  y = torch.tensor(ids[0, :, 1:], dtype=torch.long, device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      logits = model(input_ids=x).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    loss = nll.view(y.shape).mean(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return step


def interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--bf16", action="store_true", help="also time bfloat16 compute on both sides")
  parser.add_argument("--no_torch", action="store_true", help="rise_jax only (e.g. on a GPU without torch CUDA)")
  args = parser.parse_args()
  c = SIZES[args.size]
  tokens = args.batch * args.seq
  flops_per_step = optim.train_flops_per_token(c, args.seq) * tokens
  peak32 = matmul_peak(jnp.float32)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model {args.size}: "
        f"{num_params(c) / 1e6:.1f}M params; batch {args.batch} x seq {args.seq}; "
        f"{flops_per_step / 1e12:.3f} TFLOP/step (analytic)")
  print(f"measured f32 matmul peak: {peak32 / 1e9:.1f} GFLOP/s")
  known = optim.device_peak_flops()
  variants = [("float32", False)] + ([("bfloat16", True)] if args.bf16 else [])
  for dtype, bf16 in variants:
    step, ids = jax_step(c, args.batch, args.seq, dtype)
    fns = {"rise_jax": step}
    if not args.no_torch:
      fns["torch"] = torch_step(c, ids, bf16)
    times = interleaved(fns, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = [f"[{dtype}] rise_jax {tokens / med['rise_jax']:.0f} tok/s (median {med['rise_jax'] * 1e3:.0f} ms)"]
    if "torch" in med:
      line.append(f"torch {tokens / med['torch']:.0f} tok/s (median {med['torch'] * 1e3:.0f} ms)")
      line.append(f"ratio rise_jax/torch {med['torch'] / med['rise_jax']:.2f}x")
    achieved = flops_per_step / med["rise_jax"]
    line.append(f"rise_jax {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak32:.0f}% of measured f32 matmul peak")
    if known is not None:
      line.append(f"MFU {100 * achieved / known:.1f}% of {known / 1e12:.0f} TFLOP/s bf16 peak")
    print("; ".join(line), flush=True)
    print("  per-repeat seconds: " + "; ".join(f"{k}: {', '.join(f'{t:.3f}' for t in v)}"
                                               for k, v in times.items()))


if __name__ == "__main__":
  main()
