"""Toy-task answer checking: the answer is the integer after the last '=' of the scratchpad.

A response "3*4=12,25+12=37" answers 37. paper mode mirrors the GSM8K reference's reward range (unparsable
-> -1, wrong -> 0, right -> 1) so the reference's exp(r / tau) weights see all three values; robust mode gives
0/1. The reference (the problem's worked scratchpad, or a bare integer) is read the same way. A number longer
than limits.MAX_NUMBER_DIGITS digits is unparsable; a longer text is read from its last limits.MAX_TEXT_CHARS.
"""

from __future__ import annotations

import re

from rise_jax.tasks.graders import limits

_ANSWER = re.compile(r"=\s*+(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def _last_answer(text: str) -> str | None:
  """The integer after the last '=' of `text`, canonical ('007' -> '7'); None if none or too long."""
  matches = _ANSWER.findall(limits.clip(text))
  return _integer(matches[-1]) if matches else None


def _integer(digits: str) -> str | None:
  return None if len(digits) - digits.startswith("-") > limits.MAX_NUMBER_DIGITS else str(int(digits))


def parse(text: str) -> int | None:
  answer = _last_answer(text)
  if answer is None and _INTEGER.fullmatch(text.strip()):
    answer = _integer(text.strip())
  return None if answer is None else int(answer)


def reference_answer(reference: str, mode: str = "robust") -> str:
  del mode  # Both modes read the reference the same way.
  value = parse(reference)
  if value is None:
    raise ValueError(f"toy reference has no '=<integer>' answer: {reference!r}")
  return str(value)


def extract_answer(response: str, mode: str) -> str | None:
  del mode
  return _last_answer(response)


def grade(response: str, reference: str, mode: str) -> float:
  answer = extract_answer(response, mode)
  if answer is None:
    return -1.0 if mode == "paper" else 0.0
  return 1.0 if answer == reference_answer(reference) else 0.0


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  del mode
  return a is not None and a == b
