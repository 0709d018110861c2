"""Llama / Mistral decoders in Flax NNX, their configs and presets, and Hugging Face checkpoint I/O."""

from rise_jax.models.build import abstract_model, build_model
from rise_jax.models.configs import PRESETS, Llama3RopeScaling, ModelConfig, Preset, get_preset
from rise_jax.models.hf_io import load_hf_checkpoint, save_hf_checkpoint
from rise_jax.models.load import load_model
from rise_jax.models.transformer import KVCache, Transformer, init_cache

__all__ = [
    "PRESETS", "KVCache", "Llama3RopeScaling", "ModelConfig", "Preset", "Transformer", "abstract_model",
    "build_model", "get_preset", "init_cache", "load_hf_checkpoint", "load_model", "save_hf_checkpoint",
]
