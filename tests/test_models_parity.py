"""Parity of rise_jax's decoder with transformers (PyTorch) on tiny random checkpoints.

Metric per case: per row over non-pad positions ||jax - torch|| / ||torch|| <= 1e-4, argmax agreement >= 99.9%.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rise_jax.models import load_hf_checkpoint
from tests.fixtures_models import save_tiny_llama, torch_logits

TOL = 1e-4


def relative_errors(out, ref, mask=None):
  """Worst per-row relative error (over non-pad positions), argmax agreement, max abs difference."""
  mask = np.ones(ref.shape[:2], bool) if mask is None else np.asarray(mask, bool)
  rel = max(np.linalg.norm((out - ref)[i][mask[i]]) / np.linalg.norm(ref[i][mask[i]]) for i in range(len(ref)))
  agree = (out.argmax(-1) == ref.argmax(-1))[mask].mean()
  return float(rel), float(agree), float(np.abs(out - ref)[mask].max())


@pytest.fixture(scope="module")
def llama2_mha(tmp_path_factory):
  return save_tiny_llama(tmp_path_factory.mktemp("llama2_mha"))


def test_llama2_mha_matches_transformers(llama2_mha):
  ids = np.random.RandomState(0).randint(0, 256, (2, 48))
  ref = torch_logits(llama2_mha, ids)
  with jax.default_matmul_precision("highest"):
    out = np.asarray(load_hf_checkpoint(llama2_mha)(jnp.asarray(ids)))
  rel, agree, max_abs = relative_errors(out, ref)
  print(f"llama2-mha: rel {rel:.2e} argmax {agree:.4f} max_abs {max_abs:.2e}")
  assert rel <= TOL and agree >= 0.999
