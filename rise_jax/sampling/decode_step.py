"""One decode step (one token per row): in-place cache writes on a head-major cache, per-layer weights.

Why not `model.hidden(..., cache=...)`: measured on CPU, XLA copies data every decode step there, so a step cost
grew with the cache and with the stacked weights instead of reading each weight once:
  * the contract cache layout [layers, batch, slots, kv_heads, head_dim] makes every layer's cache be sliced
    out, scattered, written back and transposed for the attention dot each step (3M model, batch 32, 128 slots:
    41 ms/step; here 6.6 ms). The decode loop transposes the cache once per generate call into
    [layers, batch, kv_heads, slots, head_dim] (`to_decode_layout`), scatters each new key/value straight into
    it (in place inside the while loop) and transposes back at the end;
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
  """k, v as [layers, batch, kv_heads, slots, head_dim] (the layout the decode step reads)."""
  t = lambda x: jnp.transpose(x, (0, 1, 3, 2, 4))
  return cache.replace(k=t(cache.k), v=t(cache.v))


from_decode_layout = to_decode_layout  # the same axis swap undoes itself


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

  def layer(carry, i, w):
    x, k_all, v_all = carry
    w = {name: value.astype(dtype) for name, value in w.items()}
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps, dtype)
    q = rope(jnp.einsum("bd,dhk->bhk", h, w["q_proj"]))
    k = rope(jnp.einsum("bd,dhk->bhk", h, w["k_proj"]))
    v = jnp.einsum("bd,dhk->bhk", h, w["v_proj"])
    k_all = k_all.at[i, rows, :, slot].set(k.astype(k_all.dtype))
    v_all = v_all.at[i, rows, :, slot].set(v.astype(v_all.dtype))
    q = q.reshape(batch, c.num_kv_heads, groups, c.head_dim)
    # A runtime layer index: XLA fuses a dynamic slice into the attention dots, a static one it copies out.
    layer_index = i + jnp.minimum(slot[0], 0)
    k_layer = jax.lax.dynamic_index_in_dim(k_all, layer_index, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(v_all, layer_index, keepdims=False)
    scores = jnp.einsum("bkgd,bktd->bkgt", q, k_layer.astype(dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None, :], scores * c.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(-1)[:, None, None, None], probs, 0.0)
    out = jnp.einsum("bkgt,bktd->bkgd", probs.astype(v_layer.dtype), v_layer).astype(dtype)
    out = out.reshape(batch, c.num_heads, c.head_dim)
    x = x + jnp.einsum("bhk,hkd->bd", out, w["o_proj"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps, dtype)
    gate = jnp.einsum("bd,df->bf", h, w["gate_proj"])
    up = jnp.einsum("bd,df->bf", h, w["up_proj"])
    x = x + jnp.einsum("bf,fd->bd", jax.nn.silu(gate) * up, w["down_proj"])
    return x, k_all, v_all

  carry = (x, cache.k, cache.v)
  for i, w in enumerate(layers):
    carry = layer(carry, i, w)
  x, k_all, v_all = carry
  hidden = rms_norm(x, model.final_norm[...], c.rms_norm_eps, jnp.float32)
  end = jnp.where(active, slot + 1, slot).astype(jnp.int32)
  return hidden, KVCache(k=k_all, v=v_all, positions=k_pos, end_index=end)
