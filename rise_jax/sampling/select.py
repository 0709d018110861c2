"""Choosing the next token from logits: temperature -> top-k -> top-p, and the per-(prompt, sample, token) keys.

Pure, jittable functions with per-row traced parameters; the sampler's decode loop calls `select_tokens` once per
step. Semantics are documented on `SamplingParams`.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Tempered logits with everything outside top-k, then top-p, set to -inf.

  Args:
    logits: [batch, vocab] float32 raw logits.
    temperature: [batch] float32, > 0 (greedy rows are the caller's business; their value here is unused).
    top_k: [batch] int32; 0 or >= vocab disables.
    top_p: [batch] float32 in (0, 1]; 1 disables.
  """
  vocab = logits.shape[-1]
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  scaled = logits.astype(jnp.float32) / safe_t[:, None]
  ranked = -jnp.sort(-scaled, axis=-1)  # descending
  k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
  in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, ranked, _NEG_INF), axis=-1)
  # A ranked token survives top-p when the mass strictly before it is still short of p: the smallest set
  # with mass >= p. The first token always survives (mass before it is 0 < p).
  mass = jnp.cumsum(probs, axis=-1)
  mass_before = jnp.concatenate([jnp.zeros_like(mass[:, :1]), mass[:, :-1]], axis=-1)
  keep = in_top_k & (mass_before < top_p[:, None])
  num_keep = jnp.sum(keep, axis=-1)
  threshold = jnp.take_along_axis(ranked, (num_keep - 1)[:, None], axis=-1)
  # Thresholding by value (not by rank) keeps ties with the last kept token: permutation-invariant.
  return jnp.where(scaled >= threshold, scaled, _NEG_INF)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token per row, plus its raw log-prob and its sampling log-prob.

  Args:
    logits: [batch, vocab] raw logits.
    keys: [batch] typed PRNG keys, one per row (see `token_keys`).
    temperature, top_k, top_p: [batch] per-row parameters; `temperature == 0` is greedy.

  Returns:
    tokens [batch] int32; logprobs [batch] float32 = log_softmax(raw logits)[token]; sampling_logprobs [batch]
    float32 = log-prob under the filtered tempered distribution (0 for greedy rows).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy = temperature <= 0
  needs_filter = jnp.any(~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0)))
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    # The full-vocabulary sort runs only when some row filters (a traced branch, not a recompile).
    filtered = jax.lax.cond(needs_filter, lambda: filter_logits(logits, temperature, top_k, top_p),
                            lambda: logits / jnp.where(greedy, 1.0, temperature)[:, None])
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    tokens = jnp.where(greedy, argmax, drawn)
    picked = jnp.take_along_axis(filtered, tokens[:, None], axis=-1)[:, 0]
    return tokens, jnp.where(greedy, 0.0, picked - jax.nn.logsumexp(filtered, axis=-1))

  # An all-greedy batch skips the vocabulary-wide random draw entirely.
  tokens, sampling_lp = jax.lax.cond(jnp.all(greedy), lambda _: (argmax, jnp.zeros_like(temperature)), draw, None)
  raw = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
  return tokens, raw, sampling_lp


def uid_to_int(uid) -> int:
  """A stable 32-bit id for a prompt id: ints as themselves (mod 2**32), anything else by SHA-256 of str()."""
  if isinstance(uid, (int, np.integer)) and not isinstance(uid, bool):
    return int(uid) % (1 << 32)
  return int.from_bytes(hashlib.sha256(str(uid).encode()).digest()[:4], "little")


def row_keys(seed: int, uids: np.ndarray, sample_index: np.ndarray) -> jax.Array:
  """[rows] keys for (seed, uid, j): the stream of sample j of prompt uid, independent of the batch around it."""
  base = jax.random.key(seed)
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, 0))
  per_uid = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(uids, jnp.uint32))
  return fold(per_uid, jnp.asarray(sample_index, jnp.uint32))


def token_keys(keys: jax.Array, token_index: jax.Array) -> jax.Array:
  """[rows] keys for drawing the token at conversation index `token_index` (its position) of each row."""
  return jax.vmap(jax.random.fold_in)(keys, token_index.astype(jnp.uint32))
