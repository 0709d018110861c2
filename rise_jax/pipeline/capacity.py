"""Static checks that a config fits the hardware it documents, without a single real array.

`check(config, hardware)`:
  * builds the model abstractly (`nnx.eval_shape`) and the engine's KV pool (`jax.eval_shape`), maps every
    array's logical axes onto a `jax.sharding.AbstractMesh` of the documented shape with the training and sampling
    rules, and raises if any dimension does not divide its mesh axes (`on_indivisible="raise"`);
  * estimates per-device memory analytically for the training phase (parameters, gradients, Adam moments,
    activations under the configured remat policy and attention backend, logits) and the sampling phase
    (parameters in compute dtype plus the engine's block pool), and raises when the larger exceeds the chip's HBM
    less a headroom for XLA temporaries.
The training estimate (`train_estimate`) is calibrated against the compiled step's `memory_analysis()`
(`rise_jax.train.memory`): within 15% at three sizes on CPU (tests/test_train_memory.py), and it reproduces the
126.7 GiB measured for a Llama-2-7B step on an H200 (docs/benchmarks.md). It is still a model: it catches a config
that is off by a factor, it does not promise that one at 95% fits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from rise_jax import sharding
from rise_jax.models import attention as attention_lib
from rise_jax.models import configs as model_configs
from rise_jax.models.transformer import Transformer
from rise_jax.sampling import paged
from rise_jax.sampling.engine import default_num_blocks
from rise_jax.train.trainer import LOGITS_BUDGET, VOCAB_CHUNK

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What a config was sized for: a TPU slice or a GPU node (documented in the config file as `HARDWARE`)."""
  name: str            # e.g. "TPU v4-32 (16 chips)"
  num_devices: int
  hbm_gib: float       # per device
  headroom: float = 0.85  # fraction of HBM the estimate may use; the rest is XLA scratch and fragmentation
  platform: str = "cpu"   # what model.attention="auto" resolves against: "tpu", "cuda" (NVIDIA) or "cpu"


TPU_V4_32 = Hardware("TPU v4-32 (16 chips, 32 GiB HBM each)", 16, 32.0, platform="tpu")
TPU_V5P_16 = Hardware("TPU v5p-16 (8 chips, 95 GiB HBM each)", 8, 95.0, platform="tpu")
GPU_8XA100_80 = Hardware("8x NVIDIA A100 80GB (one node)", 8, 80.0, platform="cuda")
GPU_1XH100_80 = Hardware("1x NVIDIA H100 80GB", 1, 80.0, platform="cuda")
CPU_2_CORES = Hardware("CPU, 2 cores (no accelerator)", 1, 8.0)


@dataclasses.dataclass
class Estimate:
  """Per-device bytes of each component, and the mesh shapes they were computed for."""
  train_mesh: tuple[int, int, int]
  sample_mesh: tuple[int, int, int]
  params: float = 0.0
  grads: float = 0.0
  optimizer: float = 0.0
  activations: float = 0.0
  logits: float = 0.0
  sample_params: float = 0.0
  kv_cache: float = 0.0
  num_params: int = 0

  @property
  def train_total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations + self.logits

  @property
  def sample_total(self) -> float:
    return self.sample_params + self.kv_cache

  @property
  def peak(self) -> float:
    return max(self.train_total, self.sample_total)

  def table(self) -> str:
    rows = [("params", self.params), ("grads", self.grads), ("Adam moments", self.optimizer),
            ("activations", self.activations), ("logits", self.logits), ("train total", self.train_total),
            ("sampling params", self.sample_params), ("KV cache", self.kv_cache),
            ("sampling total", self.sample_total)]
    return "\n".join(f"{name:>16}: {value / GiB:8.2f} GiB" for name, value in rows)


