"""The jitted token-selection function against the analytically filtered softmax (numpy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rise_jax.sampling import select

VOCAB = 16
DRAWS = 50_000
# Integer weights summing to 64: every probability is dyadic, so float32 softmax and cumulative sums are exact
# and "mass >= p" at p = 0.75 is an exact boundary (the top seven tokens hold exactly 48/64).
WEIGHTS = np.array([16, 8, 8, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 1, 1], np.float64)
PERM = np.random.default_rng(0).permutation(VOCAB)  # shuffled so the filter cannot rely on the vocab order
LOGITS = np.log(WEIGHTS)[PERM]


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Independent float64 re-derivation of the token selection rules (rise_jax.sampling.requests)."""
  if temperature == 0:
    out = np.zeros_like(logits)
    out[np.argmax(logits)] = 1
    return out
  z = logits / temperature
  keep = np.ones(len(z), bool)
  if 0 < top_k < len(z):
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  kept, mass = [], 0.0
  for i in order:  # the smallest set, largest first, whose mass reaches top_p
    if not keep[i] or mass >= top_p:
      break
    kept.append(i)
    mass += p[i]
  final = np.where(p >= p[kept].min(), p, 0.0)  # ties with the last kept token are kept
  return final / final.sum()


@pytest.fixture(scope="module")
def draw():
  jitted = jax.jit(select.select_tokens)

  def run(temperature, top_k, top_p, seed=0, logits=LOGITS):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (DRAWS, VOCAB))
    full = lambda v, dt: jnp.full((DRAWS,), v, dt)
    tokens, logprobs, sampling_lp = jitted(rows, keys, full(temperature, jnp.float32), full(top_k, jnp.int32),
                                           full(top_p, jnp.float32))
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(sampling_lp)

  return run


def assert_matches(counts: np.ndarray, probs: np.ndarray):
  assert counts[probs == 0].sum() == 0, f"filtered tokens were drawn: {counts[probs == 0]}"
  support = probs > 0
  if support.sum() == 1:
    return
  expected = probs[support] * counts.sum()
  chi2 = ((counts[support] - expected) ** 2 / expected).sum()
  p_value = stats.chi2.sf(chi2, df=support.sum() - 1)
  assert p_value > 1e-4, f"chi2={chi2:.1f} p={p_value:.2e} counts={counts[support]} expected={expected.round()}"


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),    # plain softmax
    (0.7, 5, 1.0),    # temperature then top-k (ties at the 5th value kept: weights 4,4,4,4 tie)
    (1.6, 0, 0.8),    # temperature then top-p
    (1.0, 0, 0.75),   # exact boundary: the top seven tokens hold exactly 0.75
    (0.5, 8, 0.9),    # all three
    (1.0, 3, 1.0),    # top-k cutting inside a tie group
])
def test_distribution_matches_filtered_softmax(draw, temperature, top_k, top_p):
  tokens, logprobs, sampling_lp = draw(temperature, top_k, top_p)
  probs = reference_probs(LOGITS, temperature, top_k, top_p)
  assert_matches(np.bincount(tokens, minlength=VOCAB), probs)
  raw = LOGITS - np.log(np.exp(LOGITS).sum())
  np.testing.assert_allclose(logprobs, raw[tokens], atol=1e-5)
  np.testing.assert_allclose(sampling_lp, np.log(probs[tokens]), atol=1e-5)


def test_exact_top_p_boundary_keeps_the_smallest_set():
  # Mass of the top 7 tokens (16+8+8+4+4+4+4)/64 = 0.75 exactly: top_p = 0.75 keeps those 7, not the 8th.
  probs = reference_probs(LOGITS, 1.0, 0, 0.75)
  assert (probs > 0).sum() == 7
  filtered = select.filter_logits(jnp.asarray(LOGITS, jnp.float32)[None], jnp.ones(1), jnp.zeros(1, jnp.int32),
                                  jnp.full((1,), 0.75))
  assert np.isfinite(np.asarray(filtered)[0]).sum() == 7
  # Just above the boundary the next tier (weight 2, seven ties) joins.
  filtered = select.filter_logits(jnp.asarray(LOGITS, jnp.float32)[None], jnp.ones(1), jnp.zeros(1, jnp.int32),
                                  jnp.full((1,), 0.7501))
  assert np.isfinite(np.asarray(filtered)[0]).sum() == 14


def test_top_p_always_keeps_one_token():
  filtered = select.filter_logits(jnp.asarray(LOGITS, jnp.float32)[None], jnp.ones(1), jnp.zeros(1, jnp.int32),
                                  jnp.full((1,), 1e-6))
  assert np.isfinite(np.asarray(filtered)[0]).sum() == 1


def test_greedy_rows_take_the_argmax(draw):
  tokens, _, sampling_lp = draw(0.0, 3, 0.5)
  assert (tokens == np.argmax(LOGITS)).all() and (sampling_lp == 0).all()


def test_per_row_parameters_in_one_batch():
  # Rows with different parameters in one call: each row follows its own distribution (traced, per row).
  settings = [(0.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.75), (2.0, 0, 1.0)]
  per = DRAWS // len(settings)
  t, k, p = (np.repeat([s[i] for s in settings], per) for i in range(3))
  keys = jax.random.split(jax.random.key(1), len(t))
  rows = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (len(t), VOCAB))
  tokens, _, _ = jax.jit(select.select_tokens)(rows, keys, jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32),
                                              jnp.asarray(p, jnp.float32))
  tokens = np.asarray(tokens).reshape(len(settings), per)
  for row_tokens, setting in zip(tokens, settings):
    assert_matches(np.bincount(row_tokens, minlength=VOCAB), reference_probs(LOGITS, *setting))


def test_keys_depend_on_seed_uid_sample_and_position():
  keys = select.row_keys(0, np.array([5, 5, 6]), np.array([0, 1, 0]))
  again = select.row_keys(0, np.array([6, 5]), np.array([0, 0]))
  data = lambda k: np.asarray(jax.random.key_data(k))
  np.testing.assert_array_equal(data(keys)[0], data(again)[1])  # same (seed, uid, j): same stream, any batch
  np.testing.assert_array_equal(data(keys)[2], data(again)[0])
  assert not np.array_equal(data(keys)[0], data(keys)[1])  # j differs
  assert not np.array_equal(data(keys)[0], data(select.row_keys(1, np.array([5]), np.array([0])))[0])  # seed
  steps = select.token_keys(jnp.stack([keys[0], keys[0]]), jnp.array([3, 4]))
  assert not np.array_equal(data(steps)[0], data(steps)[1])
  assert select.uid_to_int("gsm8k/test/17") == select.uid_to_int("gsm8k/test/17") != select.uid_to_int("x")
