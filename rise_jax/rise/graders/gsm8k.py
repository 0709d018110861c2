"""GSM8K answer checking: `paper` (the reference's `GSM8KEnv.evaluate_response`, quirks included) and `robust`.

paper:  the last `boxed{([^}]+)}` of the response, commas removed, Python `int()` (so "+18" and " 18" parse,
        "18.0" and "\\$18" do not); unparsable -> -1. Gold: the first `####\\s*([-+]?\\d+(?:\\.\\d+)?)` of the
        reference, so "#### 40,000" reads as 40 and can never be matched. 1 if the two floats are equal, else 0.
robust: rewards in {0, 1}. The last stated answer wins among balanced `\\boxed{...}` groups, "the answer is N",
        "answer: N" and "#### N". A number may carry a sign, thousands separators, decimals, a "\\$" / "$" sign,
        a `\\text{...}` wrapper, a unit ("18 dollars") or be a simple fraction; answers compare as exact
        rationals, so 18 == 18.0 == 18.00. The gold's separators are parsed. No arithmetic is ever evaluated.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rise_jax.rise.graders import latex

_PAPER_BOXED = re.compile(r"boxed{([^}]+)}")
_PAPER_GOLD = re.compile(r"####\s*([-+]?\d+(?:\.\d+)?)")

# A number: sign, digits with optional thousands separators, optional decimals; or a leading-dot decimal.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_FRACTION = re.compile(rf"\\[dt]?frac\{{\s*({_NUMBER})\s*\}}\{{\s*({_NUMBER})\s*\}}|({_NUMBER})\s*/\s*({_NUMBER})")
_NUMBER_RE = re.compile(_NUMBER)
_CURRENCY = re.compile(r"\\\$|\$|\\,|\\!|\\;|\\text\{|\\mathrm\{|\\textbf\{|\\mbox\{")
# "The answer is 18", "Final answer: $18", "#### 18"; the number must follow the cue directly.
_STATED = re.compile(
    rf"(?:answer\s*(?:is|:|=)|####)\s*:?\s*(?:\\\$|\$|\\\(|\*\*)?\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?",
    re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- paper mode
def paper_extract(response: str) -> int | None:
  """The reference's `extract_answers_from_llm`: int of the last `boxed{...}` without commas, else None."""
  matches = _PAPER_BOXED.findall(response)
  if not matches:
    return None
  try:
    return int(matches[-1].replace(",", ""))
  except ValueError:
    return None


def paper_gold(reference: str) -> float:
  """The reference's gold parse (first `####` number, separators not understood)."""
  match = _PAPER_GOLD.search(reference)
  if match is None:
    raise ValueError(f"GSM8K reference has no '#### <number>' line: {reference[-80:]!r}")
  return float(match.group(1))


def paper_grade(response: str, reference: str) -> float:
  answer = paper_extract(response)
  if answer is None:
    return -1.0
  return 1.0 if float(answer) == paper_gold(reference) else 0.0


# --------------------------------------------------------------------------------------------- robust mode
def _to_fraction(number: str) -> Fraction:
  return Fraction(number.replace(",", ""))


def canonical(value: Fraction) -> str:
  """One spelling per value: '18', '-0.25', '1/3' (a decimal whenever the expansion terminates)."""
  if value.denominator == 1:
    return str(value.numerator)
  d = value.denominator
  for p in (2, 5):
    while d % p == 0:
      d //= p
  if d != 1:
    return f"{value.numerator}/{value.denominator}"
  digits = 0
  while (value * 10**digits).denominator != 1:
    digits += 1
  return f"{float(value):.{digits}f}"


def parse_number(text: str) -> Fraction | None:
  """The value stated in a short answer text (a boxed group): its last fraction or number, units ignored."""
  text = _CURRENCY.sub(" ", text)
  best = None
  for match in _FRACTION.finditer(text):
    num, den = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    if _to_fraction(den) != 0:
      best = (match.end(), _to_fraction(num) / _to_fraction(den))
  last_number = None
  for match in _NUMBER_RE.finditer(text):
    last_number = (match.end(), _to_fraction(match.group(0)))
  if best is not None and (last_number is None or last_number[0] <= best[0]):
    return best[1]
  return None if last_number is None else last_number[1]


def robust_extract_value(response: str) -> Fraction | None:
  """The last stated answer of a response as an exact rational, or None."""
  stated: list[tuple[int, Fraction]] = []
  for start, content in latex.boxed_contents(response):
    value = parse_number(content)
    if value is not None:
      stated.append((start, value))
  for match in _STATED.finditer(response):
    value = _to_fraction(match.group(1))
    if match.group(2) is not None:
      den = _to_fraction(match.group(2))
      if den == 0:
        continue
      value /= den
    stated.append((match.start(), value))
  if not stated:
    return None
  return max(stated, key=lambda item: item[0])[1]


def robust_gold(reference: str) -> Fraction:
  """The gold value after the last `####` (separators understood)."""
  if "####" not in reference:
    raise ValueError(f"GSM8K reference has no '#### <number>' line: {reference[-80:]!r}")
  value = parse_number(reference.rsplit("####", 1)[1])
  if value is None:
    raise ValueError(f"GSM8K reference has no number after '####': {reference[-80:]!r}")
  return value


def robust_grade(response: str, reference: str) -> float:
  value = robust_extract_value(response)
  return 1.0 if value is not None and value == robust_gold(reference) else 0.0


# --------------------------------------------------------------------------------------------- task facade
def extract_answer(response: str, mode: str) -> str | None:
  if mode == "paper":
    answer = paper_extract(response)
    return None if answer is None else str(answer)
  value = robust_extract_value(response)
  return None if value is None else canonical(value)


def reference_answer(reference: str, mode: str = "robust") -> str:
  if mode == "paper":
    return canonical(Fraction(paper_gold(reference)))
  return canonical(robust_gold(reference))


def grade(response: str, reference: str, mode: str) -> float:
  return paper_grade(response, reference) if mode == "paper" else robust_grade(response, reference)


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  """Two extracted answers vote together when they are the same number (extract_answer canonicalises)."""
  if a is None or b is None:
    return False
  if mode == "paper":
    return float(a) == float(b)
  return Fraction(a) == Fraction(b)
