"""Parity of rise_jax's decoder with transformers (PyTorch) on tiny random checkpoints, with mutation checks.

Metric per case: per row over non-pad positions ||jax - torch|| / ||torch|| <= 1e-4 and argmax agreement
>= 99.9% (max abs difference printed too). Each case also runs a deliberately wrong variant of the port (the bug
the case exists to catch); it must miss by more than 100x the tolerance, or the case has no power.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rise_jax.models import load_hf_checkpoint
from rise_jax.models.transformer import rope_inv_freq
from tests.fixtures_models import save_tiny_llama, torch_logits, torch_model

TOL = 1e-4
MUTANT_MIN = 100 * TOL


def compare(out, ref, mask=None):
  """(worst per-row relative error over non-pad positions, argmax agreement, max abs difference)."""
  out, ref = np.asarray(out), np.asarray(ref)
  mask = np.ones(ref.shape[:2], bool) if mask is None else np.asarray(mask, bool)
  rel = max(np.linalg.norm((out - ref)[i][mask[i]]) / np.linalg.norm(ref[i][mask[i]]) for i in range(len(ref)))
  agree = (out.argmax(-1) == ref.argmax(-1))[mask].mean()
  return float(rel), float(agree), float(np.abs(out - ref)[mask].max())


def mutant(model, **config_changes):
  """A copy of `model` (sharing its weights) whose architecture config is deliberately wrong."""
  graphdef, state = nnx.split(model)
  wrong = nnx.merge(graphdef, state)
  wrong.config = dataclasses.replace(model.config, **config_changes)
  return wrong


def check(name, out, ref, wrong_outs, mask=None):
  rel, agree, max_abs = compare(out, ref, mask)
  print(f"\n[parity] {name}: worst row rel err {rel:.2e}, argmax agreement {agree:.4f}, max abs {max_abs:.2e}")
  assert rel <= TOL, f"{name}: relative error {rel:.3e} > {TOL}"
  assert agree >= 0.999, f"{name}: argmax agreement {agree:.4f}"
  for label, wrong in wrong_outs.items():
    distance = compare(wrong, ref, mask)[0]
    print(f"[mutation] {name} / {label}: rel err {distance:.2e} (needs > {MUTANT_MIN:.0e})")
    assert distance > MUTANT_MIN, f"{name}: mutant '{label}' is only {distance:.2e} away: the case has no power"


@nnx.jit
def _jit_forward(model, ids, attention_mask):
  return model(ids, attention_mask=attention_mask)


def forward(model, ids, attention_mask=None):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_jit_forward(model, jnp.asarray(ids), None if attention_mask is None else
                                   jnp.asarray(attention_mask)))


def test_llama2_mha(tiny_llama_mha_path):
  path = tiny_llama_mha_path
  ids = np.random.RandomState(0).randint(0, 256, (2, 64))
  ref = torch_logits(path, ids)
  model = load_hf_checkpoint(path)
  check("llama2-mha", forward(model, ids), ref,
        {"rope_theta 5e5 (not read from config)": forward(mutant(model, rope_theta=5e5), ids)})


def test_llama3_gqa_rope_scaling_long(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
  path = save_tiny_llama(tmp_path, hidden_size=128, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rope_parameters=rope)
  model = load_hf_checkpoint(path)
  assert model.config.head_dim >= 64 and model.config.num_kv_heads < model.config.num_heads
  # Each llama3 band (kept, interpolated, slowed) must hold >= 2 frequencies, or the test cannot see it.
  wavelen = 2 * np.pi / rope_inv_freq(dataclasses.replace(model.config, rope_scaling=None))
  high, low = 256 / 4.0, 256 / 1.0
  bands = [(wavelen < high).sum(), ((wavelen >= high) & (wavelen <= low)).sum(), (wavelen > low).sum()]
  assert min(bands) >= 2, bands
  ids = np.random.RandomState(1).randint(0, 256, (1, 2048))
  ref = torch_logits(path, ids)
  check("llama3-gqa-scaled-2048", forward(model, ids), ref,
        {"rope_theta 1e4": forward(mutant(model, rope_theta=1e4), ids),
         "no llama3 scaling": forward(mutant(model, rope_scaling=None), ids)})


def test_mistral_sliding_window(tiny_mistral_path):
  path = tiny_mistral_path
  model = load_hf_checkpoint(path)
  assert model.config.sliding_window == 16
  ids = np.random.RandomState(2).randint(0, 256, (2, 96))  # 6x the window
  ref = torch_logits(path, ids)
  check("mistral-window16-len96", forward(model, ids), ref,
        {"no window": forward(mutant(model, sliding_window=None), ids)})


def test_tied_embeddings_explicit_head_dim(tiny_llama_tied_path):
  path = tiny_llama_tied_path
  model = load_hf_checkpoint(path)
  c = model.config
  assert c.tie_word_embeddings and model.lm_head is None and c.head_dim != c.hidden_size // c.num_heads
  ids = np.random.RandomState(3).randint(0, 256, (2, 32))
  ref = torch_logits(path, ids)
  untied = mutant(model, tie_word_embeddings=False)
  untied.lm_head = nnx.data(nnx.Param(jax.random.normal(jax.random.key(0), (c.hidden_size, c.vocab_size)) * 0.1,
                                      logical_axes=("embed", "vocab")))
  check("tied-head_dim32", forward(model, ids), ref, {"untied head": forward(untied, ids)})


def test_left_padded_ragged_batch(tiny_llama_gqa_path):
  path = tiny_llama_gqa_path
  model = load_hf_checkpoint(path)
  reference = torch_model(path)
  rng = np.random.RandomState(4)
  lengths, width = [24, 17, 9], 24
  rows = [rng.randint(3, 256, n) for n in lengths]
  ids = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  ref = np.zeros((len(rows), width, 256), np.float32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
    ref[i, width - len(row):] = torch_logits(reference, row[None])[0]  # each row alone, unpadded
  check("left-padded-ragged", forward(model, ids, attention_mask=jnp.asarray(mask)), ref,
        {"positions/mask ignored (pads attended)": forward(model, ids)}, mask=mask)
