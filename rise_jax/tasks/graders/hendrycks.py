"""The Hendrycks MATH answer normaliser, as the RISE reference runs it (`environments/math_equivalence.py`).

Behaviour is reproduced step for step, including where it raises: the reference's `is_equiv` catches any
exception from the normaliser and falls back to comparing the raw strings, so *where* it raises changes grades.
One deliberate difference from Hendrycks' original file is kept because the reference has it: the original
strips both "\\%" and "%", the RISE copy strips "\\%" twice (its second literal is "\\%" too), so a bare "%"
survives normalisation in paper mode.
"""

from __future__ import annotations


class _NormaliserError(Exception):
  """Raised where the reference normaliser raises (IndexError / AssertionError), to trigger its fallback."""


def _fix_fracs(s: str) -> str:
  """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; braced fractions are kept."""
  head, *tails = s.split("\\frac")
  out = [head]
  for tail in tails:
    out.append("\\frac")
    if not tail:
      raise _NormaliserError("\\frac at the end of the string")
    if tail[0] == "{":
      out.append(tail)
      continue
    if len(tail) < 2:
      return s  # The reference gives up on the whole string here, it does not raise.
    a, b, rest = tail[0], tail[1], tail[2:]
    out.append("{" + a + "}" + (b if b == "{" else "{" + b + "}") + rest)
  return "".join(out)


def _fix_a_slash_b(s: str) -> str:
  """'3/4' -> '\\frac{3}{4}' when both sides are canonical Python ints (the reference round-trips through int)."""
  parts = s.split("/")
  if len(parts) != 2:
    return s
  try:
    a, b = int(parts[0]), int(parts[1])
  except ValueError:
    return s
  if s != f"{a}/{b}":
    return s
  return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
  """Drop a trailing '\\text{ unit}'; more than one such group makes the reference's assert fail."""
  if "\\text{ " not in s:
    return s
  parts = s.split("\\text{ ")
  if len(parts) != 2:
    raise _NormaliserError("more than one '\\text{ ' group")
  return parts[0]


def _fix_sqrt(s: str) -> str:
  """\\sqrt3 -> \\sqrt{3} (one character only, as in the reference)."""
  if "\\sqrt" not in s:
    return s
  head, *tails = s.split("\\sqrt")
  out = [head]
  for tail in tails:
    if not tail:
      raise _NormaliserError("\\sqrt at the end of the string")
    out.append("\\sqrt" + tail if tail[0] == "{" else "\\sqrt{" + tail[0] + "}" + tail[1:])
  return "".join(out)


def strip_string(s: str) -> str:
  """The reference's `_strip_string`; raises `_NormaliserError` where the reference raises."""
  for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                   ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
    s = s.replace(old, new)
  s = _remove_right_units(s)
  s = s.replace("\\%", "")
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if not s:
    return s
  if s[0] == ".":
    s = "0" + s
  # A short left-hand side such as "k = " is dropped.
  sides = s.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:
    s = sides[1]
  s = _fix_sqrt(s)
  s = s.replace(" ", "")
  s = _fix_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  return _fix_a_slash_b(s)


def normalise(s: str) -> str:
  """`strip_string`, or the raw string where the reference normaliser would raise."""
  try:
    return strip_string(s)
  except _NormaliserError:
    return s


def is_equiv(a: str | None, b: str | None) -> bool:
  """The reference's `is_equiv`: None vs None is True; a normaliser failure falls back to raw equality."""
  if a is None and b is None:
    return True
  if a is None or b is None:
    return False
  try:
    return strip_string(a) == strip_string(b)
  except _NormaliserError:
    return a == b
