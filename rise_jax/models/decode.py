"""The model's one-token decode path: a cache layout built for decoding and the layer math of `Transformer.hidden`.

    layers = decode.layer_weights(model)                   # once per generate call, outside the decode loop
    cache = decode.DecodeCache.from_kv(kv_cache)           # once per call; `.to_kv()` at the end
    hidden, cache = decode.decode_hidden(model, tokens, active, cache, layers)    # each step, inside the loop

Each layer runs `transformer.attention_inputs` and `transformer.layer_output` — the blocks the training forward
runs — around a one-query attention (`attention.decode_attention`). What differs from `hidden(..., cache=...)`
is only the data layout, chosen from CPU measurements (`benchmarks/sampler_calls.py`):
  * the contract cache [layers, batch, slots, kv_heads, head_dim] (docs/contracts.md §5) made every step slice
    each layer's cache out, scatter into it, write it back and transpose it for the attention (3M model, batch
    32, 128 slots: 41 ms/step against 6.6 here). `DecodeCache` holds one [batch, kv_heads, slots, head_dim]
    array per layer, converted once per call, and each new key/value is scattered straight into it (in place
    inside the while loop). Per-layer arrays, not one stacked array indexed by layer: XLA's CPU dot fusions
    copied a dynamically indexed layer out every step (toy model, 2,048 rows, 320 slots: 4 x 168 MB per step);
  * slicing layer i out of the stacked [layers, ...] weights inside the loop copies the slice every step (110M
    model, batch 1: 90 ms/step against a 24 ms matmul floor). `layer_weights` slices them once per call (29
    ms/step), at the cost of a transient second copy of the layer weights.

The attention backend: `cudnn` and `splash` are full-sequence kernels, so one-token decode runs the xla
multiply-and-reduce whatever `model.attention` says, as `hidden` does for any call with a cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rise_jax.models import attention as attention_lib
from rise_jax.models.transformer import KVCache, attention_inputs, layer_output, rms_norm, rope_inv_freq


@flax.struct.dataclass
class DecodeCache:
  """A KV cache in the decode layout: k, v are tuples of per-layer [batch, kv_heads, slots, head_dim] arrays;
  positions [batch, slots] (-1 = empty) and end_index [batch] as in `KVCache`."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  positions: jax.Array
  end_index: jax.Array

  @classmethod
  def from_kv(cls, cache: KVCache) -> "DecodeCache":
    split = lambda x: tuple(jnp.transpose(x[i], (0, 2, 1, 3)) for i in range(x.shape[0]))
    return cls(k=split(cache.k), v=split(cache.v), positions=cache.positions, end_index=cache.end_index)

  def to_kv(self) -> KVCache:
    """The contract layout [layers, batch, slots, kv_heads, head_dim] back."""
    stack = lambda xs: jnp.stack([jnp.transpose(x, (0, 2, 1, 3)) for x in xs])
    return KVCache(k=stack(self.k), v=stack(self.v), positions=self.positions, end_index=self.end_index)


def layer_weights(model) -> list[dict[str, jax.Array]]:
  """Per-layer weight arrays, sliced once before the decode loop (see the module docstring)."""
  stacked = {name: p[...] for name, p in model.layers.items()}
  return [{name: value[i] for name, value in stacked.items()} for i in range(model.config.num_layers)]


def decode_layers(model, tokens: jax.Array, positions: jax.Array, layers: list[dict[str, jax.Array]], kv: list,
                  attend) -> tuple[jax.Array, list]:
  """The one-token layer stack every decode cache layout shares (this module's contiguous `DecodeCache`, the
  rollout engine's paged pool).

  `tokens[b]` sits at `positions[b]`; `attend(q, k, v, kv[i])` -> (attended [b, heads, d], new kv[i]) writes the
  new key/value (k, v [b, kv_heads, d], rotated) into layer i's cache and attends over it. Returns the final
  normed hidden states [b, d] (float32) and the per-layer caches.
  """
  c = model.config
  inv_freq = rope_inv_freq(c)
  x = jnp.take(model.embedder[...], tokens, axis=0).astype(model.dtype)[:, None]  # [b, 1, d]
  kv = list(kv)
  for i, w in enumerate(layers):
    q, k, v = attention_inputs(x, w, positions[:, None], inv_freq, c.rms_norm_eps, model.dtype)
    attended, kv[i] = attend(q[:, 0], k[:, 0], v[:, 0], kv[i])
    x = layer_output(x, attended[:, None].astype(model.dtype), w, c.rms_norm_eps, model.dtype)
  return rms_norm(x[:, 0], model.final_norm[...], c.rms_norm_eps, jnp.float32), kv


def decode_hidden(model, tokens: jax.Array, active: jax.Array, cache: DecodeCache,
                  layers: list[dict[str, jax.Array]]) -> tuple[jax.Array, DecodeCache]:
  """Feed `tokens[b]` at position `cache.end_index[b]` (slot == position) for the active rows.

  Inactive rows write an empty slot (position -1, never attended) and keep their end_index. Returns the final
  normed hidden states [batch, d] (float32) and the cache.
  """
  c = model.config
  rows = jnp.arange(tokens.shape[0])
  slot = cache.end_index
  position = jnp.where(active, slot, -1)
  k_pos = cache.positions.at[rows, slot].set(position)
  visible = (k_pos >= 0) & (k_pos <= position[:, None])
  if c.sliding_window is not None:
    visible &= position[:, None] - k_pos < c.sliding_window

  def attend(q, k, v, layer_cache):
    k_cache = layer_cache[0].at[rows, :, slot].set(k.astype(layer_cache[0].dtype))
    v_cache = layer_cache[1].at[rows, :, slot].set(v.astype(layer_cache[1].dtype))
    return attention_lib.decode_attention(q, k_cache, v_cache, visible), (k_cache, v_cache)

  hidden, kv = decode_layers(model, tokens, position, layers, list(zip(cache.k, cache.v)), attend)
  end = jnp.where(active, slot + 1, slot).astype(jnp.int32)
  return hidden, DecodeCache(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv), positions=k_pos, end_index=end)
