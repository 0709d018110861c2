"""Causal grouped-query attention with three interchangeable backends: `xla`, `cudnn`, `splash`.

Masks are computed from per-token positions (and optional segment ids), one query block at a time, so no
`length x length` mask is ever materialised beyond a block. A key is visible to a query when

    0 <= key_pos <= query_pos,  query_pos - key_pos < window  (W keys including itself),  same segment.

Position -1 marks a padding or empty cache slot: never attended. A query with no visible key (a pad token)
returns zeros. `xla` is the reference and handles every case (cache, left padding, packing). `cudnn` and
`splash` are fast paths for full-sequence calls (no cache); they rely on index order equalling position order
inside a row, which holds for the default positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax import lax

from rise_jax import sharding as sharding_lib

QUERY_BLOCK = 512          # most queries per block in the xla reference: scores are [block, keys], not [l, keys]
SCORE_BUDGET = 1 << 25     # most float32 scores per block (128 MiB): the backward holds ~6 such arrays at once
BACKENDS = ("auto", "xla", "cudnn", "splash")
CUDNN_MAX_HEAD_DIM = 128   # cuDNN flash attention: head_dim <= 128 (256 from Hopper on), a multiple of 8
# The implementation `cudnn_attention` asks jax.nn.dot_product_attention for; tests on CPU switch it to "xla" to
# check the argument mapping (causal + lengths + window) without a GPU.
CUDNN_IMPLEMENTATION = "cudnn"


def _platform() -> str:
  """'cuda' on NVIDIA GPUs (where cuDNN is), otherwise jax's platform name ('gpu' on ROCm, 'tpu', 'cpu')."""
  device = jax.devices()[0]
  return "cuda" if device.platform == "gpu" and "NVIDIA" in device.device_kind else device.platform


def resolve(requested: str, dtype, head_dim: int, platform: str | None = None) -> str:
  """The backend `auto` stands for: cudnn on NVIDIA GPUs computing in bf16/fp16 with a head_dim cuDNN takes,
  splash on TPUs, xla otherwise. Explicit choices pass through. Calls a fast path cannot express (a KV cache;
  for cudnn also packing, and left padding) still take xla per call, in `Transformer.hidden`."""
  if requested != "auto":
    return requested
  platform = _platform() if platform is None else platform
  if (platform == "cuda" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
      and head_dim <= CUDNN_MAX_HEAD_DIM):
    return "cudnn"
  return "splash" if platform == "tpu" else "xla"


def _visible(q_pos, k_pos, q_seg, k_seg, window):
  """[b, lq, lk] boolean visibility from positions [b, lq] / [b, lk] (and segments)."""
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  ok = (kp >= 0) & (kp <= qp)
  if window is not None:
    ok &= qp - kp < window
  if q_seg is not None:
    ok &= q_seg[:, :, None] == k_seg[:, None, :]
  return ok


