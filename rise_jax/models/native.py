"""rise_jax's own model checkpoint: `model_config.json` (the ModelConfig) plus the parameters as an orbax tree.

Restores go straight into the target sharding (an abstract, sharded target), so a model saved on one mesh loads
onto another; a leaf the target lacks, or lacks in the checkpoint, is an orbax error naming the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from rise_jax import sharding as sharding_lib
from rise_jax.models.build import abstract_model
from rise_jax.models.configs import Llama3RopeScaling, ModelConfig
from rise_jax.models.transformer import Transformer
from rise_jax.files import atomic_write_text

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_json(config: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def config_from_json(d: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}")
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
  d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
  return ModelConfig(**d)


def save_model(model: Transformer, path: str | os.PathLike) -> str:
  """Write `model_config.json` and the parameters (orbax, every process joins) under `path`."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  atomic_write_text(os.path.join(path, CONFIG_FILE), json.dumps(config_to_json(model.config), indent=2))
  return path


def load_model_dir(path: str | os.PathLike, mesh: Mesh | None = None, *, rules=sharding_lib.TRAIN_RULES,
                   on_indivisible: str = "replicate", **options) -> Transformer:
  """Restore a `save_model` directory into a model sharded on `mesh` (options: param_dtype, dtype, ...)."""
  path = os.path.abspath(os.fspath(path))
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a rise_jax model directory)")
  with open(config_path) as f:
    config = config_from_json(json.load(f), config_path)
  mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
  graphdef, state, shardings = abstract_model(config, mesh, rules, on_indivisible, **options)
  target = nnx.from_flat_state({
      path: var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                             sharding=sharding.get_value()))
      for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings))})
  restored = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), target)
  return nnx.merge(graphdef, restored)

