"""rise_jax.sharding: the mesh, logical-axis rules, and sharded models equal to unsharded ones (8 fake CPUs)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rise_jax import sharding
from rise_jax.models import load_hf_checkpoint, save_hf_checkpoint

# The intended layout under TRAIN_RULES, written out independently of the rule table.
EXPECTED_TRAIN_SPECS = {
    ("embedder",): P("tensor", "fsdp"),
    ("layers", "attn_norm"): P(None, "fsdp"),
    ("layers", "q_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "k_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "v_proj"): P(None, "fsdp", "tensor", None),
    ("layers", "o_proj"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp_norm"): P(None, "fsdp"),
    ("layers", "gate_proj"): P(None, "fsdp", "tensor"),
    ("layers", "up_proj"): P(None, "fsdp", "tensor"),
    ("layers", "down_proj"): P(None, "tensor", "fsdp"),
    ("final_norm",): P("fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
}


def test_make_mesh_wildcard_and_errors():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((1, -1, 2))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:2]).shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  for bad in ((3, -1, 1), (-1, -1, 1), (2, 2, 1), (1, 0, 8)):
    with pytest.raises(ValueError):
      sharding.make_mesh(bad)


def _spec_of(x):
  return x.sharding.spec


def _drop_trailing_none(spec):
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return tuple(parts)


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, attention_mask=mask)


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_equals_unsharded(tiny_llama_gqa_path, shape):
  mesh = sharding.make_mesh(shape)
  model = load_hf_checkpoint(tiny_llama_gqa_path, mesh=mesh)
  # The sharding is real: each parameter has the intended spec and each device holds a smaller piece.
  for path, var in nnx.to_flat_state(nnx.state(model)):
    x = var.get_value()
    want = EXPECTED_TRAIN_SPECS[path]
    assert _drop_trailing_none(_spec_of(x)) == _drop_trailing_none(want), path
    shard = x.addressable_shards[0].data.shape
    for dim, (full, piece, axis) in enumerate(zip(x.shape, shard, list(want) + [None] * x.ndim)):
      size = {"fsdp": mesh.shape["fsdp"], "tensor": mesh.shape["tensor"], None: 1}[axis]
      assert piece == full // size, (path, dim)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 256, (4, 24))
  mask = np.ones_like(ids)
  mask[1, :7] = 0
  reference = load_hf_checkpoint(tiny_llama_gqa_path)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.default_matmul_precision("highest"):
    want = _forward(reference, jnp.asarray(ids), jnp.asarray(mask))
    with sharding.use_mesh(mesh):  # activation constraints apply under the mesh in scope
      got = _forward(model, jax.device_put(jnp.asarray(ids), rows), jax.device_put(jnp.asarray(mask), rows))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_indivisible_dimension_replicates_with_warning_or_raises(tiny_llama_gqa_path, caplog):
  mesh = sharding.make_mesh((1, 2, 4))  # kv_heads = 2 on tensor = 4
  with caplog.at_level(logging.WARNING, logger="rise_jax.sharding"):
    model = load_hf_checkpoint(tiny_llama_gqa_path, mesh=mesh)
  assert any("layers/k_proj" in r.getMessage() and "kv_heads" in r.getMessage() for r in caplog.records)
  assert _drop_trailing_none(model.layers["k_proj"][...].sharding.spec) == (None, "fsdp")
  assert _drop_trailing_none(model.layers["q_proj"][...].sharding.spec) == (None, "fsdp", "tensor")  # 4 heads
  with pytest.raises(ValueError, match=r"layers/k_proj.*kv_heads.*not divisible"):
    load_hf_checkpoint(tiny_llama_gqa_path, mesh=mesh, on_indivisible="raise")


def test_sample_rules_reshard_and_export(tiny_llama_gqa_path, tmp_path):
  mesh = sharding.make_mesh((4, 1, 2))
  model = load_hf_checkpoint(tiny_llama_gqa_path, mesh=sharding.make_mesh((1, 4, 2)))
  sharding.shard_model(model, mesh, sharding.SAMPLE_RULES)
  # Sampling layout: weights whole over data/fsdp, split over tensor only.
  assert _drop_trailing_none(model.layers["gate_proj"][...].sharding.spec) == (None, None, "tensor")
  assert _drop_trailing_none(model.embedder[...].sharding.spec) == ("tensor",)
  # Exporting the resharded model gathers every tensor back bit-exactly.
  from safetensors.numpy import load_file
  out = save_hf_checkpoint(model, tmp_path / "export")
  original, exported = load_file(tiny_llama_gqa_path / "model.safetensors"), load_file(f"{out}/model.safetensors")
  assert original.keys() == exported.keys()
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
