"""The three weighted-NLL estimators against numpy, finite differences, the analytic gradient, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rise_jax.train import loss as L

ESTIMATORS = L.ESTIMATORS


def _batch(seed=0, vocab=11):
  """Rows of different trained lengths and weights, an example with weight 0, and a padding row."""
  rng = np.random.default_rng(seed)
  b, l = 6, 7
  logits = rng.normal(size=(b, l, vocab)) * 2.0
  targets = rng.integers(0, vocab, size=(b, l))
  mask = np.zeros((b, l))
  mask[0, 2:7] = 1          # 5 trained tokens
  mask[1, 5:6] = 1          # 1
  mask[2, 1:4] = 1          # 3
  mask[3, 0:7] = 1          # 7
  mask[4, 3:5] = 1          # 2, but weight 0
  weights = np.array([12.18, 1.0, 0.082, 3.5, 0.0, 0.0])  # row 5: padding (weight 0, empty mask)
  return logits, targets, mask, weights


def _numpy_loss(logits, targets, mask, weights, estimator):
  """The estimator definitions (docs/training.md), example by example, in float64."""
  logits = np.asarray(logits, np.float64)
  terms, norm_terms = [], []
  for e in range(logits.shape[0]):
    idx = np.nonzero(mask[e])[0]
    if len(idx) == 0:
      continue
    row = logits[e, idx]
    m = row.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(row - m).sum(-1, keepdims=True)))[:, 0]
    nll = lse - row[np.arange(len(idx)), targets[e, idx]]
    if estimator == "token_mean":
      terms.append(weights[e] * nll.sum())
      norm_terms.append(weights[e] * len(idx))
    else:
      terms.append(weights[e] * nll.mean())
      norm_terms.append(1.0 if estimator == "sample_mean" else weights[e])
  return sum(terms) / sum(norm_terms)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_equals_numpy(estimator):
  worst = 0.0
  for seed in range(3):
    logits, targets, mask, weights = _batch(seed)
    expected = _numpy_loss(logits, targets, mask, weights, estimator)
    got, metrics = L.weighted_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), mask, weights, estimator)
    worst = max(worst, abs(float(got) - expected) / abs(expected))
    assert int(metrics["examples"]) == 5 and float(metrics["trained_tokens"]) == 18
    # The host-side normaliser (what the trainer passes in) agrees with the estimator's own.
    z = L.normalizer(estimator, weights, mask.sum(-1))
    got_z, _ = L.weighted_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), mask, weights, estimator,
                              normalizer=z)
    np.testing.assert_allclose(float(got_z), expected, rtol=1e-6)
  print(f"worst relative error vs numpy ({estimator}): {worst:.2e}")
  assert worst < 1e-6


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_matches_finite_differences_x64(estimator):
  logits, targets, mask, weights = _batch(1)
  with jax.enable_x64(True):
    x = jnp.asarray(logits, jnp.float64)
    f = jax.jit(lambda z: L.weighted_nll(z, jnp.asarray(targets), mask, weights, estimator)[0])
    grad = jax.grad(f)(x)
    assert grad.dtype == jnp.float64
    rng = np.random.default_rng(7)
    eps = 1e-5
    for _ in range(4):
      d = jnp.asarray(rng.normal(size=x.shape))
      fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.vdot(grad, d)), float(fd), rtol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dlogits_is_analytic(estimator):
  """dL/dlogits = a_t * (softmax - onehot) / Z with a_t = w_e (token_mean) or w_e / n_e, and Z the normaliser."""
  logits, targets, mask, weights = _batch(2)
  grad = jax.jit(jax.grad(lambda z: L.weighted_nll(z, jnp.asarray(targets), mask, weights, estimator)[0]))(
      jnp.asarray(logits, jnp.float32))
  n = mask.sum(-1)
  per_token = weights[:, None] * mask
  if estimator != "token_mean":
    per_token = per_token / np.maximum(n, 1)[:, None]
  z = {"sample_mean": np.sum(n > 0), "token_mean": np.sum(weights * n),
       "self_normalised": np.sum(weights[n > 0])}[estimator]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(logits.shape[-1])[targets]
  expected = per_token[..., None] * (p - onehot) / z
  np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)
  # The host-side per-token weights are exactly these a_t.
  np.testing.assert_allclose(L.token_weights(mask, weights, estimator), per_token, rtol=1e-6)


def _linear_loss(w_out, hidden, targets, mask, weights, estimator, normalizer):
  return L.weighted_nll(hidden @ w_out, targets, mask, weights, estimator, normalizer)[0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_accumulation_equals_merged_batch(estimator):
  """Micro-batches with different token counts and weights, summed with the global Z, equal the merged batch;
  normalising each micro-batch on its own (the naive way) does not."""
  rng = np.random.default_rng(3)
  logits, targets, mask, weights = _batch(3)
  b, l, _ = logits.shape
  hidden = jnp.asarray(rng.normal(size=(b, l, 5)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
  targets = jnp.asarray(targets)
  z = L.normalizer(estimator, weights, mask.sum(-1))
  grad_fn = jax.jit(jax.value_and_grad(_linear_loss), static_argnums=5)
  merged, merged_grad = grad_fn(w_out, hidden, targets, mask, weights, estimator, None)
  splits = [slice(0, 2), slice(2, 4), slice(4, 6)]   # 5+1 | 3+7 | 2+0 trained tokens, different weights
  acc_loss, acc_grad, naive = 0.0, 0.0, []
  for s in splits:
    value, g = grad_fn(w_out, hidden[s], targets[s], mask[s], weights[s], estimator, z)
    acc_loss, acc_grad = acc_loss + value, acc_grad + g
    naive.append(float(grad_fn(w_out, hidden[s], targets[s], mask[s], weights[s], estimator, None)[0]))
  np.testing.assert_allclose(float(acc_loss), float(merged), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(acc_grad), np.asarray(merged_grad), rtol=1e-5, atol=1e-7)
  assert abs(np.mean(naive) - float(merged)) > 1e-2 * abs(float(merged))


@pytest.mark.parametrize("vocab_chunk", [10, 64], ids=["4-chunks", "one-chunk"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunked_path_equals_reference(estimator, vocab_chunk):
  """Hidden states + unembedding, vocab in chunks (37 = 4 chunks of 10, the last padded; or one chunk, with its
  own VJP), equal the reference on full logits: loss and gradients with respect to both inputs."""
  rng = np.random.default_rng(4)
  _, targets, mask, weights = _batch(4, vocab=37)
  hidden = jnp.asarray(rng.normal(size=mask.shape + (6,)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(6, 37)) * 0.5, jnp.float32)
  targets = jnp.asarray(targets)
  z = L.normalizer(estimator, weights, mask.sum(-1))
  a = L.token_weights(mask, weights, estimator)
  ref = jax.jit(jax.value_and_grad(lambda h, u: L.weighted_nll(h @ u, targets, mask, weights, estimator)[0], (0, 1)))
  got = jax.jit(jax.value_and_grad(
      lambda h, u: L.chunked_weighted_nll(h, u, targets, a, z, vocab_chunk=vocab_chunk)[0], (0, 1)))
  (rl, (rh, ru)), (gl, (gh, gu)) = ref(hidden, unembed), got(hidden, unembed)
  np.testing.assert_allclose(float(gl), float(rl), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(rh), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gu), np.asarray(ru), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_packed_segments_equal_unpacked_rows(estimator):
  """Two examples packed into one row (segment ids 1, 2) weigh exactly as the same examples in separate rows."""
  rng = np.random.default_rng(5)
  vocab, d = 13, 4
  h1, h2 = rng.normal(size=(4, d)), rng.normal(size=(6, d))
  t1, t2 = rng.integers(0, vocab, 4), rng.integers(0, vocab, 6)
  m1, m2 = np.array([0, 1, 1, 1.]), np.array([0, 0, 0, 0, 1, 1.])
  w = np.array([12.18, 0.5])
  unembed = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
  # Unpacked: two rows padded to 6.
  hid = np.zeros((2, 6, d)); hid[0, :4], hid[1] = h1, h2
  tgt = np.zeros((2, 6), np.int32); tgt[0, :4], tgt[1] = t1, t2
  msk = np.zeros((2, 6)); msk[0, :4], msk[1] = m1, m2
  ref, _ = L.weighted_nll(jnp.asarray(hid, jnp.float32) @ unembed, jnp.asarray(tgt), msk, w, estimator)
  # Packed: one row of 12 (10 real + 2 padding).
  hid_p = np.zeros((1, 12, d)); hid_p[0, :4], hid_p[0, 4:10] = h1, h2
  tgt_p = np.zeros((1, 12), np.int32); tgt_p[0, :4], tgt_p[0, 4:10] = t1, t2
  msk_p = np.zeros((1, 12)); msk_p[0, :4], msk_p[0, 4:10] = m1, m2
  seg = np.zeros((1, 12), np.int32); seg[0, :4], seg[0, 4:10] = 1, 2
  w_tok = np.where(seg == 1, w[0], np.where(seg == 2, w[1], 0.0))
  a = L.token_weights(msk_p, w_tok, estimator, segment_ids=seg)
  z = L.normalizer(estimator, w, [3, 2])
  got, _ = L.chunked_weighted_nll(jnp.asarray(hid_p, jnp.float32), unembed, jnp.asarray(tgt_p), a, z, vocab_chunk=5)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
