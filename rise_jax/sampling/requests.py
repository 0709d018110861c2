"""What the generator is asked for and what it returns, and the host rules around it. Imports no JAX: the
rollout layer builds requests and reads results without loading the device side (`rise_jax.sampling.engine`).

Token selection (per row, in this order, as transformers' logits processors):
  * `temperature == 0` is greedy: the argmax of the raw logits (`top_k` / `top_p` are ignored).
  * Otherwise the logits are divided by `temperature`, then **top-k** keeps the `top_k` largest (0 = off; ties
    with the k-th value are kept), then **top-p** keeps the smallest set of the remaining tokens, largest first,
    whose probability mass is `>= top_p` (always at least one token; ties with the last kept token are kept;
    `top_p = 1` = off), and a token is drawn from the renormalised softmax of what is left.
  * `temperature`, `top_k` and `top_p` enter the compiled programs as traced per-row values: changing them never
    recompiles.
Stopping: a sampled id in `stop_ids` ends its sample and is kept as its last token (the chat template's
end-of-turn token belongs to the assistant message, so a continued conversation holds it); it is not part of
the reply text (`reply_text`). `stop_ids=()` generates exactly `max_new_tokens` unless the capacity ends it first.
Log-probabilities: `logprobs[t]` is the log-softmax of the raw, unfiltered, untempered logits at token t (what
the training forward assigns it); `sampling_logprobs[t]` the log-probability under the filtered, tempered
distribution it was drawn from (0 for greedy rows).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

STOP_SLOTS = 8  # most stop ids a request may carry: the width of the compiled programs' stop-id arrays
FINISH_REASONS = ("stop", "length", "cache_full")


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt (token ids) and how to sample its `n` continuations (sample j = 0 .. n - 1 of `uid`).

  `uid` (any int or str) names the random stream: token t of sample j is drawn with the key
  fold_in(seed, uid, j, position), so a sample does not depend on which requests share its batch.
  """
  prompt: Sequence[int]
  uid: Any
  n: int = 1
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: Sequence[int] = ()

  def __post_init__(self):
    name = f"request {self.uid!r}"
    if not (isinstance(self.n, int) and self.n >= 1):
      raise ValueError(f"{name}: n must be an int >= 1, got {self.n!r}")
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise ValueError(f"{name}: max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"{name}: temperature must be finite and >= 0, got {self.temperature!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"{name}: top_p must be in (0, 1], got {self.top_p!r}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"{name}: top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
    stops = tuple(self.stop_ids)
    if any(not isinstance(i, (int, np.integer)) or i < 0 for i in stops):
      raise ValueError(f"{name}: stop_ids must be non-negative ints, got {stops!r}")
    if len(stops) > STOP_SLOTS:
      raise ValueError(f"{name}: {len(stops)} stop ids {stops}; at most {STOP_SLOTS}")


@dataclasses.dataclass(frozen=True, eq=False)
class SampleResult:
  """One sample of a request (see the module docstring for the log-probabilities).

  prompt_tokens: the prompt's length; cached_tokens: how many of them were read from the prefix cache instead of
  prefilled.
  """
  token_ids: list[int]
  logprobs: np.ndarray
  sampling_logprobs: np.ndarray
  finish_reason: str
  prompt_tokens: int
  cached_tokens: int = 0

  @property
  def logprob_sum(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


def generation_config_eos(path) -> tuple[int, ...]:
  """`eos_token_id` of a generation_config.json (a file or a checkpoint directory); () when there is none."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "generation_config.json"
  if not path.is_file():
    return ()
  try:
    eos = json.loads(path.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if eos is None:
    return ()
  return tuple(int(i) for i in eos) if isinstance(eos, list) else (int(eos),)


def default_stop_ids(model_config, tokenizer=None, generation_config=None) -> tuple[int, ...]:
  """The stop ids of a model's replies: the tokenizer's EOS ids (the model's without a tokenizer) plus the
  `eos_token_id` of `generation_config` (a checkpoint directory or generation_config.json; by default the
  tokenizer's directory), deduplicated in order."""
  ids = list(model_config.eos_token_id) if tokenizer is None else list(tokenizer.eos_token_ids)
  where = generation_config
  if where is None and tokenizer is not None and getattr(tokenizer, "source", None) is not None:
    where = tokenizer.source
  if where is not None:
    ids += generation_config_eos(where)
  return tuple(dict.fromkeys(int(i) for i in ids))


def vocab_limit(tokenizer, model_config) -> int | None:
  """Ids >= this are never sampled: a model vocabulary padded past the tokenizer's (the toy model: 128 vs 103)
  must never emit a non-token. None when the tokenizer covers the model's vocabulary (or is absent)."""
  tokenizer_vocab = getattr(tokenizer, "vocab_size", None)
  return tokenizer_vocab if tokenizer_vocab and tokenizer_vocab < model_config.vocab_size else None


def reply_text(tokenizer, ids: Sequence[int], finish_reason: str) -> str:
  """A sample's text: its ids decoded, without the sampled stop token that ends a "stop" sample."""
  return tokenizer.decode(list(ids[:-1]) if finish_reason == "stop" else list(ids))
