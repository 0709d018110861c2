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


def attend_one_query(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array, dtype,
                     head_major: bool) -> jax.Array:
  """Attention of one query per row: q [b, kv_heads, groups, d], visible [b, t] -> [b, kv_heads, groups, d].

  keys / values are [b, kv_heads, t, d] (`head_major`, the contiguous decode layout) or [b, t, kv_heads, d] (the
  paged pool's gathered blocks). Multiply-and-reduce streams the cache once; as a batched dot it was 2-3x slower
  on CPU. A row with no visible key returns zeros.
  """
  q = q.astype(jnp.float32)
  if head_major:
    scores = jnp.sum(q[:, :, :, None, :] * keys[:, :, None].astype(jnp.float32), axis=-1)  # [b, kv, g, t]
    key_axis, shown = 3, visible[:, None, None, :]
  else:
    scores = jnp.sum(q[:, None] * keys[:, :, :, None].astype(jnp.float32), axis=-1)  # [b, t, kv, g]
    key_axis, shown = 1, visible[:, :, None, None]
  scores = jnp.where(shown, scores * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=key_axis)
  probs = jnp.where(visible.any(-1)[:, None, None, None], probs, 0.0)
  if head_major:
    return jnp.sum(probs[..., None] * values[:, :, None].astype(jnp.float32), axis=-2).astype(dtype)
  return jnp.sum(probs[..., None] * values[:, :, :, None].astype(jnp.float32), axis=1).astype(dtype)


def decode_layers(model, tokens: jax.Array, position: jax.Array, layers: list[dict[str, jax.Array]], kv: list,
                  attend) -> tuple[jax.Array, list]:
  """The single-token layer stack shared by the contiguous and the paged (rollout engine) caches.

  `tokens[b]` sits at `position[b]`; `attend(q, k, v, kv[i])` -> (out [b, kv_heads, groups, d], new kv[i]) writes
  the new key/value into layer i's cache and attends over it (q, k already rotated). Returns the final normed
  hidden states [b, d] (float32) and the per-layer caches.
  """
  c = model.config
  dtype = model.dtype
  batch = tokens.shape[0]
  inv_freq = rope_inv_freq(c)
  groups = c.num_heads // c.num_kv_heads
  rope = lambda x: apply_rope(x[:, None], position[:, None], inv_freq)[:, 0]
  x = jnp.take(model.embedder[...], tokens, axis=0).astype(dtype)
  kv = list(kv)
  for i, w in enumerate(layers):
    w = {name: value.astype(dtype) for name, value in w.items()}
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps, dtype)
    q = rope(jnp.einsum("bd,dhk->bhk", h, w["q_proj"]))
    k = rope(jnp.einsum("bd,dhk->bhk", h, w["k_proj"]))
    v = jnp.einsum("bd,dhk->bhk", h, w["v_proj"])
    out, kv[i] = attend(q.reshape(batch, c.num_kv_heads, groups, c.head_dim), k, v, kv[i])
    x = x + jnp.einsum("bhk,hkd->bd", out.reshape(batch, c.num_heads, c.head_dim), w["o_proj"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps, dtype)
    gate = jnp.einsum("bd,df->bf", h, w["gate_proj"])
    up = jnp.einsum("bd,df->bf", h, w["up_proj"])
    x = x + jnp.einsum("bf,fd->bd", jax.nn.silu(gate) * up, w["down_proj"])
  return rms_norm(x, model.final_norm[...], c.rms_norm_eps, jnp.float32), kv


def decode_hidden(model, tokens: jax.Array, active: jax.Array, cache: KVCache,
                  layers: list[dict[str, jax.Array]]) -> tuple[jax.Array, KVCache]:
  """Feed `tokens[b]` at position `cache.end_index[b]` (slot == position) for active rows.

  `cache` is in the decode layout (`to_decode_layout`). Inactive rows write an empty slot (position -1, never
  attended) and keep their end_index. Returns the final normed hidden states [batch, d] (float32) and the cache.
  """
  c = model.config
  dtype = model.dtype
  rows = jnp.arange(tokens.shape[0])
  slot = cache.end_index
  position = jnp.where(active, slot, -1)
  k_pos = cache.positions.at[rows, slot].set(position)
  visible = (k_pos >= 0) & (k_pos <= position[:, None])
  if c.sliding_window is not None:
    visible &= position[:, None] - k_pos < c.sliding_window

  def attend(q, k, v, layer_cache):
    k_cache, v_cache = layer_cache
    k_cache = k_cache.at[rows, :, slot].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[rows, :, slot].set(v.astype(v_cache.dtype))
    out = attend_one_query(q, k_cache, v_cache, visible, dtype, head_major=True)
    return out, (k_cache, v_cache)

  hidden, kv = decode_layers(model, tokens, position, layers, list(zip(cache.k, cache.v)), attend)
  end = jnp.where(active, slot + 1, slot).astype(jnp.int32)
  return hidden, KVCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv), positions=k_pos, end_index=end)
