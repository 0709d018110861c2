"""Memory arithmetic for sampling: the largest prompt batch whose weights and KV cache fit on each device.

A Llama-2-7B cache in bfloat16 holds 2 (k, v) x 32 layers x 32 kv heads x 128 dims x 2 bytes = 0.5 MiB per token,
so best-of-16 on a 2k-token history needs ~16 GiB per prompt: the batch is planned, not guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _bytes(dtype) -> int:
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in _DTYPE_BYTES:
    raise ValueError(f"plan: unsupported dtype {dtype!r} (one of {sorted(_DTYPE_BYTES)})")
  return _DTYPE_BYTES[name]


def param_count(model_config) -> int:
  """Parameters of a Llama/Mistral decoder from its config (embeddings, attention, MLP, norms, head)."""
  c = model_config
  d, hd = c.hidden_size, c.head_dim
  attention = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
  layer = attention + 3 * d * c.intermediate_size + 2 * d
  head = 0 if c.tie_word_embeddings else c.vocab_size * d
  return c.vocab_size * d + c.num_layers * layer + d + head


def _non_layer_params(model_config) -> int:
  c = model_config
  return c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size


def kv_bytes_per_token(model_config, cache_dtype="bfloat16") -> int:
  """Bytes one token of one row occupies in the KV cache (k and v, every layer)."""
  c = model_config
  return 2 * c.num_layers * c.num_kv_heads * c.head_dim * _bytes(cache_dtype)


@dataclasses.dataclass(frozen=True)
class SamplingMemory:
  """Per-device bytes at a given batch: what `plan` compares with the device memory."""
  batch: int
  rows: int
  weights: int
  kv_cache: int
  logits: int

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.logits


def _mesh_axes(mesh) -> tuple[int, int]:
  """(batch shards = data x fsdp, tensor shards); (1, 1) without a mesh."""
  if mesh is None:
    return 1, 1
  shape = dict(mesh.shape)
  return shape.get("data", 1) * shape.get("fsdp", 1), shape.get("tensor", 1)


def memory_at(model_config, mesh, batch: int, history_tokens: int, n: int, *, param_dtype="bfloat16",
              cache_dtype="bfloat16") -> SamplingMemory:
  """Per-device memory for `batch` prompts of `history_tokens` cache slots each, `n` samples per prompt.

  While the prompt cache is forked into `n` sample rows both exist, so a prompt costs `n + 1` rows when n > 1.
  Sampling weights are sharded over `tensor` only (no FSDP: they are gathered once, not per token), and the
  decode loop holds a second, per-layer copy of the layer weights while it runs (`rise_jax.models.decode.layer_weights`);
  kv heads shard over `tensor` when it divides them.
  """
  batch_shards, tensor = _mesh_axes(mesh)
  rows = batch * (n + 1 if n > 1 else 1)
  rows_per_device = math.ceil(rows / batch_shards)
  kv_split = tensor if model_config.num_kv_heads % tensor == 0 else 1
  layer_params = param_count(model_config) - _non_layer_params(model_config)
  weights = math.ceil((param_count(model_config) + layer_params) * _bytes(param_dtype) / tensor)
  kv = rows_per_device * history_tokens * kv_bytes_per_token(model_config, cache_dtype) // kv_split
  logits = rows_per_device * model_config.vocab_size * 4 * 3  # float32 logits, log-softmax and filtered copy
  return SamplingMemory(batch=batch, rows=rows, weights=weights, kv_cache=kv, logits=logits)


def plan(model_config, mesh, hbm_bytes: int, history_tokens: int, n: int = 1, *, param_dtype="bfloat16",
         cache_dtype="bfloat16", headroom: float = 0.1) -> int:
  """The largest prompt batch (a multiple of the mesh's batch shards) that fits `hbm_bytes` per device.

  Args:
    model_config: a `rise_jax.models.ModelConfig`.
    mesh: the sampling mesh (None = one device).
    hbm_bytes: memory of one device.
    history_tokens: cache slots per row (the longest history plus max_new_tokens).
    n: samples per prompt.
    headroom: fraction of the device kept free for activations and the compiler's temporaries.

  Raises ValueError when not even one batch-shard's worth of prompts fits.
  """
  batch_shards, _ = _mesh_axes(mesh)
  budget = int(hbm_bytes * (1 - headroom))
  fits = lambda b: memory_at(model_config, mesh, b, history_tokens, n, param_dtype=param_dtype,
                             cache_dtype=cache_dtype).total <= budget
  if not fits(batch_shards):
    m = memory_at(model_config, mesh, batch_shards, history_tokens, n, param_dtype=param_dtype,
                  cache_dtype=cache_dtype)
    raise ValueError(f"plan: {batch_shards} prompt(s) x n={n} x {history_tokens} tokens need "
                     f"{m.total / 2**30:.2f} GiB per device (weights {m.weights / 2**30:.2f}, kv "
                     f"{m.kv_cache / 2**30:.2f}) > {budget / 2**30:.2f} GiB usable")
  lo, hi = 1, 2
  while fits(hi * batch_shards):  # exponential then binary search over multiples of the batch shards
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid * batch_shards) else (lo, mid)
  batch = lo * batch_shards
  m = memory_at(model_config, mesh, batch, history_tokens, n, param_dtype=param_dtype, cache_dtype=cache_dtype)
  log.info("sampling plan: batch %d prompts x n=%d x %d tokens per device: weights %.2f GiB + kv cache %.2f GiB "
           "(%.3f MiB/token/row) + logits %.2f GiB of %.2f GiB usable", batch, n, history_tokens,
           m.weights / 2**30, m.kv_cache / 2**30, kv_bytes_per_token(model_config, cache_dtype) / 2**20,
           m.logits / 2**30, budget / 2**30)
  return batch
