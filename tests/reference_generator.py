"""A minimal generator for tests: every step re-runs the model's full forward over each row's whole sequence.

No KV cache, no buckets, no continuation, no sharding: what the engine's paged prefill, decode chunks, prefix
cache, slot packing and copy-on-write must reproduce. It shares only the engine's token selection and key rule
(`rise_jax.sampling.select`, tested on its own against numpy), so it checks everything around them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.sampling import select
from rise_jax.sampling.requests import Request, SampleResult


def _pow2(x: int) -> int:
  return 1 << max(0, int(x - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("vocab_limit",))
def _step(model, ids, length, keys, temperature, top_k, top_p, vocab_limit):
  """Every row's next token from the full forward over its whole (right-padded) sequence."""
  mask = jnp.arange(ids.shape[1])[None, :] < length[:, None]
  logits = model(ids, attention_mask=mask)
  last = jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return select.select_tokens(last, select.token_keys(keys, length), temperature, top_k, top_p, vocab_limit)


def generate(model, requests: list[Request], seed: int = 0, *, capacity: int | None = None,
             vocab_limit: int | None = None) -> list[list[SampleResult]]:
  """`outs[i][j]`: sample j of request i, as `Engine.run(requests, seed)` defines it.

  capacity: the most tokens a sample may hold (prompt + reply; the engine's `max_seq_len`); a sample that fills
  it ends with `cache_full`.
  """
  rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
  capacity = capacity or max(len(r.prompt) + r.max_new_tokens for r in requests)
  # Rows and width padded to powers of two so that calls share compiles: padded rows are never read, padded
  # columns sit after every real token (causal attention never reaches back to them).
  padded, width = _pow2(len(rows)), _pow2(min(capacity, max(len(r.prompt) + r.max_new_tokens for r in requests)))
  ids = np.zeros((padded, width), np.int32)
  length = np.ones(padded, np.int32)
  for row, (i, _) in enumerate(rows):
    length[row] = len(requests[i].prompt)
    ids[row, :length[row]] = requests[i].prompt
  fill = lambda values, dtype: np.asarray(list(values) + [0] * (padded - len(rows)), dtype)
  keys = select.row_keys(seed, fill((select.uid_to_int(requests[i].uid) for i, _ in rows), np.uint32),
                         fill((j for _, j in rows), np.uint32))
  param = lambda name, dtype: fill((getattr(requests[i], name) for i, _ in rows), dtype)
  temperature, top_k, top_p = param("temperature", np.float32), param("top_k", np.int32), param("top_p", np.float32)
  out = [dict(tokens=[], logprobs=[], sampling_logprobs=[], finish=None) for _ in rows]
  while any(o["finish"] is None for o in out):
    token, logprob, sampling_logprob = map(np.asarray, _step(model, ids, length, keys, temperature, top_k, top_p,
                                                             vocab_limit))
    for row, (i, _) in enumerate(rows):
      o, r = out[row], requests[i]
      if o["finish"] is not None:
        continue
      o["tokens"].append(int(token[row]))
      o["logprobs"].append(float(logprob[row]))
      o["sampling_logprobs"].append(float(sampling_logprob[row]))
      if int(token[row]) in r.stop_ids:
        o["finish"] = "stop"
      elif len(o["tokens"]) >= r.max_new_tokens:
        o["finish"] = "length"
      elif length[row] + 1 >= capacity:
        o["finish"] = "cache_full"
      else:
        ids[row, length[row]] = token[row]
        length[row] += 1
  results: list[list[SampleResult]] = [[] for _ in requests]
  for (i, _), o in zip(rows, out):
    results[i].append(SampleResult(o["tokens"], np.asarray(o["logprobs"], np.float32),
                                   np.asarray(o["sampling_logprobs"], np.float32), o["finish"],
                                   len(requests[i].prompt)))
  return results
