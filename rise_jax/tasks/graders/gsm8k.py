"""GSM8K answer checking: `paper` (the reference's `GSM8KEnv.evaluate_response`, quirks included) and `robust`.

paper:  the last `boxed{([^}]+)}` of the response, commas removed, Python `int()` (so "+18" and " 18" parse,
        "18.0" and "\\$18" do not); unparsable -> -1. Gold: the first `####\\s*([-+]?\\d+(?:\\.\\d+)?)` of the
        reference, so "#### 40,000" reads as 40 and can never be matched. 1 if the two floats are equal, else 0;
        also 0 where float(answer) overflows (309+ digits), where the reference itself crashes.
robust: rewards in {0, 1}. The last stated answer wins among balanced `\\boxed{...}` groups, "the answer is N",
        "answer: N" and "#### N". A number may carry a sign, thousands separators, decimals, a "\\$" / "$" sign,
        a `\\text{...}` wrapper, a unit ("18 dollars") or be a simple fraction; answers compare as exact
        rationals, so 18 == 18.0 == 18.00. The gold's separators are parsed. No arithmetic is ever evaluated.
        A box holding another box is read through the inner one; a number over limits.MAX_NUMBER_DIGITS digits
        is no number.
Both modes read at most limits.MAX_TEXT_CHARS (the end of a longer text) and run in time linear in it.
"""

from __future__ import annotations

import bisect
import re
from fractions import Fraction

from rise_jax.tasks.graders import latex, limits

_PAPER_BOXED = re.compile(r"boxed{([^}]+)}")
_PAPER_GOLD = re.compile(r"####\s*([-+]?\d+(?:\.\d+)?)")

# A number: sign, digits with optional thousands separators, optional decimals; or a leading-dot decimal.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_TEX_FRACTION = re.compile(rf"\\[dt]?frac\{{\s*+({_NUMBER})\s*+\}}\{{\s*+({_NUMBER})\s*+\}}")
_SLASH = re.compile(r"\s*+/\s*+")
_CURRENCY = re.compile(r"\\\$|\$|\\,|\\!|\\;|\\text\{|\\mathrm\{|\\textbf\{|\\mbox\{")
# "The answer is 18", "Final answer: $18", "#### 18"; the number must follow the cue directly. Possessive
# whitespace: nothing after it can match a space, so backtracking into it could only waste time.
_STATED = re.compile(
    rf"(?:answer\s*+(?:is|:|=)|####)\s*+:?\s*+(?:\\\$|\$|\\\(|\*\*)?\s*+({_NUMBER})(?:\s*+/\s*+({_NUMBER}))?",
    re.IGNORECASE)
# Python's default int-string limit: the reference's int() raises ValueError on more digits. With '_' between
# digits and a sign, a string int() accepts within the limit has at most 2 * 4300 characters.
_PAPER_INT_CHARS = 2 * 4300


# ---------------------------------------------------------------------------------------------- paper mode
def paper_extract(response: str) -> int | None:
  """The reference's `extract_answers_from_llm`: int of the last `boxed{...}` without commas, else None.

  Runs the reference's regex on the text up to its last '}' (no match can end later, and without a '}' ahead the
  regex would rescan to the end from every "boxed{": quadratic time).
  """
  text = limits.clip(response)
  matches = _PAPER_BOXED.findall(text, 0, text.rfind("}") + 1)
  if not matches:
    return None
  candidate = matches[-1].replace(",", "").strip()
  if len(candidate) > _PAPER_INT_CHARS:
    return None  # int() would raise ValueError (too many digits), as in the reference
  try:
    return int(candidate)
  except ValueError:
    return None


def paper_gold(reference: str) -> float:
  """The reference's gold parse (first `####` number, separators not understood)."""
  match = _PAPER_GOLD.search(reference)
  if match is None:
    raise ValueError(f"GSM8K reference has no '#### <number>' line: {reference[-80:]!r}")
  return float(match.group(1))


def paper_equal(answer: int, gold: float) -> bool:
  """The reference's `float(answer) == float(gold)`; where float(answer) overflows the reference crashes, and
  such an answer (|answer| >= 2**1024) equals no finite gold: wrong."""
  try:
    return float(answer) == gold
  except OverflowError:
    return False


