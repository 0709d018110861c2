"""The degenerate-sample filter: RISE resamples responses that loop on a word or emit one enormous token.

The reference (`workflow_gen.py`) lowercases a response, splits it on whitespace and rejects it when any word
occurs more than 150 times or any whitespace-separated token is longer than 300 characters. `degenerate_reason`
applies the same rule and says which part fired, so the runner can log why a sample was resampled.
"""

from __future__ import annotations

import collections

MAX_WORD_REPEATS = 150
MAX_TOKEN_CHARS = 300


def degenerate_reason(text: str, max_word_repeats: int = MAX_WORD_REPEATS,
                      max_token_chars: int = MAX_TOKEN_CHARS) -> str | None:
  """None for a normal response, else a short reason (`"repeat:<word>"` or `"long_token"`)."""
  words = text.lower().split()
  if any(len(word) > max_token_chars for word in words):
    return "long_token"
  counts = collections.Counter(words)
  if counts:
    word, count = counts.most_common(1)[0]
    if count > max_word_repeats:
      return f"repeat:{word[:40]}"
  return None


def is_degenerate(text: str, max_word_repeats: int = MAX_WORD_REPEATS,
                  max_token_chars: int = MAX_TOKEN_CHARS) -> bool:
  return degenerate_reason(text, max_word_repeats, max_token_chars) is not None
