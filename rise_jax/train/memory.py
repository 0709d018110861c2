"""Where a train step's device memory goes, from the compiled program alone (nothing is allocated).

`step_memory(trainer, rows, length)` builds the abstract state (`jax.eval_shape`) and batch
(`jax.ShapeDtypeStruct`), lowers and compiles `trainer.step`, and reads `memory_analysis()`. The compiled totals
(arguments, outputs, donated aliases, temporaries) are set beside the program's own arrays: parameters and
optimiser state per dtype (the state tree), one float32 gradient per parameter, and the residuals the backward
saves for one micro-batch under the model's remat policy (`jax.ad_checkpoint.print_saved_residuals`), so the peak
reads as params + optimiser + gradients + saved activations + the rest (XLA's transients). Single device.
The saved list is what the program asks for: XLA may fuse some of it away (then the rest is negative).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from rise_jax import sharding as sharding_lib
from rise_jax.models.build import abstract_model
from rise_jax.train.trainer import Trainer

GiB = 1024 ** 3
BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                "weights": jnp.float32}


def _bytes_by_dtype(leaves) -> dict[str, int]:
  out = collections.Counter()
  for x in leaves:
    out[jnp.dtype(x.dtype).name] += x.size * jnp.dtype(x.dtype).itemsize
  return dict(out)


@dataclasses.dataclass
class StepMemory:
  """Per-device bytes of one compiled train step; dicts are keyed by dtype name."""
  params: dict[str, int]
  opt_state: dict[str, int]
  grads: dict[str, int]
  saved: dict[str, int]              # residuals kept from the forward for the backward (one micro-batch)
  saved_by_source: dict[str, int]    # the same, by the function that produced them
  arguments: int                     # compiled: state + batch in
  outputs: int                       # compiled: state + metrics out
  aliased: int                       # compiled: outputs written into donated arguments
  temp: int                          # compiled: everything else XLA allocates (gradients, activations, ...)

  @property
  def peak(self) -> int:
    """Compiled peak: what is live in, out and in between (CPU's `peak_memory_in_bytes` omits temporaries)."""
    return self.arguments + self.outputs - self.aliased + self.temp

  @property
  def state(self) -> int:
    return sum(self.params.values()) + sum(self.opt_state.values())

  @property
  def donated(self) -> bool:
    """The new state reuses the old state's buffers (no second copy of params + moments)."""
    return self.aliased >= self.state

  @property
  def expected(self) -> int:
    """Parameters + optimiser state + gradients + saved activations."""
    return self.state + sum(self.grads.values()) + sum(self.saved.values())

  @property
  def rest(self) -> int:
    """The part of the peak the four named components do not explain (negative: XLA kept less than listed)."""
    return self.peak - self.expected

  def table(self, top: int = 8) -> str:
    def row(name, d):
      parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(d.items()))
      return f"{name:>24}: {sum(d.values()) / GiB:8.2f} GiB  ({parts})"
    lines = [row("parameters", self.params), row("optimizer state", self.opt_state), row("gradients", self.grads),
             row("saved activations", self.saved)]
    lines += [f"{'':>26}{v / GiB:8.3f} GiB  {k}" for k, v in
              sorted(self.saved_by_source.items(), key=lambda kv: -kv[1])[:top]]
    lines += [f"{'sum (expected)':>24}: {self.expected / GiB:8.2f} GiB",
              f"{'compiled peak':>24}: {self.peak / GiB:8.2f} GiB  = arguments {self.arguments / GiB:.2f} + "
              f"outputs {self.outputs / GiB:.2f} - donated {self.aliased / GiB:.2f} + temporaries "
              f"{self.temp / GiB:.2f}",
              f"{'rest (transients)':>24}: {self.rest / GiB:8.2f} GiB; peak / expected = "
              f"{self.peak / self.expected:.3f}; state donated: {self.donated}"]
    return "\n".join(lines)


def abstract_state(trainer):
  """The TrainState as ShapeDtypeStructs carrying their training shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.abstract_state,
                      trainer.state_shardings)


def abstract_batch(trainer, rows: int, length: int, micro: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((micro, rows, length), dt, sharding=trainer.batch_sharding)
          for k, dt in BATCH_DTYPES.items()}


def compile_step(trainer, rows: int, length: int, micro: int = 1):
  """`trainer.step` lowered and compiled for abstract arguments (donation included)."""
  norm = jax.ShapeDtypeStruct((), jnp.float32, sharding=trainer.replicated)
  with jax.set_mesh(trainer.mesh):
    return trainer.step.lower(abstract_state(trainer), abstract_batch(trainer, rows, length, micro), norm).compile()


_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")   # "f32[8,1024,2048] output of dot_general from ..."
_SOURCE = re.compile(r"from (\S+?):\d+(?::\d+)? \((\S+?)\)")
_SHORT_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64", "i32": "int32",
                 "i64": "int64", "u32": "uint32", "i8": "int8", "u8": "uint8", "bool": "bool"}


def saved_residuals(trainer, rows: int, length: int) -> list[tuple[int, str, str]]:
  """(bytes, dtype, where it was made) of every residual one micro-batch's backward keeps, read from
  `jax.ad_checkpoint.print_saved_residuals`; the parameters themselves (counted as state) are left out."""
  params = trainer.abstract_state.params
  micro = {k: jax.ShapeDtypeStruct((rows, length), dt) for k, dt in BATCH_DTYPES.items()}
  loss = lambda p, m: trainer._loss(p, m, jnp.float32(1.0))[0]
  out = io.StringIO()
  with jax.set_mesh(trainer.mesh), contextlib.redirect_stdout(out):
    print_saved_residuals(loss, params, micro)
  found = []
  for line in out.getvalue().splitlines():
    m = _RESIDUAL.match(line)
    if m is None or m.group(3).startswith("from the argument"):
      continue
    dtype = _SHORT_DTYPES[m.group(1)]
    size = math.prod(int(n) for n in m.group(2).split(",") if n)
    found.append((size * jnp.dtype(dtype).itemsize, dtype, m.group(3)))
  return found


def _source(description: str) -> str:
  m = _SOURCE.search(description)
  return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2).split('.<locals>.')[-1]}" if m else description[:40]


def step_memory(trainer, rows: int, length: int, micro: int = 1) -> StepMemory:
  """The breakdown of `trainer.step` at a batch of `micro` x `rows` x `length` tokens."""
  stats = compile_step(trainer, rows, length, micro).memory_analysis()
  state = abstract_state(trainer)
  residuals = saved_residuals(trainer, rows, length)
  by_source, by_dtype = collections.Counter(), collections.Counter()
  for nbytes, dtype, src in residuals:
    by_source[_source(src)] += nbytes
    by_dtype[dtype] += nbytes
  return StepMemory(
      params=_bytes_by_dtype(jax.tree.leaves(state.params)),
      opt_state=_bytes_by_dtype(jax.tree.leaves(state.opt_state)),
      grads={"float32": sum(x.size * 4 for x in jax.tree.leaves(state.params))},
      saved=dict(by_dtype), saved_by_source=dict(by_source),
      arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
      aliased=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)


def abstract_trainer(config, tx, lr_schedule, *, mesh=None, **model_options):
  """A `Trainer` for `config` whose model was built abstractly: its step compiles, nothing is allocated."""
  mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
  graphdef, state, _ = abstract_model(config, mesh, **model_options)
  return Trainer(nnx.merge(graphdef, state), mesh, tx, lr_schedule)
