"""The optimiser recipe, its learning-rate schedule, and analytic training FLOPs (for TFLOP/s and MFU).

Reference recipe (the RISE release's FastChat/DeepSpeed run): AdamW (0.9, 0.999, 1e-8), peak lr 1e-5, linear
warmup over the first 4% of steps from 0, cosine decay to 0, weight decay 0, no gradient clipping.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rise_jax.config import MOMENTS_DTYPES

# Dense peak FLOP/s per device (bf16) for the accelerators we know; MFU is reported only when the peak is known.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def schedule(lr: float, warmup_ratio: float, total_steps: int) -> optax.Schedule:
  """0 -> lr linearly over ceil(warmup_ratio * total) steps, then cosine to 0 at `total_steps`."""
  warmup = math.ceil(warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), 0.0)


def optimizer(train_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the config's betas/eps/decay, optional global-norm clipping (None = the reference: none), and
  the moments stored in `train_cfg.moments_dtype` (float32 unless asked)."""
  lr = schedule(train_cfg.lr, train_cfg.warmup_ratio, total_steps)
  adamw = optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay)
  adamw = stored_in(adamw, getattr(train_cfg, "moments_dtype", "float32"))
  if train_cfg.max_grad_norm is not None:
    return optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), adamw), lr
  return adamw, lr


class StoredState(NamedTuple):
  inner: Any               # the wrapped transformation's state, floating arrays in the storage dtype
  count: jax.Array         # int32 updates so far: keys the stochastic rounding (runs stay reproducible)


def _hash32(x: jax.Array) -> jax.Array:
  """A 32-bit integer mix (lowbias32): elementwise ops only, so it fuses into the optimiser update; a
  `jax.random.bits` array per moment materialised (7B: 25 GiB of noise beside 50 GiB of widened moments)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def stochastic_round_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
  """float32 -> bfloat16, rounding up or down with probability by distance (unbiased). Round-to-nearest loses
  every increment below half a bf16 step: Adam's nu moves by (1 - b2) = 0.1% of itself, under bf16's 0.4%.
  `seed` (uint32 scalar) picks the noise; each element hashes its index with it."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  index = lax.iota(jnp.uint32, x.size).reshape(x.shape)
  noise = _hash32(index ^ _hash32(seed.astype(jnp.uint32))) & jnp.uint32(0xFFFF)
  return lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32).astype(jnp.bfloat16)


def stored_in(inner: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
  """`inner` computing in float32 but keeping its floating state (Adam's mu and nu) in `dtype`.

  bfloat16 halves the optimiser state (8 -> 4 bytes per parameter), rounding stochastically on every store. The
  trade-off (tests/test_train_memory.py): the moments carry ~3 significant digits, so each update is noisier
  than float32's; over a short run the losses stay close.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return inner
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"train.moments_dtype: {dtype!r} is not one of {list(MOMENTS_DTYPES)}")
  is_moment = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0

  def init(params):
    state = inner.init(params)  # params may be optax's placeholder (tree_map_params): only arrays are cast
    return StoredState(jax.tree.map(lambda x: x.astype(jnp.bfloat16) if is_moment(x) else x, state),
                       jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    wide = jax.tree.map(lambda x: x.astype(jnp.float32) if is_moment(x) else x, state.inner)
    updates, new = inner.update(updates, wide, params)
    leaves, treedef = jax.tree.flatten(new)
    seed = state.count.astype(jnp.uint32) * jnp.uint32(len(leaves))
    leaves = [stochastic_round_bf16(x, seed + jnp.uint32(i)) if is_moment(x) else x
              for i, x in enumerate(leaves)]
    return updates, StoredState(jax.tree.unflatten(treedef, leaves), state.count + 1)

  return optax.GradientTransformation(init, update)


def check_param_dtypes(params, allow_bf16: bool) -> None:
  """bf16 parameters at lr 1e-5 round most AdamW updates away: refuse them unless explicitly allowed."""
  low = sorted({str(x.dtype) for x in jax.tree.leaves(params) if jnp.dtype(x.dtype).itemsize < 4 and
                jnp.issubdtype(x.dtype, jnp.floating)})
  if low and not allow_bf16:
    raise ValueError(f"training parameters are {low}: updates of ~lr * 1 are below bfloat16's resolution for most "
                     "weights; use model.param_dtype='float32' (compute can stay bfloat16 via model.dtype) or set "
                     "train.allow_bf16_params=True to insist")


def train_flops_per_token(model_config, seq_len: int) -> float:
  """Analytic FLOPs to train on one token (forward + backward = 3x forward), MaxText-style.

  Every matmul weight counts 2 FLOPs per token forward (embedding lookup is free, the unembedding is a matmul);
  attention scores and the weighted sum of values add 2 * 2 * heads * head_dim per attended key, and with a
  causal mask a token attends to (seq_len + 1) / 2 keys on average: causal attention counted once, not twice.
  """
  c = model_config
  d, hd = c.hidden_size, c.head_dim
  attn_proj = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads)           # q, o and k, v
  mlp = 3 * d * c.intermediate_size                                      # gate, up, down
  matmul_params = c.num_layers * (attn_proj + mlp) + d * c.vocab_size
  attention = c.num_layers * 4 * c.num_heads * hd * (seq_len + 1) / 2
  return 3 * (2 * matmul_params + attention)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Known dense bf16 peak of `device` (None for CPUs and unknown kinds)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  return None
