"""The model's one-token decode path: the layer math of `Transformer.hidden` around a caller's KV layout.

    layers = decode.layer_weights(model)                   # once per decode chunk, outside the step loop
    hidden, kv = decode.decode_layers(model, tokens, positions, layers, kv, attend)   # each step

Each layer runs `transformer.attention_inputs` and `transformer.layer_output` — the blocks the training forward
runs — around a one-query attention (`attention.decode_attention`). What differs from `hidden(..., cache=...)`
is only the data layout, chosen from CPU measurements:
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


def decode_layers(model, tokens: jax.Array, positions: jax.Array, layers: list[dict[str, jax.Array]], kv: list,
                  attend) -> tuple[jax.Array, list]:
  """The one-token layer stack (the engine's paged decode, `sampling.paged`).

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
