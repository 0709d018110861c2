"""Tiny random Hugging Face (PyTorch) checkpoints for tests, saved with `save_pretrained`.

Importable builders (other test files reuse them): each returns the checkpoint directory. Weights are drawn with
`initializer_range` 0.1 so logits are far from uniform and a wrong port cannot hide in tiny values.
"""

from __future__ import annotations

import os
import pathlib

import pytest

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TINY_MISTRAL = dict(TINY_LLAMA, num_key_value_heads=2, sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def _save(arch: str, path: str | os.PathLike, seed: int, fields: dict) -> pathlib.Path:
  torch = pytest.importorskip("torch")  # absent in the Python 3.12 CI leg: tests needing these checkpoints skip
  import transformers
  torch.manual_seed(seed)
  config = getattr(transformers, f"{arch}Config")(**fields)
  model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
  path = pathlib.Path(path)
  model.save_pretrained(path)
  return path


def save_tiny_llama(path: str | os.PathLike, seed: int = 0, **overrides) -> pathlib.Path:
  """A random LlamaForCausalLM saved to `path` (config fields overridable, e.g. num_key_value_heads=2)."""
  return _save("Llama", path, seed, {**TINY_LLAMA, **overrides})


def save_tiny_mistral(path: str | os.PathLike, seed: int = 0, **overrides) -> pathlib.Path:
  """A random MistralForCausalLM (sliding window 16 unless overridden) saved to `path`."""
  return _save("Mistral", path, seed, {**TINY_MISTRAL, **overrides})


def torch_model(path: str | os.PathLike):
  """The saved checkpoint loaded by transformers in float32 (the independent reference)."""
  torch = pytest.importorskip("torch")
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(path_or_model, ids, attention_mask=None):
  """float32 logits of a checkpoint directory (or an already loaded transformers model)."""
  import numpy as np
  torch = pytest.importorskip("torch")
  model = torch_model(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
  with torch.no_grad():
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    out = model(torch.as_tensor(np.asarray(ids)), attention_mask=mask)
  return out.logits.float().numpy()


# -- session fixtures (registered in tests/conftest.py): each checkpoint is built once per test session --------

@pytest.fixture(scope="session")
def tiny_llama_mha_path(tmp_path_factory) -> pathlib.Path:
  """Llama-2 style: multi-head attention, rope_theta 1e4, untied head."""
  return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_mha"))


@pytest.fixture(scope="session")
def tiny_llama_gqa_path(tmp_path_factory) -> pathlib.Path:
  """Grouped-query attention (4 query heads over 2 kv heads)."""
  return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_gqa"), seed=1, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory) -> pathlib.Path:
  """Mistral v0.1 style: sliding window 16, GQA."""
  return save_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"), seed=2)


@pytest.fixture(scope="session")
def tiny_llama_tied_path(tmp_path_factory) -> pathlib.Path:
  """Tied embeddings and an explicit head_dim (32) that is not hidden_size / heads (16)."""
  return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied"), seed=3, tie_word_embeddings=True,
                         head_dim=32, num_key_value_heads=2)
