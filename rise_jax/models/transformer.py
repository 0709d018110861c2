"""The Llama 2 / Llama 3 / Mistral decoder in Flax NNX, with an explicit KV cache (docs/contracts.md §5).

Layout choices: head-explicit einsum weights (`q: [embed, heads, head_dim]`, `o: [heads, head_dim, embed]`),
every per-layer weight stacked over a leading `layers` axis (so `scan_layers` only changes how the forward
iterates), rotary embeddings in the HF "rotate half" layout, grouped-query attention without repeating K/V.
RMSNorm, softmax and logits are float32 whatever the compute dtype. Each Param carries `logical_axes` metadata;
`rise_jax.sharding` maps those names onto the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from rise_jax.models import attention as attention_lib
from rise_jax.models.configs import ModelConfig
from rise_jax.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Stacked per-layer weights: name -> logical axes after the leading 'layers' axis.
LAYER_AXES = {
    "attn_norm": ("embed",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}
ACTIVATION_AXES = ("batch", "length", None)  # the residual stream: rows split, embed whole on every device


@flax.struct.dataclass
class KVCache:
  """Explicit decode cache (a pytree; a call returns a new one, nothing is mutated in place).

  k, v: [layers, batch, cache_len, kv_heads, head_dim]; positions: [batch, cache_len] int32, -1 for an empty or
  padding slot (never attended); end_index: [batch] int32, the next slot each row writes.
  """
  k: jax.Array
  v: jax.Array
  positions: jax.Array
  end_index: jax.Array


def init_cache(config: ModelConfig, batch: int, cache_len: int, dtype: Any = jnp.float32) -> KVCache:
  """An empty cache: zeros, every position -1, every row writing at slot 0."""
  shape = (config.num_layers, batch, cache_len, config.num_kv_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 positions=jnp.full((batch, cache_len), -1, jnp.int32), end_index=jnp.zeros((batch,), jnp.int32))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse rotary frequencies [head_dim // 2] (float32, computed as transformers does, llama3 scaling too)."""
  d = config.head_dim
  inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
  inv = inv.astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv
  # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half rotary embedding. x [b, l, heads, d]; positions [b, l]."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _after(value: jax.Array, cotangent: jax.Array) -> jax.Array:
  """`value`, made to depend on `cotangent` (elementwise; NaN cotangents give NaN gradients either way). A backward
  value computed from residuals alone can be scheduled as soon as they exist: XLA:CPU drops optimisation barriers
  and its default scheduler starts such work early, holding every layer's copy to the backward (1.1B: the
  sigmoids of all 22 MLPs, 3.8 GiB)."""
  return jnp.where(cotangent == cotangent, value, 0.0)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
  """The plain formula (the reference the custom backward is tested against)."""
  x = x.astype(jnp.float32)
  x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * weight.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
  """RMSNorm in float32, cast to `dtype`. Its backward keeps `x` and the per-row inverse rms only: autodiff kept
  ~3 float32 copies of the residual stream per layer, and under `jax.checkpoint` XLA:CPU (which drops the
  optimisation barriers before CSE) merged the recomputation back into the forward (1.1B: 5.6 GiB of float32)."""
  return _rms_norm(x, weight, eps, dtype)


def _rms_norm_fwd(x, weight, eps, dtype):
  x32 = x.astype(jnp.float32)
  inv = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return ((x32 * inv) * weight.astype(jnp.float32)).astype(dtype), (x, weight, inv)


