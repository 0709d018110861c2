"""The device mesh and the map from logical axis names to mesh axes.

Every parameter names its axes logically (`embed`, `heads`, `mlp`, ...); a rule table maps those names onto the
`('data', 'fsdp', 'tensor')` mesh. Training shards weights over fsdp and tensor; sampling keeps them whole on
fsdp (gathered once) and splits only over tensor. A dimension the mesh axis does not divide is replicated with a
warning, or raises, as configured (`mesh.on_indivisible`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Weights: embed over fsdp (ZeRO-3 style), heads / mlp / vocab over tensor (Megatron style).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
)

# Sampling: weights gathered over fsdp once, split over tensor; rows spread over data and fsdp.
SAMPLE_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 replaced by whatever makes the product `num_devices`."""
  shape = tuple(int(d) for d in shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape} must be (data, fsdp, tensor)")
  if sum(d == -1 for d in shape) > 1 or any(d < 1 and d != -1 for d in shape):
    raise ValueError(f"mesh shape {shape}: each axis is a positive int, at most one -1")
  known = math.prod(d for d in shape if d != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if d == -1 else d for d in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD propagates shardings through the model)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * 3
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def single_device_mesh() -> Mesh:
  """The unsharded case: a 1x1x1 mesh on the default device."""
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = TRAIN_RULES):
  """Mesh + logical axis rules in scope: what flax NNX needs to build Params that carry a sharding."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def _mesh_size(mesh: Mesh | jax.sharding.AbstractMesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules,
                    on_indivisible: str = "replicate", name: str = "array", warn: bool = True) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose axes are named `logical_axes`.

  A mesh axis is used at most once per array (a later dimension that maps to an already-used mesh axis stays
  replicated), and a dimension its mesh axes do not divide is replicated (warning) or raises.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, axis in zip(shape, logical_axes):
    mesh_axes = table.get(axis) if axis is not None else None
    if mesh_axes is not None:
      as_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      as_tuple = tuple(a for a in as_tuple if a not in used and mesh.shape[a] > 1)
      mesh_axes = None if not as_tuple else (as_tuple[0] if len(as_tuple) == 1 else as_tuple)
    size = _mesh_size(mesh, mesh_axes)
    if mesh_axes is not None and dim % size:
      msg = (f"{name}: dimension {axis!r} of size {dim} is not divisible by mesh axes {mesh_axes} "
             f"(size {size})")
      if on_indivisible == "raise":
        raise ValueError(msg + "; set mesh.on_indivisible='replicate' to replicate it instead")
      if warn:
        log.warning("%s; replicating it", msg)
      mesh_axes = None
    if mesh_axes is not None:
      used.update((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes)
    spec.append(mesh_axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Pin an activation's layout under the mesh and rules in scope (`use_mesh`); a no-op without a mesh.

  Indivisible dimensions (a decode batch of 1) are replicated silently: activations change shape every call.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  rules = spmd.get_logical_axis_rules() or TRAIN_RULES
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules, "replicate", "activation", warn=False)
  return jax.lax.with_sharding_constraint(x, spec)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = TRAIN_RULES,
                    on_indivisible: str = "replicate") -> Any:
  """A NamedSharding for every Variable in an NNX state (abstract or concrete), from its `logical_axes`."""

  def one(path, var):
    axes = var.get_metadata().get("logical_axes")
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if axes is None:
      spec = PartitionSpec()
    else:
      spec = logical_to_spec(axes, var.get_value().shape, mesh, rules, on_indivisible, name)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = TRAIN_RULES,
                on_indivisible: str = "replicate") -> nnx.Module:
  """Reshard a model's state in place onto `mesh` under `rules` (e.g. train -> sample layout)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules, on_indivisible)
  nnx.update(model, jax.device_put(state, shardings))
  return model
