"""Choosing the next token from logits: temperature -> top-k -> top-p, and the per-(prompt, sample, token) keys.

Pure, jittable functions with per-row traced parameters; the engine's programs call `select_tokens` once per
step. Semantics are documented in `rise_jax.sampling.requests`.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


def _ordered_bits(x: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (negative floats flipped), for exact bisection."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_threshold(keys: jax.Array, enough) -> jax.Array:
  """Per row, the largest key t with `enough(keys >= t)` true, by bisection over the 32-bit key range.

  `enough(mask)` -> [batch] bool must be monotone (true for a smaller t whenever true for a larger one) and true
  for t = the row's smallest key. Exact in 32 steps, no sort: a full-vocabulary sort is the slowest op of a
  sampling step on CPU.
  """
  lo = jnp.min(keys, axis=-1)
  hi = jnp.max(keys, axis=-1)

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # upper middle: lo always satisfies, mid > lo while lo < hi
    ok = enough(keys >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return lo


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Tempered logits with everything outside top-k, then top-p, set to -inf.

  Args:
    logits: [batch, vocab] float32 raw logits.
    temperature: [batch] float32, > 0 (greedy rows are the caller's business; their value here is unused).
    top_k: [batch] int32; 0 or >= vocab disables.
    top_p: [batch] float32 in (0, 1]; 1 disables.

  Thresholds are found by value (bisection), so ties with the last kept token are kept.
  """
  vocab = logits.shape[-1]
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  scaled = logits.astype(jnp.float32) / safe_t[:, None]
  k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
  # top-k: the k-th largest value is the largest t with at least k values >= t.
  scaled_keys = _ordered_bits(scaled)
  kth = _largest_threshold(scaled_keys, lambda kept: jnp.sum(kept, axis=-1) >= k)
  in_top_k = scaled_keys >= kth[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, scaled, _NEG_INF), axis=-1)
  # top-p: the smallest set, largest first, whose mass is >= p is {prob >= t} for the largest t whose set
  # still has mass >= p. (If rounding leaves even the full set short of p, the search stays at the smallest
  # key: everything is kept.)
  prob_keys = _ordered_bits(probs)
  tp = _largest_threshold(prob_keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= top_p)
  in_top_p = (prob_keys >= tp[:, None]) | (top_p >= 1.0)[:, None]
  return jnp.where(in_top_k & in_top_p, scaled, _NEG_INF)


def _inverse_cdf_draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits) with one uniform per row (inverse CDF).

  Exact like Gumbel-max but draws 1 random number per row instead of one per vocabulary entry, which on CPU
  costs more than the rest of the step (threefry over 32k entries per row).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
  token = jnp.sum(cdf <= u[:, None], axis=-1)
  # Rounding can never pick past the last token with probability mass.
  last = logits.shape[-1] - 1 - jnp.argmax(jnp.flip(probs > 0, axis=-1), axis=-1)
  return jnp.minimum(token, last).astype(jnp.int32)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token per row, plus its raw log-prob and its sampling log-prob.

  Args:
    logits: [batch, vocab] raw logits.
    keys: [batch] typed PRNG keys, one per row (see `token_keys`).
    temperature, top_k, top_p: [batch] per-row parameters; `temperature == 0` is greedy.
    vocab_limit: static; ids >= it are never chosen (a model vocabulary padded past the tokenizer's: those ids
      are not tokens). The reported raw log-prob still normalises over the whole model vocabulary, as training does.

  Returns:
    tokens [batch] int32; logprobs [batch] float32 = log_softmax(raw logits)[token]; sampling_logprobs [batch]
    float32 = log-prob under the filtered tempered distribution (0 for greedy rows).
  """
  raw_logits = logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if vocab_limit is not None and vocab_limit < vocab:
    logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
  greedy = temperature <= 0
  needs_filter = jnp.any(~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)))
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    # The full-vocabulary sort runs only when some row filters (a traced branch, not a recompile).
    filtered = jax.lax.cond(needs_filter, lambda: filter_logits(logits, temperature, top_k, top_p),
                            lambda: logits / jnp.where(greedy, 1.0, temperature)[:, None])
    drawn = _inverse_cdf_draw(keys, filtered)
    tokens = jnp.where(greedy, argmax, drawn)
    picked = jnp.take_along_axis(filtered, tokens[:, None], axis=-1)[:, 0]
    return tokens, jnp.where(greedy, 0.0, picked - jax.nn.logsumexp(filtered, axis=-1))

  # An all-greedy batch skips the vocabulary-wide random draw entirely.
  tokens, sampling_lp = jax.lax.cond(jnp.all(greedy), lambda _: (argmax, jnp.zeros_like(temperature)), draw, None)
  raw = jnp.take_along_axis(raw_logits, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw_logits, axis=-1)
  return tokens, raw, sampling_lp


def uid_to_int(uid) -> int:
  """A stable 32-bit id for a prompt id: ints as themselves (mod 2**32), anything else by SHA-256 of str()."""
  if isinstance(uid, (int, np.integer)) and not isinstance(uid, bool):
    return int(uid) % (1 << 32)
  return int.from_bytes(hashlib.sha256(str(uid).encode()).digest()[:4], "little")


def row_keys(seed, uids, sample_index) -> jax.Array:
  """[rows] keys for (seed, uid, j): the stream of sample j of prompt uid, independent of the batch around it.
  Elementwise in uint32 seeds (one per row or one for all), `uid_to_int` uids and sample indices, so the engine's
  programs make them on the device from `key_ids` columns."""
  uids, sample_index = jnp.asarray(uids, jnp.uint32), jnp.asarray(sample_index, jnp.uint32)
  seed = seed % (1 << 32) if isinstance(seed, int) else seed
  seed = jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), uids.shape)
  one = lambda s, u, j: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), u), j)
  return jax.vmap(one)(seed, uids, sample_index)


def key_ids(seed: int, uid_ints, samples) -> np.ndarray:
  """[rows, 3] uint32 (seed, uid, sample) columns, what `row_keys` makes a row's key from."""
  out = np.zeros((len(uid_ints), 3), np.uint32)
  out[:, 0], out[:, 1], out[:, 2] = seed % (1 << 32), uid_ints, samples
  return out


def token_keys(keys: jax.Array, token_index: jax.Array) -> jax.Array:
  """[rows] keys for drawing the token at conversation index `token_index` (its position) of each row."""
  return jax.vmap(jax.random.fold_in)(keys, token_index.astype(jnp.uint32))