def _rms_norm_bwd(eps, dtype, res, dy):
  # y = w * x * inv with inv = (mean(x^2) + eps)^-1/2:  dx = inv * dn - x * inv^3 * mean(dn * x),  dn = dy * w.
  # Computed on [rows, features] views: XLA:CPU runs CSE after dropping optimisation barriers, and a backward
  # written in the forward's shapes shared its values (the weight's broadcast, x in float32), keeping 44 of them
  # alive from the forward at 1.1B. Nothing here can start before the cotangent arrives.
  x, weight, inv = res
  features = x.shape[-1]
  g = dy.reshape(-1, features).astype(jnp.float32)
  x32 = _after(x.reshape(-1, features).astype(jnp.float32), g)
  g_inv = g * inv.reshape(-1, 1)
  dn_inv = g_inv * weight.astype(jnp.float32)
  dx = dn_inv - x32 * (inv.reshape(-1, 1) ** 2) * jnp.mean(dn_inv * x32, axis=-1, keepdims=True)
  dw = jnp.sum(g_inv * x32, axis=0)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
  """`jnp.einsum(spec, x, w)`, differentiated as autodiff would, except that the weight gradient reads `x` only
  once the input gradient exists: XLA:CPU computes bf16 matmuls in float32, and the float32 copy of `x` it made for
  the forward stayed alive for the weight gradient (1.1B: 2.75 GiB of norm outputs, 1.4 GiB of attention outputs)."""
  return jnp.einsum(spec, x, w)


def _dense_bwd(spec, res, dy):
  x, w = res
  dx = jax.vjp(lambda x: jnp.einsum(spec, x, w), x)[1](dy)[0]
  return dx, jax.vjp(lambda w: jnp.einsum(spec, _after(x, dx), w), w)[1](dy)[0]


def _dense_fwd(x, w, spec):
  return jnp.einsum(spec, x, w), (x, w)


dense.defvjp(_dense_fwd, _dense_bwd)


