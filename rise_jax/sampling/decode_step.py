"""One decode step (one token per row): in-place cache writes on per-layer head-major caches, per-layer weights.

Why not `model.hidden(..., cache=...)`: measured on CPU, XLA copies data every decode step there, so a step cost
grew with the cache and with the stacked weights instead of reading each weight once:
  * the contract cache layout [layers, batch, slots, kv_heads, head_dim] makes every layer's cache be sliced
    out, scattered, written back and transposed for the attention dot each step (3M model, batch 32, 128 slots:
    41 ms/step; here 6.6 ms). The decode loop splits the cache once per generate call into one
    [batch, kv_heads, slots, head_dim] array per layer (`to_decode_layout`), scatters each new key/value straight
    into it (in place inside the while loop) and stacks it back at the end. Per-layer arrays, not one stacked
    array indexed by layer: XLA's CPU dot fusions copy a dynamically indexed layer out every step (toy model,
    2,048 rows, 320 slots: 4 copies of 168 MB per step);
  * with one query per row, attention scores as a batched dot run as thousands of [groups x d] @ [d x slots]
    products, 2-3x slower on CPU than a multiply-and-reduce that streams the cache once (toy model, 2,048 rows,
    320 slots: 280 -> 68 ms per step with both changes, `benchmarks/sampler_calls.py`);
  * slicing layer i out of the stacked [layers, ...] weights inside the loop copies the slice every step
    (110M model, batch 1: 90 ms/step against a 24 ms matmul floor). `split_layers` slices them once per
    generate call, before the loop (29 ms/step). Cost: a transient second copy of the layer weights while a
    generate call runs (counted by `plan`).
Same weights, same math as `Transformer.hidden`; the sampler's tests hold it to transformers' `generate` token for
token. Prefill (`loop.extend`) uses `model.hidden`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rise_jax.models.transformer import KVCache, apply_rope, rms_norm, rope_inv_freq


def to_decode_layout(cache: KVCache) -> KVCache:
  """k, v as tuples of per-layer [batch, kv_heads, slots, head_dim] arrays (the layout the decode step reads)."""
  split = lambda x: tuple(jnp.transpose(x[i], (0, 2, 1, 3)) for i in range(x.shape[0]))
  return cache.replace(k=split(cache.k), v=split(cache.v))


def from_decode_layout(cache: KVCache) -> KVCache:
  """The contract layout [layers, batch, slots, kv_heads, head_dim] back from `to_decode_layout`'s."""
  stack = lambda xs: jnp.stack([jnp.transpose(x, (0, 2, 1, 3)) for x in xs])
  return cache.replace(k=stack(cache.k), v=stack(cache.v))


def split_layers(model) -> list[dict[str, jax.Array]]:
  """Per-layer weight arrays, sliced once before the decode loop (see the module docstring)."""
  stacked = {name: p[...] for name, p in model.layers.items()}
  return [{name: value[i] for name, value in stacked.items()} for i in range(model.config.num_layers)]


def decode_hidden(model, tokens: jax.Array, active: jax.Array, cache: KVCache,
                  layers: list[dict[str, jax.Array]]) -> tuple[jax.Array, KVCache]:
  """Feed `tokens[b]` at position `cache.end_index[b]` (slot == position) for active rows.

  `cache` is in the decode layout (`to_decode_layout`). Inactive rows write an empty slot (position -1, never
  attended) and keep their end_index. Returns the final normed hidden states [batch, d] (float32) and the cache.
  """
  c = model.config
  dtype = model.dtype
  batch = tokens.shape[0]
  rows = jnp.arange(batch)
  slot = cache.end_index
  position = jnp.where(active, slot, -1)
  k_pos = cache.positions.at[rows, slot].set(position)
  visible = (k_pos >= 0) & (k_pos <= position[:, None])
  if c.sliding_window is not None:
    visible &= position[:, None] - k_pos < c.sliding_window
  inv_freq = rope_inv_freq(c)
  groups = c.num_heads // c.num_kv_heads
  rope = lambda x: apply_rope(x[:, None], position[:, None], inv_freq)[:, 0]

  x = jnp.take(model.embedder[...], tokens, axis=0).astype(dtype)

  def layer(x, k_cache, v_cache, w):
    w = {name: value.astype(dtype) for name, value in w.items()}
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps, dtype)
    q = rope(jnp.einsum("bd,dhk->bhk", h, w["q_proj"]))
    k = rope(jnp.einsum("bd,dhk->bhk", h, w["k_proj"]))
    v = jnp.einsum("bd,dhk->bhk", h, w["v_proj"])
    k_cache = k_cache.at[rows, :, slot].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[rows, :, slot].set(v.astype(v_cache.dtype))
    q = q.reshape(batch, c.num_kv_heads, groups, c.head_dim).astype(jnp.float32)
    # One query per row: multiply-and-reduce reads the cache once; as a batched dot it was 2-3x slower on CPU.
    scores = jnp.sum(q[:, :, :, None, :] * k_cache[:, :, None].astype(jnp.float32), axis=-1)
    scores = jnp.where(visible[:, None, None, :], scores * c.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(-1)[:, None, None, None], probs, 0.0)
    out = jnp.sum(probs[..., None] * v_cache[:, :, None].astype(jnp.float32), axis=-2).astype(dtype)
    out = out.reshape(batch, c.num_heads, c.head_dim)
    x = x + jnp.einsum("bhk,hkd->bd", out, w["o_proj"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps, dtype)
    gate = jnp.einsum("bd,df->bf", h, w["gate_proj"])
    up = jnp.einsum("bd,df->bf", h, w["up_proj"])
    x = x + jnp.einsum("bf,fd->bd", jax.nn.silu(gate) * up, w["down_proj"])
    return x, k_cache, v_cache

  k_all, v_all = list(cache.k), list(cache.v)
  for i, w in enumerate(layers):
    x, k_all[i], v_all[i] = layer(x, k_all[i], v_all[i], w)
  hidden = rms_norm(x, model.final_norm[...], c.rms_norm_eps, jnp.float32)
  end = jnp.where(active, slot + 1, slot).astype(jnp.int32)
  return hidden, KVCache(k=tuple(k_all), v=tuple(v_all), positions=k_pos, end_index=end)