def _xla_block(q, k, v, q_pos, k_pos, q_seg, k_seg, window):
  """q [b, l, kv, g, d], k/v [b, t, kv, d] -> [b, l, kv, g, d]; softmax in float32."""
  b, l, kv, g, d = q.shape
  # Head-major operands with (groups x queries) merged: one [g*l, d] @ [d, t] product per (row, kv head).
  # Contracting the [b, l, kv, g, d] layout directly ran 2x slower on CPU (fwd+bwd, 8 x 256 tokens, 4 heads).
  qm = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv, g * l, d)
  km, vm = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
  scores = jnp.einsum("bkmd,bktd->bkmt", qm, km, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, l, -1) * d ** -0.5
  ok = _visible(q_pos, k_pos, q_seg, k_seg, window)[:, None, None]  # [b, 1, 1, l, t]
  scores = jnp.where(ok, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(ok.any(-1, keepdims=True), probs, 0.0)  # pad queries: zeros, not a uniform average
  out = jnp.einsum("bkmt,bktd->bkmd", probs.astype(v.dtype).reshape(b, kv, g * l, -1), vm)
  return jnp.transpose(out.reshape(b, kv, g, l, d), (0, 3, 1, 2, 4))


# Under differentiation a block keeps only its inputs and recomputes scores and probabilities in the backward
# (what flash attention does): saved, they were ~5 float32 [b, heads, l, t] arrays per layer, most of a train step.
_xla_block_remat = jax.checkpoint(_xla_block, static_argnums=(7,))


def xla_attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window=None, block=QUERY_BLOCK):
  """Reference attention. q [b, l, heads, d]; k, v [b, t, kv_heads, d] -> [b, l, heads, d].

  Grouped-query attention reshapes the heads into (kv_heads, groups) — head h uses kv head h // groups, the
  order of transformers' `repeat_kv` — so K/V are never repeated.
  """
  b, l, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, l, kv, h // kv, d)
  block = max(16, min(block, SCORE_BUDGET // (b * h * k.shape[1])))
  if l <= block:
    out = _xla_block_remat(q, k, v, q_pos, k_pos, q_seg, k_seg, window)
    return out.reshape(b, l, h, d)
  # Long inputs: one query block at a time (sequentially), so scores are [block, t], never [l, t].
  n = -(-l // block)
  pad = n * block - l
  qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  qpb = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
  split = lambda x: jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)
  if q_seg is None:
    out = lax.map(lambda a: _xla_block_remat(a[0], k, v, a[1], k_pos, None, None, window), (split(qb), split(qpb)))
  else:
    qsb = jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1)
    out = lax.map(lambda a: _xla_block_remat(a[0], k, v, a[1], k_pos, a[2], k_seg, window),
                  (split(qb), split(qpb), split(qsb)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * block, h, d)
  return out[:, :l]


def decode_attention(q, keys, values, visible):
  """One query per row: q [b, heads, d]; keys, values [b, kv_heads, t, d] (the contiguous decode cache, or a paged
  pool's gathered blocks); visible [b, t]. Returns float32 [b, heads, d] (zeros for a row that sees no key).

  The online softmax below over one piece (the paged engine reads long spans in several). A multiply-and-reduce,
  not a batched dot: with one query per row a dot runs thousands of [groups x d] @ [d x t] products, 2-3x slower on
  CPU than streaming the cache once (toy model, 2,048 rows, 320 slots)."""
  state = online_softmax_init(q, keys.shape[1])
  return online_softmax_result(online_softmax_step(state, q, keys, values, visible))


def online_softmax_init(q, kv_heads: int):
  """The running (max, normaliser, weighted values) of `decode_attention` taken over keys piece by piece."""
  b, heads, d = q.shape
  shape = (b, kv_heads, heads // kv_heads)
  return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros((*shape, d), jnp.float32))


def online_softmax_step(state, q, keys, values, visible):
  """`state` after one more piece of keys and values ([b, kv_heads, t, d]; visible [b, t]): the softmax's
  running max rescales what came before, so the pieces' combination is the softmax over all of them."""
  running_max, norm, acc = state
  b, heads, d = q.shape
  kv_heads = keys.shape[1]
  q = q.reshape(b, kv_heads, heads // kv_heads, d).astype(jnp.float32)
  scores = jnp.sum(q[:, :, :, None, :] * keys[:, :, None].astype(jnp.float32), axis=-1) * d ** -0.5
  scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
  new_max = jnp.maximum(running_max, scores.max(-1))
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # nothing seen yet: every weight is exp(-inf) = 0
  weights = jnp.exp(scores - shift[..., None])
  rescale = jnp.exp(running_max - shift)
  acc = acc * rescale[..., None] + jnp.sum(weights[..., None] * values[:, :, None].astype(jnp.float32), axis=-2)
  return new_max, norm * rescale + weights.sum(-1), acc


def online_softmax_result(state):
  """The attended values [b, heads, d] (zeros for a row that saw no key, as `decode_attention`)."""
  _, norm, acc = state
  out = jnp.where(norm[..., None] > 0, acc / jnp.where(norm > 0, norm, 1.0)[..., None], 0.0)
  b, kv_heads, groups, d = out.shape
  return out.reshape(b, kv_heads * groups, d)


def cudnn_attention(q, k, v, q_pos, k_pos, mask, window=None):
  """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU), full-sequence calls only.

  cuDNN masks by index (causal + per-row valid length), which equals the position rule exactly when each row
  is right-padded. Rows that are not (left padding) take the xla reference path via `lax.cond`, so the result
  is always exact. `local_window_size=(W - 1, 0)`: W - 1 keys to the left plus the query itself (an int W would
  be symmetric, and wrong).
  """
  lengths = mask.sum(-1).astype(jnp.int32)
  right_padded = jnp.all(mask == (jnp.arange(mask.shape[1])[None] < lengths[:, None]))

  def fast(q, k, v):
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation=CUDNN_IMPLEMENTATION)
    return jnp.where(mask[:, :, None, None], out, 0).astype(q.dtype)  # pad queries: zeros, as in xla

  def exact(q, k, v):
    return xla_attention(q, k, v, q_pos, k_pos, window=window).astype(q.dtype)

  return lax.cond(right_padded, fast, exact, q, k, v)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, groups: int, window: int | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * groups), interpret=interpret)


