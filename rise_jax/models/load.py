"""The model a config's `model` section names: a random preset built in its sharding, or an HF checkpoint. Kept
apart from `build` (random init) and `hf_io` (checkpoint I/O), which both sit below it."""

from __future__ import annotations

import os

from jax.sharding import Mesh

from rise_jax import sharding as sharding_lib
from rise_jax.models.build import build_model
from rise_jax.models.configs import get_preset
from rise_jax.models.hf_io import load_hf_checkpoint
from rise_jax.models.transformer import Transformer


def load_model(model_cfg, mesh: Mesh | None = None, rules=sharding_lib.TRAIN_RULES,
               on_indivisible: str = "replicate", seed: int = 0, path: str | os.PathLike | None = None) -> Transformer:
  """The model a config's `model` section names: a random preset, or an HF checkpoint directory.

  `path`: another HF checkpoint (a train stage's export, a teacher) loaded with the section's dtypes, attention,
  scan and remat settings instead of what `source` names, so every model of a run is loaded the same way.
  """
  options = dict(param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, attention=model_cfg.attention,
                 scan_layers=model_cfg.scan_layers, remat=model_cfg.remat)
  if path is None and model_cfg.source == "preset":
    return build_model(get_preset(model_cfg.preset).config, mesh=mesh, rules=rules,
                       on_indivisible=on_indivisible, seed=seed, **options)
  if path is not None or model_cfg.source == "hf":
    return load_hf_checkpoint(model_cfg.hf_path if path is None else path, dtype=options.pop("param_dtype"),
                              mesh=mesh, rules=rules, on_indivisible=on_indivisible,
                              compute_dtype=options.pop("dtype"), **options)
  raise ValueError(f"model.source: {model_cfg.source!r} is not one of ('preset', 'hf')")
