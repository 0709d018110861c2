"""A minimal generator for tests: every step re-runs the model's full forward over each row's whole sequence.

No KV cache, no buckets, no continuation, no sharding: what the engine's paged prefill, decode chunks, prefix
cache, slot packing and copy-on-write must reproduce. It shares only the engine's token selection and key rule
(`rise_jax.sampling.select`, tested on its own against numpy), so it checks everything around them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.sampling import select
from rise_jax.sampling.requests import Request, SampleResult


def generate(model, requests: list[Request], seed: int = 0, *, capacity: int | None = None,
             vocab_limit: int | None = None) -> list[list[SampleResult]]:
  """`outs[i][j]`: sample j of request i, as `Engine.run(requests, seed)` defines it.

  capacity: the most tokens a sample may hold (prompt + reply; the engine's `max_seq_len`); a sample that fills
  it ends with `cache_full`.
  """
  rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
  capacity = capacity or max(len(r.prompt) + r.max_new_tokens for r in requests)
  width = min(capacity, max(len(r.prompt) + r.max_new_tokens for r in requests))
  ids = np.zeros((len(rows), width), np.int32)
  length = np.array([len(requests[i].prompt) for i, _ in rows], np.int32)
  for row, (i, _) in enumerate(rows):
    ids[row, :length[row]] = requests[i].prompt
  keys = select.row_keys(seed, np.array([select.uid_to_int(requests[i].uid) for i, _ in rows]),
                         np.array([j for _, j in rows]))
  param = lambda name, dtype: jnp.asarray([getattr(requests[i], name) for i, _ in rows], dtype)
  temperature, top_k, top_p = param("temperature", jnp.float32), param("top_k", jnp.int32), param("top_p", jnp.float32)
  forward = jax.jit(lambda m, x, mask: m(x, attention_mask=mask))
  out = [dict(tokens=[], logprobs=[], sampling_logprobs=[], finish=None) for _ in rows]
  while any(o["finish"] is None for o in out):
    mask = np.arange(width)[None, :] < length[:, None]
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    last = jnp.take_along_axis(logits, jnp.asarray(length - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    token, logprob, sampling_logprob = select.select_tokens(last, select.token_keys(keys, jnp.asarray(length)),
                                                            temperature, top_k, top_p, vocab_limit)
    token, logprob, sampling_logprob = map(np.asarray, (token, logprob, sampling_logprob))
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