def abstract_mesh(shape) -> jax.sharding.AbstractMesh:
  return jax.sharding.AbstractMesh(tuple(shape), sharding.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _model_config(config):
  if config.model.source == "preset":
    return model_configs.get_preset(config.model.preset).config
  for preset in model_configs.PRESETS.values():
    if preset.hf_repo == config.model.hf_path:
      return preset.config
  return model_configs.ModelConfig.from_hf(config.model.hf_path)


def _sharded_bytes(shape, spec, mesh, itemsize: int) -> float:
  """Bytes one device holds of an array of `shape` sharded by `spec` on `mesh`."""
  n = math.prod(shape) * itemsize
  for axes in spec:
    if axes is not None:
      n /= math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  return n


def _abstract_params(mc, param_dtype: str):
  """(name, shape, logical axes) of every parameter, from the real module built abstractly."""
  model = nnx.eval_shape(lambda: Transformer(mc, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = "/".join(map(str, path))
    out.append((name, tuple(var.value.shape), tuple(var.get_metadata()["logical_axes"])))
  return out


# Calibrated against the compiled step's `memory_analysis()` (rise_jax.train.memory; tests/test_train_memory.py).


def _saved_per_token(remat: str, d: int, qkv: int, f: float) -> float:
  """Compute-dtype elements one layer keeps per token: with no remat (the custom-VJP layer: `dense`, `rms_norm`,
  `swiglu_down`) the norms' inputs and outputs, q/k/v as attention takes them, the attention output, the MLP's gate
  and up; a layer recomputed under a policy (plain einsums) also keeps the residual stream, q/k before rotary, silu,
  the sigmoid and the product; with `dots_with_no_batch_dims` the weight matmuls' outputs (q, k, v, o, gate, up,
  down); with `full` the layer input."""
  return {"none": 5 * d + qkv + 2 * f, "recomputed": 6 * d + 2 * qkv + 5 * f, "full": d}.get(remat, 2 * d + qkv + 2 * f)


ATTENTION_TRANSIENTS = 4.5  # float32 [rows, heads, block, length] arrays alive in the xla attention's backward
# float32 [tokens, vocab chunk] arrays alive at the peak: the loss's one-chunk VJP keeps softmax - onehot (plus
# part of a transient); the chunked loss recomputes each chunk's logits, their exponentials and gradient.
LOGITS_ONE_CHUNK, LOGITS_CHUNKED = 1.5, 3


def train_estimate(config, mc, train_shape, platform: str) -> Estimate:
  """Per-device training memory of `config`'s model `mc` on a (data, fsdp, tensor) mesh of `platform` devices."""
  train_mesh = abstract_mesh(train_shape)
  est = Estimate(train_mesh=train_shape, sample_mesh=train_shape)
  p_bytes = DTYPE_BYTES[config.model.param_dtype]
  c_bytes = DTYPE_BYTES[config.model.dtype]
  m_bytes = DTYPE_BYTES[config.train.moments_dtype]
  layer_params = 0.0
  for name, shape, axes in _abstract_params(mc, config.model.param_dtype):
    est.num_params += math.prod(shape)
    spec = sharding.logical_to_spec(axes, shape, train_mesh, sharding.TRAIN_RULES, "raise", f"train {name}")
    elements = _sharded_bytes(shape, spec, train_mesh, 1)
    est.params += elements * p_bytes
    est.grads += elements * 4                                  # gradients accumulate in float32
    est.optimizer += 2 * elements * m_bytes                    # Adam mu, nu
    layer_params += elements if name.startswith("layers") else 0
  t = config.train
  if t.global_batch > t.micro_batch:
    est.grads *= 2                                             # the accumulator beside one micro-batch's gradients
  if m_bytes < 4:  # measured: the update widens bf16 moments to float32 as it goes (7B: +12 of 25 GiB of moments)
    est.optimizer *= 1.5

  # Activations for one micro-batch (gradient accumulation keeps only one alive).
  batch_ways = train_shape[0] * train_shape[1]
  if t.micro_batch % batch_ways:
    raise ValueError(f"train.micro_batch {t.micro_batch} is not divisible by the data x fsdp mesh axes "
                     f"({batch_ways}) of mesh.train {train_shape}")
  rows, length, tensor = t.micro_batch // batch_ways, t.max_length, train_shape[2]
  tokens = rows * length
  d, f = mc.hidden_size, mc.intermediate_size / tensor
  heads = max(1, mc.num_heads // tensor)
  qkv = (heads + 2 * max(1, mc.num_kv_heads // tensor)) * mc.head_dim
  layer_recomputed = tokens * _saved_per_token("recomputed", d, qkv, f) * c_bytes
  remat, scan = config.model.remat, config.model.scan_layers
  stacked = mc.num_layers * tokens * _saved_per_token(remat, d, qkv, f) * c_bytes
  if remat == "none":
    est.activations = stacked
    if not scan and c_bytes < p_bytes:                         # each layer's compute-dtype weight copy is kept
      est.activations += layer_params * c_bytes
  else:
    est.activations = stacked + layer_recomputed               # + the layer being recomputed
    if not scan:                                               # recomputation keeps each layer's weight slices
      est.activations += layer_params * p_bytes
  if scan:  # measured: a layer scan's compiled peak holds its stacked residuals about twice (1.1B: +6 to +19 GiB)
    est.activations += stacked
  backend = attention_lib.resolve(config.model.attention, config.model.dtype, mc.head_dim, platform)
  if backend == "xla":
    block = min(length, attention_lib.QUERY_BLOCK,
                max(16, attention_lib.SCORE_BUDGET // (rows * mc.num_heads * length)))
    est.activations += ATTENTION_TRANSIENTS * rows * heads * block * length * 4
  vocab = mc.vocab_size / tensor
  if tokens * mc.vocab_size <= LOGITS_BUDGET:
    est.logits = LOGITS_ONE_CHUNK * tokens * vocab * 4
  else:
    est.logits = LOGITS_CHUNKED * tokens * min(vocab, VOCAB_CHUNK) * 4
  return est


def check(config, hardware: Hardware) -> Estimate:
  """Raise ValueError naming the array (divisibility) or the budget (memory); return the estimate."""
  mc = _model_config(config)
  train_shape = sharding.resolve_mesh_shape(config.mesh.train, hardware.num_devices)
  sample_shape = sharding.resolve_mesh_shape(config.mesh.sample, hardware.num_devices)
  sample_mesh = abstract_mesh(sample_shape)
  est = train_estimate(config, mc, train_shape, hardware.platform)
  est.sample_mesh = sample_shape
  c_bytes = DTYPE_BYTES[config.model.dtype]
  for name, shape, axes in _abstract_params(mc, config.model.param_dtype):
    spec = sharding.logical_to_spec(axes, shape, sample_mesh, sharding.SAMPLE_RULES, "raise", f"sample {name}")
    est.sample_params += _sharded_bytes(shape, spec, sample_mesh, c_bytes)

  est.kv_cache = _pool_bytes(config, mc, sample_mesh, c_bytes)

  budget = hardware.hbm_gib * GiB * hardware.headroom
  if est.peak > budget:
    raise ValueError(f"estimated peak {est.peak / GiB:.1f} GiB per device exceeds {hardware.headroom:.0%} of "
                     f"{hardware.hbm_gib} GiB on {hardware.name}:\n{est.table()}")
  return est


def _pool_bytes(config, mc, sample_mesh, c_bytes: int) -> float:
  """The engine's block pool: independent of batch_size and samples (slots bound the rows in flight); whole
  on every data shard, kv heads split over tensor, as `Engine` places it."""
  s = config.sampling
  capacity = min(s.max_cache_length, mc.max_position_embeddings)
  num_blocks = s.num_blocks or default_num_blocks(s.slots, capacity, s.block_size)
  pool = jax.eval_shape(lambda: paged.init_pool(mc, num_blocks, s.block_size,
                                                np.dtype("float32") if c_bytes == 4 else "bfloat16"))
  leaf = pool.k[0]
  spec = sharding.logical_to_spec((None, "kv_heads", None, "head_dim"), leaf.shape, sample_mesh,
                                  sharding.SAMPLE_RULES, "raise",
                                  f"KV pool ({num_blocks} blocks of {s.block_size}; sampling.num_blocks)")
  return 2 * len(pool.k) * _sharded_bytes(leaf.shape, spec, sample_mesh, leaf.dtype.itemsize)
