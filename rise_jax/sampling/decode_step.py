"""One decode step (one token per row) over a head-major copy of the KV cache, updated in place.

Why not `model.hidden(..., cache=...)`: the contract cache layout is [layers, batch, slots, kv_heads, head_dim]
and, for a single query token, XLA on CPU copies each layer's cache several times per step (slice the layer
out, scatter, write the layer back, transpose it to [batch, kv_heads, slots, head_dim] for the attention dot),
so a decode step cost grew with the whole cache rather than with the weights (measured: 41 ms vs a 2.8 ms
matmul floor for the ~3M model at batch 32, 128 slots; the head-major dot alone is 12x faster than on the
contract layout). The decode loop therefore transposes the cache once per generate call into
[layers, batch, kv_heads, slots, head_dim] (`to_decode_layout`), scatters each new key/value straight into it
(in place inside the while loop), and transposes back at the end. Same weights, same math as
`Transformer.hidden`; the sampler's tests hold it to transformers' `generate` token for token. Prefill still
uses `model.hidden`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rise_jax.models.transformer import KVCache, apply_rope, rms_norm, rope_inv_freq


def to_decode_layout(cache: KVCache) -> KVCache:
  """k, v as [layers, batch, kv_heads, slots, head_dim] (the layout the decode step reads)."""
  t = lambda x: jnp.transpose(x, (0, 1, 3, 2, 4))
  return cache.replace(k=t(cache.k), v=t(cache.v))


from_decode_layout = to_decode_layout  # the same axis swap undoes itself


def decode_hidden(model, tokens: jax.Array, active: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
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
  k_all, v_all = cache.k, cache.v
  weights = {name: p[...] for name, p in model.layers.items()}
  for i in range(c.num_layers):
    w = {name: value[i].astype(dtype) for name, value in weights.items()}
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps, dtype)
    q = rope(jnp.einsum("bd,dhk->bhk", h, w["q_proj"]))
    k = rope(jnp.einsum("bd,dhk->bhk", h, w["k_proj"]))
    v = jnp.einsum("bd,dhk->bhk", h, w["v_proj"])
    k_all = k_all.at[i, rows, :, slot].set(k.astype(k_all.dtype))
    v_all = v_all.at[i, rows, :, slot].set(v.astype(v_all.dtype))
    q = q.reshape(batch, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("bkgd,bktd->bkgt", q, k_all[i].astype(dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None, :], scores * c.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(-1)[:, None, None, None], probs, 0.0)
    out = jnp.einsum("bkgt,bktd->bkgd", probs.astype(v_all.dtype), v_all[i]).astype(dtype)
    out = out.reshape(batch, c.num_heads, c.head_dim)
    x = x + jnp.einsum("bhk,hkd->bd", out, w["o_proj"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps, dtype)
    gate = jnp.einsum("bd,df->bf", h, w["gate_proj"])
    up = jnp.einsum("bd,df->bf", h, w["up_proj"])
    x = x + jnp.einsum("bf,fd->bd", jax.nn.silu(gate) * up, w["down_proj"])
  hidden = rms_norm(x, model.final_norm[...], c.rms_norm_eps, jnp.float32)
  end = jnp.where(active, slot + 1, slot).astype(jnp.int32)
  return hidden, KVCache(k=k_all, v=v_all, positions=k_pos, end_index=end)
