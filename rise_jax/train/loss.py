"""Reward-weighted negative log-likelihood: the three estimators RISE can train with, exactly.

Targets are pre-shifted: `logits[:, t]` scores `targets[:, t]`, and `loss_mask[:, t]` marks the trained targets.
With `n_e` trained tokens and weight `w_e` for example `e`, over the *global* optimiser batch:

  sample_mean      sum_e w_e * mean_{t in e} nll_t / #{e : n_e > 0}      (the reference implementation's)
  token_mean       sum_e w_e * sum_{t in e} nll_t / sum_e w_e * n_e
  self_normalised  sum_e w_e * mean_{t in e} nll_t / sum_{e : n_e > 0} w_e (as tau -> 0: filtering)

Every estimator is `sum_t a_t * nll_t / Z`: a per-token weight `a_t` (`token_weights`) and one normaliser `Z` for
the whole global batch (`normalizer`). Both are computed on the host from the batch plan, before gradient
accumulation, so neither micro-batching, sharding nor packing (several examples in one row, told apart by segment
ids) can change the estimator. The loss itself is float32 whatever the compute dtype.

`weighted_nll` is the readable reference from full logits. `chunked_weighted_nll` is the production path: it
starts from the final hidden states and the unembedding matrix and walks the vocabulary in chunks with a running
log-sum-exp, so `[tokens, vocab]` logits never exist at once (and are recomputed chunk by chunk in the backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.config import ESTIMATORS



def _check_estimator(estimator: str):
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator {estimator!r} is not one of {list(ESTIMATORS)}")


# ---------------------------------------------------------------------------------------------------------------
# Host side (numpy): per-token weights and the global normaliser, from the batch plan.
# ---------------------------------------------------------------------------------------------------------------

def normalizer(estimator: str, example_weights, trained_tokens) -> float:
  """Z for a set of examples (pass the whole global batch): see the module docstring."""
  _check_estimator(estimator)
  w = np.asarray(example_weights, np.float64)
  n = np.asarray(trained_tokens, np.float64)
  if estimator == "sample_mean":
    return float(np.sum(n > 0))
  if estimator == "token_mean":
    return float(np.sum(w * n))
  return float(np.sum(np.where(n > 0, w, 0.0)))


def token_weights(loss_mask, example_weights, estimator: str, segment_ids=None) -> np.ndarray:
  """a_t for every target of a [rows, length] batch, so that loss = sum_t a_t * nll_t / Z.

  Without `segment_ids` each row is one example and `example_weights` is [rows]. With packing, `segment_ids`
  ([rows, length], 0 = padding, 1.. = the examples of the row) tells examples apart and `example_weights` is
  [rows, length]: each token carries its example's weight.
  """
  _check_estimator(estimator)
  mask = np.asarray(loss_mask, np.float64)
  w = np.asarray(example_weights, np.float64)
  if segment_ids is None:
    segment_ids = np.ones(mask.shape, np.int64)
    w = np.broadcast_to(w[:, None], mask.shape)
  seg = np.asarray(segment_ids)
  if w.shape != mask.shape:
    raise ValueError(f"with segment_ids, example_weights must be per token {mask.shape}, got {w.shape}")
  mask = mask * (seg > 0)
  if estimator == "token_mean":
    return (w * mask).astype(np.float32)
  # Trained tokens of the example each token belongs to: count per (row, segment), then gather back.
  num_segments = int(seg.max(initial=0)) + 1
  counts = np.zeros((mask.shape[0], num_segments))
  np.add.at(counts, (np.arange(mask.shape[0])[:, None].repeat(mask.shape[1], 1), seg), mask)
  n_tok = np.take_along_axis(counts, seg, axis=1)
  return np.where(mask > 0, w * mask / np.maximum(n_tok, 1.0), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Device side (jax).
# ---------------------------------------------------------------------------------------------------------------

def _safe_div(num, den):
  return num / jnp.where(den > 0, den, 1.0)


def weighted_nll(logits, targets, loss_mask, example_weights, estimator: str = "sample_mean",
                 normalizer=None):
  """The reference loss from full logits [b, l, vocab]; each row is one example.

  `normalizer` is Z for the global batch; None computes it from this batch (correct only when this batch *is*
  the global batch). Padding rows have weight 0 and an empty mask, so they never count. Returns
  (loss, metrics) with the loss as float32.
  """
  _check_estimator(estimator)
  logits = jnp.asarray(logits)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  mask = jnp.asarray(loss_mask, dtype)
  w = jnp.asarray(example_weights, dtype)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = logz - target_logit                                            # [b, l]
  n = mask.sum(-1)                                                     # trained tokens per example
  nll_sum = (nll * mask).sum(-1)
  if estimator == "token_mean":
    numerator = jnp.sum(w * nll_sum)
    z = jnp.sum(w * n)
  else:
    numerator = jnp.sum(w * _safe_div(nll_sum, n))
    z = jnp.sum(n > 0).astype(dtype) if estimator == "sample_mean" else jnp.sum(jnp.where(n > 0, w, 0.0))
  if normalizer is not None:
    z = jnp.asarray(normalizer, dtype)
  loss = _safe_div(numerator, z)
  correct = (jnp.argmax(logits, -1) == targets).astype(dtype)
  tok_w = w[:, None] * mask
  metrics = {
      "accuracy": jax.lax.stop_gradient(_safe_div(jnp.sum(tok_w * correct), jnp.sum(tok_w))),
      "sum_weights": jnp.sum(jnp.where(n > 0, w, 0.0)),
      "examples": jnp.sum(n > 0),
      "trained_tokens": jnp.sum(n),
  }
  return loss, metrics


def chunked_weighted_nll(hidden, unembedding, targets, weights, normalizer, *, vocab_chunk: int = 8192):
  """The production loss from final hidden states [b, l, d] and the unembedding matrix [d, vocab].

  `weights` are the per-token a_t of `token_weights` (packing-aware) and `normalizer` the global-batch Z. The
  vocabulary is processed in equal chunks of at most `vocab_chunk` columns; with more than one chunk each is under
  `jax.checkpoint`, so neither the forward nor the backward holds more than one [tokens, chunk] float32 block
  (a single chunk is not recomputed: its custom VJP keeps one [tokens, vocab] float32 array, softmax - onehot). Returns (loss, sums) where `sums` are
  additive over micro-batches: the weighted count of argmax-correct targets and the total weight.
  """
  d, vocab = unembedding.shape
  h = hidden.reshape(-1, d)
  t = targets.reshape(-1)
  a = weights.reshape(-1).astype(jnp.float32)
  num_chunks = -(-vocab // min(vocab_chunk, vocab))
  if num_chunks == 1:
    nll, correct = _one_chunk_nll(h, unembedding, t)
    return _reduce(a, nll, correct, normalizer)
  chunk = -(-vocab // num_chunks)                                     # equal chunks: 32000 -> 4 x 8000, no tail
  padded = num_chunks * chunk
  w = jnp.pad(unembedding, ((0, 0), (0, padded - vocab))) if padded != vocab else unembedding
  w = w.reshape(d, num_chunks, chunk).transpose(1, 0, 2)             # [chunks, d, chunk]

  def body(carry, xs):
    run_max, run_sum, tgt = carry
    w_c, start = xs
    logits = jnp.einsum("nd,dv->nv", h, w_c.astype(h.dtype), preferred_element_type=jnp.float32)
    col = start + jnp.arange(chunk)
    logits = jnp.where(col[None, :] < vocab, logits, -jnp.inf)        # the padded tail of the last chunk
    new_max = jnp.maximum(run_max, logits.max(-1))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(-1)
    in_chunk = (t >= start) & (t < start + chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(t - start, 0, chunk - 1)[:, None], axis=-1)[:, 0]
    tgt = jnp.where(in_chunk, picked, tgt)
    return (new_max, run_sum, tgt), None

  if num_chunks > 1:  # recompute each chunk's logits in the backward instead of keeping [tokens, vocab]
    body = jax.checkpoint(body, prevent_cse=False)
  n = h.shape[0]
  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  starts = jnp.arange(num_chunks, dtype=t.dtype) * chunk
  (run_max, run_sum, tgt), _ = jax.lax.scan(body, init, (w, starts))
  return _reduce(a, run_max + jnp.log(run_sum) - tgt, tgt >= run_max, normalizer)


def _reduce(a, nll, correct, normalizer):
  loss = jnp.sum(a * nll) / jnp.where(normalizer > 0, normalizer, 1.0)
  correct = jax.lax.stop_gradient(correct.astype(jnp.float32))
  sums = {"correct_weight": jnp.sum(a * correct), "token_weight": jnp.sum(a)}
  return loss, sums


def _one_chunk_logits(h, w):
  return jnp.einsum("nd,dv->nv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _one_chunk_nll(h, w, t):
  """(nll, argmax-correct) per token from the whole vocabulary at once."""
  return _one_chunk_fwd(h, w, t)[0]


def _one_chunk_fwd(h, w, t):
  # The backward keeps one float32 [tokens, vocab] array, softmax - onehot, instead of autodiff's ~3 (the
  # logits, their shifted exponentials, the take_along_axis operand).
  logits = _one_chunk_logits(h, w)
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
  dlogits = jnp.exp(logits - logz[:, None]) - jax.nn.one_hot(t, logits.shape[1], dtype=jnp.float32)
  return (logz - tgt, tgt >= logits.max(-1)), (h, w, dlogits)


def _one_chunk_bwd(res, cts):
  h, w, dlogits = res
  g = (cts[0][:, None] * dlogits).astype(h.dtype)
  dh = jnp.einsum("nv,dv->nd", g, w.astype(h.dtype), preferred_element_type=jnp.float32).astype(h.dtype)
  dw = jnp.einsum("nd,nv->dv", h, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dh, dw, None


_one_chunk_nll.defvjp(_one_chunk_fwd, _one_chunk_bwd)
