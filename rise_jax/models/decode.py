"""The model's cached forward over a caller's KV layout: `Transformer.hidden`'s layer math, attention the caller's.

    layers = decode.layer_weights(model)                   # once per call, outside any step loop
    hidden, kv = decode.cached_layers(model, ids, positions, layers, kv, attend)      # new tokens [b, l]
    hidden, kv = decode.decode_layers(model, tokens, positions, layers, kv, attend)   # one token per row

Each layer runs `transformer.attention_inputs` and `transformer.layer_output` — the blocks the training forward
runs — around the caller's `attend`, which stores the new keys and values where its cache keeps them and attends
over the cache (the engine's paged prefill and decode, `sampling.paged`). What differs from
`hidden(..., cache=...)` is only the data layout, chosen from CPU measurements:
  * the contract cache [layers, batch, slots, kv_heads, head_dim] (docs/contracts.md §5) made every step slice
    each layer's cache out, scatter into it, write it back and transpose it for the attention (3M model, batch
    32, 128 slots: 41 ms/step against 6.6 with per-layer arrays). The engine's pool (`sampling.paged`) holds one
    array per layer and each new key/value is scattered straight into it (in place inside the step loop).
    Per-layer arrays, not one stacked array indexed by layer: XLA's CPU dot fusions copied a dynamically indexed
    layer out every step (toy model, 2,048 rows, 320 slots: 4 x 168 MB per step);
  * slicing layer i out of the stacked [layers, ...] weights inside the loop copies the slice every step (110M
    model, batch 1: 90 ms/step against a 24 ms matmul floor). `layer_weights` slices them once per call (29
    ms/step), at the cost of a transient second copy of the layer weights.

The attention backend: `cudnn` and `splash` are full-sequence kernels, so one-token decode runs the xla
multiply-and-reduce whatever `model.attention` says, as `hidden` does for any call with a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rise_jax.models.transformer import attention_inputs, layer_output, rms_norm, rope_inv_freq


def layer_weights(model) -> list[dict[str, jax.Array]]:
  """Per-layer weight arrays, sliced once before the decode loop (see the module docstring)."""
  stacked = {name: p[...] for name, p in model.layers.items()}
  return [{name: value[i] for name, value in stacked.items()} for i in range(model.config.num_layers)]


def cached_layers(model, ids: jax.Array, positions: jax.Array, layers: list[dict[str, jax.Array]], kv: list,
                  attend) -> tuple[jax.Array, list]:
  """The layer stack over new tokens ids [b, l] at positions [b, l] (the engine's paged prefill and decode).

  `attend(q, k, v, kv[i])` -> (attended [b, l, heads, d], new kv[i]) stores the new keys and values (k, v
  [b, l, kv_heads, d], rotated) in layer i's cache and attends the queries q [b, l, heads, d] over it. Returns
  the final normed hidden states [b, l, d] (float32) and the per-layer caches.
  """
  c = model.config
  inv_freq = rope_inv_freq(c)
  x = jnp.take(model.embedder[...], ids, axis=0).astype(model.dtype)  # [b, l, d]
  kv = list(kv)
  for i, w in enumerate(layers):
    q, k, v = attention_inputs(x, w, positions, inv_freq, c.rms_norm_eps, model.dtype)
    attended, kv[i] = attend(q, k, v, kv[i])
    x = layer_output(x, attended.astype(model.dtype), w, c.rms_norm_eps, model.dtype)
  return rms_norm(x, model.final_norm[...], c.rms_norm_eps, jnp.float32), kv


def decode_layers(model, tokens: jax.Array, positions: jax.Array, layers: list[dict[str, jax.Array]], kv: list,
                  attend) -> tuple[jax.Array, list]:
  """`cached_layers` for one token per row: `tokens[b]` at `positions[b]`; `attend(q [b, heads, d], k, v
  [b, kv_heads, d], kv[i])` -> (attended [b, heads, d], new kv[i]). Returns hidden states [b, d] (float32)."""

  def one_query(q, k, v, layer_kv):
    attended, layer_kv = attend(q[:, 0], k[:, 0], v[:, 0], layer_kv)
    return attended[:, None], layer_kv

  hidden, kv = cached_layers(model, tokens[:, None], positions[:, None], layers, kv, one_query)
  return hidden[:, 0], kv
