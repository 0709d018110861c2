"""Size caps the graders apply before parsing, so one grade call takes bounded time on any text.

Every extractor is linear in the text it reads; these caps bound that text and the numbers built from it.
"""

from __future__ import annotations

# A response longer than this is graded on its last MAX_TEXT_CHARS characters (answers come last). 1000 tokens
# of the Llama-2 vocabulary decode to well under 100,000 characters, so no sampled response reaches it.
MAX_TEXT_CHARS = 1_000_000
# robust GSM8K and toy: a digit run longer than this is not a number (it cannot be a GSM8K or toy answer, and
# exact fractions of it stay cheap); paper GSM8K keeps the reference's own rule, Python's 4300-digit int() limit.
MAX_NUMBER_DIGITS = 1000
# robust MATH: a longer answer is not given to math-verify (Hendrycks `is_equiv` decides); real answers are short.
MAX_VERIFY_CHARS = 1000


def clip(text: str) -> str:
  """`text`, or its last MAX_TEXT_CHARS characters."""
  return text if len(text) <= MAX_TEXT_CHARS else text[-MAX_TEXT_CHARS:]