def splash_attention(q, k, v, mask, segment_ids=None, window=None, interpret=False):
  """TPU Pallas splash attention, full-sequence calls only. q [b, l, heads, d]; k, v [b, l, kv_heads, d].

  Each kv head runs the MQA kernel over its query group. Padding and packing become segment ids (pad tokens
  form segment 0, which only other pad tokens see); the lazy causal / local mask is by index, which equals the
  position rule for default positions. The length is padded to the kernel's 128 block.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, l, h, d = q.shape
  kv = k.shape[2]
  seg = jnp.where(mask, 1 if segment_ids is None else segment_ids + 1, 0).astype(jnp.int32)
  length = -(-l // 128) * 128
  pad = length - l
  pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
  q = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), pad4)  # the kernel does not scale
  k, v = jnp.pad(k, pad4), jnp.pad(v, pad4)
  seg = jnp.pad(seg, ((0, 0), (0, pad)))
  kernel = _splash_kernel(length, h // kv, window, interpret)
  q = q.reshape(b, length, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, l, d]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)            # [b, kv, l, d]

  def one_row(q, k, v, seg):
    ids = sk.SegmentIds(q=seg, kv=seg)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

  out = jax.vmap(one_row)(q, k, v, seg)                               # [b, kv, g, l, d]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)[:, :l]
  return jnp.where(mask[:, :, None, None], out, 0).astype(q.dtype)


def sharded_splash_attention(q, k, v, mask, segment_ids=None, window=None, interpret=False):
  """`splash_attention` under the current mesh: a Pallas kernel is not auto-partitioned, so it runs in
  `shard_map` with rows split over the batch axes and kv heads over the tensor axis (each shard keeps whole
  query groups, because head h belongs to kv head h // groups). Without a multi-device mesh it is a plain call.
  """
  mesh = jax.sharding.get_abstract_mesh()
  call = functools.partial(splash_attention, window=window, interpret=interpret)
  if mesh.empty or mesh.size == 1:
    return call(q, k, v, mask, segment_ids)
  rules = spmd.get_logical_axis_rules() or sharding_lib.TRAIN_RULES
  spec = lambda x, axes: sharding_lib.logical_to_spec(axes, x.shape, mesh, rules, "replicate", "splash input")
  kv_spec = spec(k, ("batch", "length", "kv_heads", "head_dim"))
  q_spec = jax.sharding.PartitionSpec(*kv_spec)  # heads split exactly like kv heads (whole groups)
  row_spec = jax.sharding.PartitionSpec(kv_spec[0], None)
  if segment_ids is None:
    body = lambda q, k, v, m: call(q, k, v, m)
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, mask)
  return jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, mask, segment_ids)