def paper_grade(response: str, reference: str) -> float:
  answer = paper_extract(response)
  if answer is None:
    return -1.0
  return 1.0 if paper_equal(answer, paper_gold(reference)) else 0.0


# --------------------------------------------------------------------------------------------- robust mode
def _to_fraction(number: str) -> Fraction | None:
  """The value of a `_NUMBER` match; None beyond limits.MAX_NUMBER_DIGITS digits (not an answer)."""
  digits = len(number) - number.count(",") - number.count(".") - (number[0] in "+-")
  if digits > limits.MAX_NUMBER_DIGITS:
    return None
  return Fraction(number.replace(",", ""))


def _ratio(num: str, den: str) -> Fraction | None:
  a, b = _to_fraction(num), _to_fraction(den)
  return None if a is None or not b else a / b


def canonical(value: Fraction) -> str:
  """One spelling per value: '18', '-0.25', '1/3' (a decimal whenever the expansion terminates); exact, no
  float (a float overflows past 1e308 and rounds past 16 digits)."""
  if value.denominator == 1:
    return str(value.numerator)
  d = value.denominator
  twos = (d & -d).bit_length() - 1
  d >>= twos
  fives = 0
  while d % 5 == 0:
    d //= 5
    fives += 1
  if d != 1:
    return f"{value.numerator}/{value.denominator}"
  digits = max(twos, fives)
  whole, frac = divmod(abs(value.numerator) * 10**digits // value.denominator, 10**digits)
  return f"{'-' if value < 0 else ''}{whole}.{frac:0{digits}d}"


def parse_number(text: str) -> Fraction | None:
  """The value stated in a short answer text (a boxed group): its last fraction or number, units ignored.

  Fractions are `\\frac{a}{b}` or two adjacent numbers `a / b` (numbers found left to right, each in one
  piece), so the scan is linear; a zero denominator is no fraction. None when the last number has too many digits.
  """
  text = _CURRENCY.sub(" ", text)
  best = None
  for match in _TEX_FRACTION.finditer(text):
    value = _ratio(match.group(1), match.group(2))
    if value is not None:
      best = (match.end(), value)
  numbers = list(_NUMBER_RE.finditer(text))
  i = 0
  while i + 1 < len(numbers):
    a, b = numbers[i], numbers[i + 1]
    slash = _SLASH.fullmatch(text, a.end(), b.start())
    value = _ratio(a.group(0), b.group(0)) if slash else None
    if value is not None and (best is None or b.end() > best[0]):
      best = (b.end(), value)
    i += 2 if slash else 1  # a slash fraction consumes both numbers, as a left-to-right scan would
  if numbers and (best is None or numbers[-1].end() > best[0]):
    return _to_fraction(numbers[-1].group(0))
  return None if best is None else best[1]


def robust_extract_value(response: str) -> Fraction | None:
  """The last stated answer of a response as an exact rational, or None.

  A box that contains another box is not itself an answer (its inner box is): so the contents parsed are
  disjoint and the time linear.
  """
  text = limits.clip(response)
  stated: list[tuple[int, Fraction]] = []
  spans = latex.boxed_spans(text)
  starts = [start for start, _, _ in spans]
  for start, a, b in spans:
    inner = bisect.bisect_left(starts, a)
    if inner < len(starts) and starts[inner] < b:
      continue
    value = parse_number(text[a:b])
    if value is not None:
      stated.append((start, value))
  for match in _STATED.finditer(text):
    value = _to_fraction(match.group(1)) if match.group(2) is None else _ratio(match.group(1), match.group(2))
    if value is not None:
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
    gold = paper_gold(reference)
    if gold in (float("inf"), float("-inf")):
      raise ValueError(f"GSM8K reference's gold overflows a float: {reference[-80:]!r}")
    return canonical(Fraction(gold))
  return canonical(robust_gold(reference))


def grade(response: str, reference: str, mode: str) -> float:
  return paper_grade(response, reference) if mode == "paper" else robust_grade(response, reference)


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  """Two extracted answers vote together when they are the same number (extract_answer canonicalises)."""
  if a is None or b is None:
    return False
  if mode == "paper":
    x, y = int(a), int(b)
    try:
      return float(x) == float(y)
    except OverflowError:  # past float range only the exact value can match
      return x == y
  return Fraction(a) == Fraction(b)