def _swiglu_down(gate: jax.Array, up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The plain formula (the reference the custom backward is tested against): (silu(gate) * up) @ w_down."""
  return jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, w_down)


@jax.custom_vjp
def swiglu_down(gate: jax.Array, up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The gated MLP's output, (silu(gate) * up) @ w_down. Its backward keeps gate, up and w_down only and
  recomputes silu(gate) * up: autodiff also kept the product (w_down's gradient needs it), silu(gate) and the
  sigmoid (XLA:CPU holds them in float32: 1.1B, 8 x 1,024, 7.6 GiB)."""
  return _swiglu_down(gate, up, w_down)


def _swiglu_down_bwd(res, dy):
  gate, up, w_down = res
  dp = jnp.einsum("bld,fd->blf", dy, w_down)                        # d(product); needs no saved activation
  # The product again, bit for bit, from a gate that depends on dp: it cannot run before the backward gets here.
  product = jax.nn.silu(_after(gate, dp)) * up
  dw = jnp.einsum("blf,bld->fd", product, dy)
  return (*_swiglu_grads(gate, up, dp), dw)


def _swiglu_grads(gate, up, dp):
  # d/dg [g * s(g)] = s * (1 + g * (1 - s)). On [rows, features] views (so XLA's CSE cannot share the forward's
  # values), and the sigmoid is written once per output (logistic, and 1 / (1 + exp(-g))): a sigmoid used by both
  # would be a value of its own that depends on gate alone, which XLA:CPU's scheduler computes early and holds.
  features = gate.shape[-1]
  g, u, d = (a.reshape(-1, features).astype(jnp.float32) for a in (gate, up, dp))
  g = _after(g, d)
  s = 1.0 / (1.0 + jnp.exp(-g))
  dgate = d * u * s * (1.0 + g * (1.0 - s))
  dup = d * g * lax.logistic(g)
  return dgate.reshape(gate.shape).astype(gate.dtype), dup.reshape(up.shape).astype(up.dtype)


def _swiglu_down_fwd(gate, up, w_down):
  return _swiglu_down(gate, up, w_down), (gate, up, w_down)


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def _einsum(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
  return jnp.einsum(spec, x, w)


# The two halves of a decoder layer around attention, shared by the full-sequence forward (`hidden`) and the
# one-token decode (`rise_jax.models.decode`): one definition of the layer's math for training and sampling.
# `lean` picks the custom-VJP matmuls whose backward saves less (`dense`, `swiglu_down`); the forward values are
# the same either way. A remat policy must see plain einsums (a custom VJP hides its dots from it).
def attention_inputs(x: jax.Array, w: dict, positions: jax.Array, inv_freq: np.ndarray, eps: float, dtype,
                     lean: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rotated q [b, l, heads, d] and k, v [b, l, kv_heads, d] from the residual stream x [b, l, embed]."""
  proj = dense if lean else _einsum
  h = rms_norm(x, w["attn_norm"], eps, dtype)
  q = proj(h, w["q_proj"].astype(dtype), "bld,dhk->blhk")
  k = proj(h, w["k_proj"].astype(dtype), "bld,dhk->blhk")
  v = proj(h, w["v_proj"].astype(dtype), "bld,dhk->blhk")
  return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def layer_output(x: jax.Array, attended: jax.Array, w: dict, eps: float, dtype, lean: bool = False) -> jax.Array:
  """The residual stream after the output projection of `attended` [b, l, heads, d] and the gated MLP."""
  proj, mlp_out = (dense, swiglu_down) if lean else (_einsum, _swiglu_down)
  x = x + proj(attended, w["o_proj"].astype(dtype), "blhk,hkd->bld")
  h = rms_norm(x, w["mlp_norm"], eps, dtype)
  gate = proj(h, w["gate_proj"].astype(dtype), "bld,df->blf")
  up = proj(h, w["up_proj"].astype(dtype), "bld,df->blf")
  return x + mlp_out(gate, up, w["down_proj"].astype(dtype))


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Write new [b, l, ...] into cache [b, t, ...] at per-row slot start[b]."""
  return jax.vmap(lambda c, n, i: lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache, new, start)


def _param(init, key, shape, dtype, axes):
  return nnx.Param(init(key, shape, dtype), logical_axes=axes)


@jax.custom_vjp
def _unstack(stacked: jax.Array) -> list[jax.Array]:
  """The layers of a stacked [layers, ...] weight. Its gradient is one stack of the per-layer gradients; as
  plain `w[i]` slices each layer's gradient became a full-size zero pad that was summed (100M model on a CPU:
  ~15% of the train step)."""
  return [stacked[i] for i in range(stacked.shape[0])]


_unstack.defvjp(lambda w: (_unstack(w), None), lambda _, cts: (jnp.stack(cts),))


class Transformer(nnx.Module):
  """Decoder-only transformer: `model(ids, ...)` -> float32 logits [b, l, vocab] (and a new cache if given)."""

  def __init__(self, config: ModelConfig, *, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32,
               attention: str = "xla", scan_layers: bool = False, remat: str = "none", rngs: nnx.Rngs,
               initializer_range: float = 0.02):
    if attention not in attention_lib.BACKENDS:
      raise ValueError(f"model.attention: {attention!r} is not one of {attention_lib.BACKENDS}")
    attention = attention_lib.resolve(attention, dtype, config.head_dim)
    if remat != "none" and remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat: {remat!r} is not one of {['none', *REMAT_POLICIES]}")
    if attention == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"model.attention: cudnn flash attention needs model.dtype bfloat16 (got {jnp.dtype(dtype)})")
    self.config = config
    self.param_dtype = jnp.dtype(param_dtype)
    self.dtype = jnp.dtype(dtype)
    self.attention = attention
    self.scan_layers = scan_layers
    self.remat = remat
    c, pd = config, self.param_dtype
    normal = jax.nn.initializers.normal(initializer_range)
    ones = jax.nn.initializers.ones
    L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
    shapes = {
        "attn_norm": (D,), "q_proj": (D, c.num_heads, c.head_dim), "k_proj": (D, c.num_kv_heads, c.head_dim),
        "v_proj": (D, c.num_kv_heads, c.head_dim), "o_proj": (c.num_heads, c.head_dim, D), "mlp_norm": (D,),
        "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D),
    }
    self.embedder = _param(normal, rngs.params(), (c.vocab_size, D), pd, ("vocab", "embed"))
    self.layers = nnx.Dict({
        name: _param(ones if name.endswith("norm") else normal, rngs.params(), (L, *shape), pd,
                     ("layers", *LAYER_AXES[name]))
        for name, shape in shapes.items()})
    self.final_norm = _param(ones, rngs.params(), (D,), pd, ("embed",))
    self.lm_head = None if c.tie_word_embeddings else _param(normal, rngs.params(), (D, c.vocab_size), pd,
                                                            ("embed", "vocab"))

  # -- forward ---------------------------------------------------------------------------------------------

  def __call__(self, ids, positions=None, attention_mask=None, cache: KVCache | None = None, segment_ids=None):
    out = self.hidden(ids, positions, attention_mask, cache, segment_ids)
    if cache is None:
      return self.unembed(out)
    h, cache = out
    return self.unembed(h), cache

  def unembed(self, h: jax.Array) -> jax.Array:
    """Final hidden states [..., d] -> float32 logits [..., vocab] (callers may chunk h to bound memory)."""
    h = h.astype(self.dtype)
    if self.lm_head is None:
      return jnp.einsum("...d,vd->...v", h, self.embedder[...].astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32)

  def hidden(self, ids, positions=None, attention_mask=None, cache: KVCache | None = None, segment_ids=None):
    """Final RMS-normed hidden states [b, l, d] (float32), plus the new cache when one is passed."""
    c = self.config
    b, l = ids.shape
    mask = jnp.ones((b, l), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      start = 0 if cache is None else cache.positions.max(axis=1, keepdims=True) + 1
      positions = start + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.where(mask, positions, -1).astype(jnp.int32)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packing) is for full-sequence calls; it cannot be combined with a cache")

    x = constrain(jnp.take(self.embedder[...], ids, axis=0).astype(self.dtype), ACTIVATION_AXES)
    inv_freq = rope_inv_freq(c)
    if cache is not None:
      k_pos = _write_rows(cache.positions, positions, cache.end_index)
    else:
      k_pos = positions

    def attend(q, k, v):
      if cache is None and segment_ids is None and self.attention == "cudnn":
        return attention_lib.cudnn_attention(q, k, v, positions, k_pos, mask, c.sliding_window)
      if cache is None and self.attention == "splash":
        return attention_lib.sharded_splash_attention(q, k, v, mask, segment_ids, c.sliding_window)
      return attention_lib.xla_attention(q, k, v, positions, k_pos, segment_ids, segment_ids, c.sliding_window)

    # Without remat, matmuls whose backward saves less (custom VJPs); under a remat policy plain einsums, so that
    # the policy sees them (a custom VJP hides its dots: `dots_with_no_batch_dims` would save nothing, like `full`).
    lean = self.remat == "none"

    def layer(x, w, kv):
      q, k, v = attention_inputs(x, w, positions, inv_freq, c.rms_norm_eps, self.dtype, lean)
      if kv is not None:
        k = _write_rows(kv[0], k.astype(kv[0].dtype), cache.end_index)
        v = _write_rows(kv[1], v.astype(kv[1].dtype), cache.end_index)
        kv = (k, v)
        k, v = k.astype(self.dtype), v.astype(self.dtype)
      x = layer_output(x, attend(q, k, v), w, c.rms_norm_eps, self.dtype, lean)
      return constrain(x, ACTIVATION_AXES), kv

    if self.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    weights = {name: p[...] for name, p in self.layers.items()}
    kv_all = None if cache is None else (cache.k, cache.v)
    if self.scan_layers:
      x, kv_all = lax.scan(lambda x, xs: layer(x, *xs), x, (weights, kv_all))
    else:
      per_layer = {n: _unstack(w) for n, w in weights.items()}
      for i in range(c.num_layers):
        x, kv = layer(x, {n: w[i] for n, w in per_layer.items()}, None if kv_all is None else
                      (kv_all[0][i], kv_all[1][i]))
        if kv is not None:
          kv_all = (kv_all[0].at[i].set(kv[0]), kv_all[1].at[i].set(kv[1]))
    h = rms_norm(x, self.final_norm[...], c.rms_norm_eps, jnp.float32)
    if cache is None:
      return h
    new_cache = KVCache(k=kv_all[0], v=kv_all[1], positions=k_pos, end_index=cache.end_index + l)
    return h, new_cache


__all__ = ["KVCache", "Transformer", "init_cache", "rope_inv_freq", "apply_rope", "rms_norm",
           "swiglu_down", "dense", "attention_inputs", "layer_output"]
