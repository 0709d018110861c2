"""`SamplingParams`: what one `Sampler.generate` call samples, and the exact meaning of every field."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample the continuation of every prompt in one `Sampler.generate` call.

  Token selection (per row, in this order, as transformers' logits processors):
    * `temperature == 0` is greedy: the argmax of the raw logits (`top_k` / `top_p` are ignored).
    * Otherwise the logits are divided by `temperature`, then **top-k** keeps the `top_k` largest (0 = off; ties
      with the k-th value are kept), then **top-p** keeps the smallest set of the remaining tokens, largest
      first, whose probability mass is `>= top_p` (always at least one token; ties with the last kept token are
      kept; `top_p = 1` = off), and a token is drawn from the renormalised softmax of what is left.
    * `temperature`, `top_k` and `top_p` enter the compiled loop as traced per-row arrays (float32, int32,
      float32): changing them never recompiles. Only shapes are static (bucketed, see `Sampler`).

  Stopping:
    * `stop_token_ids=None` means the tokenizer's EOS ids plus `generation_config.json`'s `eos_token_id`
      (Llama 3 has several); `[]` means no stop tokens (generate exactly `max_new_tokens`). A sampled stop token
      ends its row and is kept as the last element of `token_ids` (the chat template's end-of-turn token belongs
      to the assistant message, so a continued conversation holds it); it is not part of `.text`.
    * `stop_strings` that encode to a single token join the stop-id set; longer ones are applied after the loop
      on the decoded text: the text is cut before the first match and `token_ids` after the token that completes
      it (the model did produce those tokens; a continuation re-prefills from the first token the next rendered
      turn disagrees with).
    * `max_new_tokens` bounds the generated tokens per sample (finish reason `length`).

  `n` samples per prompt share one prefill: the prompt's KV cache is copied `n` times, never recomputed.
  `sampling_logprobs=True` also returns the log-probability of each token under the filtered, tempered
  distribution it was drawn from (0 for greedy rows). `.logprobs` is always the log-softmax of the raw,
  unfiltered, untempered logits at the chosen tokens (what the training forward assigns them).
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  stop_token_ids: Sequence[int] | None = None
  stop_strings: Sequence[str] = ()
  sampling_logprobs: bool = False

  def __post_init__(self):
    if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not self.temperature >= 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
    if not (isinstance(self.n, int) and self.n >= 1):
      raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
    if isinstance(self.stop_strings, str):
      raise ValueError("SamplingParams.stop_strings must be a sequence of strings, not one string")
    if any(not s for s in self.stop_strings):
      raise ValueError("SamplingParams.stop_strings must not contain an empty string")
    if self.stop_token_ids is not None:
      ids = tuple(self.stop_token_ids)
      if any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"SamplingParams.stop_token_ids must be non-negative ints, got {ids!r}")
      object.__setattr__(self, "stop_token_ids", ids)
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

  @classmethod
  def from_config(cls, sampling_config, **overrides) -> "SamplingParams":
    """From the config tree's `sampling` section (temperature, top_p, top_k, max_new_tokens)."""
    fields = dict(max_new_tokens=sampling_config.max_new_tokens, temperature=sampling_config.temperature,
                  top_p=sampling_config.top_p, top_k=sampling_config.top_k)
    fields.update(overrides)
    return cls(**fields)
