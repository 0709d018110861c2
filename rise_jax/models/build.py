"""Build a Transformer straight into its sharding: random init (`build_model`); `models.load` loads from config.

State is never materialised on one device first: `nnx.eval_shape` gives the abstract model, `rise_jax.sharding`
gives each parameter's NamedSharding from its logical axes, and a jitted init writes every leaf into its shard.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from rise_jax import sharding as sharding_lib
from rise_jax.models.configs import ModelConfig
from rise_jax.models.transformer import Transformer


def abstract_model(config: ModelConfig, mesh: Mesh, rules=sharding_lib.TRAIN_RULES, on_indivisible="replicate",
                   **options) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, abstract state, NamedSharding state) of a model, without allocating its parameters."""
  with sharding_lib.use_mesh(mesh, rules):
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), **options))
  graphdef, state = nnx.split(abstract)
  return graphdef, state, sharding_lib.state_shardings(state, mesh, rules, on_indivisible)


def build_model(config: ModelConfig, *, mesh: Mesh | None = None, param_dtype: Any = "float32",
                dtype: Any = "float32", attention: str = "xla", scan_layers: bool = False, remat: str = "none",
                seed: int = 0, rules=sharding_lib.TRAIN_RULES, on_indivisible: str = "replicate") -> Transformer:
  """A randomly initialised model whose parameters are created directly in their target sharding."""
  mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
  options = dict(param_dtype=param_dtype, dtype=dtype, attention=attention, scan_layers=scan_layers, remat=remat)
  graphdef, _, shardings = abstract_model(config, mesh, rules, on_indivisible, **options)

  def init():
    return nnx.state(Transformer(config, rngs=nnx.Rngs(seed), **options))

  with sharding_lib.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
