"""MATH answer checking: `paper` (the reference's `MATHEnv.evaluate_response`) and `robust` (math-verify).

paper:  the reference's one-level-nesting regex `boxed\\{((?:[^{}]|(?:{[^}]*}))*)\\}` on response and solution,
        last match, then the reference's Hendrycks `is_equiv` (None vs None is True). Answers with two levels of
        braces (`\\frac{\\sqrt{3}}{2}`) are truncated before comparison, on both sides alike.
robust: the last balanced-brace `\\boxed{}` of each side; equal when the texts are identical up to whitespace,
        else when math-verify says so (`graders.verify`: one deadline per call, at most one timeout per distinct
        answer, answers over limits.MAX_VERIFY_CHARS not sent); without its verdict, Hendrycks `is_equiv` decides.
Both modes read at most limits.MAX_TEXT_CHARS (the end of a longer text) and run in time linear in it.
"""

from __future__ import annotations

import bisect
import re

from rise_jax.tasks.graders import hendrycks, latex, limits, verify

_CLOSE = re.compile(r"\}")
_OPEN = re.compile(r"\{")
# A '}' whose previous brace is a '}' too: the match ends at m.end().
_CLOSE_AFTER_CLOSE = re.compile(r"\}[^{}]*+(?=\})")


def paper_extract(text: str) -> str | None:
  """The reference's `MATHEnv.extract_answer`: the last match of `boxed\\{((?:[^{}]|(?:{[^}]*}))*)\\}`, in linear time.

  The regex backtracks (quadratic on an unclosed `\\boxed{` repeated), so its matches are computed from brace
  positions: from a content start, plain characters are consumed until a brace; a '}' ends the match; a '{'
  item runs to the next '}', after which the match ends at the first '}' whose previous brace is a '}' (every
  '{' item in between again runs to the next '}'). No '}' ahead: no match, and the scan resumes one character on.
  """
  text = limits.clip(text)
  first = text.find("boxed{")
  if first < 0:
    return None
  closes = [m.start() for m in _CLOSE.finditer(text, first)]
  opens = [m.start() for m in _OPEN.finditer(text, first)]
  ends = [m.end() for m in _CLOSE_AFTER_CLOSE.finditer(text, first)]

  def match_end(start: int) -> int | None:
    j = bisect.bisect_left(closes, start)
    if j == len(closes):
      return None
    k = bisect.bisect_left(opens, start)
    if k == len(opens) or opens[k] > closes[j]:
      return closes[j]
    k = bisect.bisect_right(ends, closes[j])
    return ends[k] if k < len(ends) else None

  last, pos = None, 0
  while (i := text.find("boxed{", pos)) >= 0:
    end = match_end(i + 6)
    if end is None:
      pos = i + 1
    else:
      last, pos = (i + 6, end), end + 1
  return None if last is None else text[last[0]:last[1]]


def paper_grade(response: str, reference: str) -> float:
  return 1.0 if hendrycks.is_equiv(paper_extract(response), paper_extract(reference)) else 0.0


def robust_equivalent(a: str | None, b: str | None) -> bool:
  """Equivalence of two extracted answers (order-insensitive up to math-verify's own asymmetries)."""
  if a is None or b is None:
    return False
  if a.split() == b.split():
    return True  # The same text up to whitespace runs: no need to parse.
  verdict = verify.equal(b, a)
  return hendrycks.is_equiv(a, b) if verdict is None else verdict


def reference_boxed(reference: str) -> str:
  answer = latex.last_boxed(reference)
  if answer is None:
    raise ValueError(f"MATH solution has no \\boxed{{}} answer: {reference[-80:]!r}")
  return answer.strip()


def robust_grade(response: str, reference: str) -> float:
  pred = latex.last_boxed(response)
  return 1.0 if robust_equivalent(pred, reference_boxed(reference)) else 0.0


# --------------------------------------------------------------------------------------------- task facade
def extract_answer(response: str, mode: str) -> str | None:
  """paper: the Hendrycks-normalised regex match (votes by string equality); robust: the raw balanced content
  (votes by `answers_equivalent`, since normalising would break LaTeX that math-verify must parse)."""
  if mode == "paper":
    answer = paper_extract(response)
    return None if answer is None else hendrycks.normalise(answer)
  answer = latex.last_boxed(response)
  return None if answer is None else answer.strip()


def reference_answer(reference: str, mode: str = "robust") -> str | None:
  if mode == "paper":
    answer = paper_extract(reference)
    return None if answer is None else hendrycks.normalise(answer)
  return reference_boxed(reference)


def grade(response: str, reference: str, mode: str) -> float:
  return paper_grade(response, reference) if mode == "paper" else robust_grade(response, reference)


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  if mode == "paper":
    return a is not None and a == b
  return robust_equivalent(a, b)
