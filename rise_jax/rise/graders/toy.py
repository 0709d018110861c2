"""Toy-task answer checking: the answer is the integer after the last '=' of the scratchpad.

A response "3*4=12,25+12=37" answers 37. paper mode mirrors the GSM8K reference's reward range (unparsable
-> -1, wrong -> 0, right -> 1) so the reference's exp(r / tau) weights see all three values; robust mode gives
0/1. The reference (the problem's worked scratchpad, or a bare integer) is read the same way.
"""

from __future__ import annotations

import re

_ANSWER = re.compile(r"=\s*(-?\d+)")


def parse(text: str) -> int | None:
  matches = _ANSWER.findall(text)
  if matches:
    return int(matches[-1])
  stripped = text.strip()
  return int(stripped) if re.fullmatch(r"-?\d+", stripped) else None


def reference_answer(reference: str, mode: str = "robust") -> str:
  del mode  # Both modes read the reference the same way.
  value = parse(reference)
  if value is None:
    raise ValueError(f"toy reference has no '=<integer>' answer: {reference!r}")
  return str(value)


def extract_answer(response: str, mode: str) -> str | None:
  del mode
  matches = _ANSWER.findall(response)
  return str(int(matches[-1])) if matches else None


def grade(response: str, reference: str, mode: str) -> float:
  answer = extract_answer(response, mode)
  if answer is None:
    return -1.0 if mode == "paper" else 0.0
  return 1.0 if answer == reference_answer(reference) else 0.0


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  del mode
  return a is not None and a == b
