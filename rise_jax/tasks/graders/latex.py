"""Balanced-brace extraction of `\\boxed{...}` groups (the robust graders' extractor), linear in the text."""

from __future__ import annotations

import re

from rise_jax.tasks.graders import limits

# `\boxed{` (a braced group), and `\boxed 5`: whitespace ending in a space, then a token (neither '{' nor '$').
_BRACED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_UNBRACED = re.compile(r"\\(?:boxed|fbox)\s* (?=[^\s${])")
_BRACE = re.compile(r"[{}]")
_TOKEN = re.compile(r"[^\s$]+")


def matching_braces(text: str, start: int = 0, end: int | None = None) -> dict[int, int]:
  """{offset of '{': offset of its matching '}'} for every closed group in text[start:end] (one stack pass)."""
  end = len(text) if end is None else end
  positions = [m.start() for m in _BRACE.finditer(text, start, end)]
  out, stack = {}, []
  for pos, brace in zip(positions, _BRACE.findall(text, start, end)):
    if brace == "{":
      stack.append(pos)
    elif stack:  # a '}' with nothing open closes nothing
      out[stack.pop()] = pos
  return out


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
  """(start of the command, start, end of the content) of every `\\boxed{...}` / `\\fbox{...}` in `text`, in order,
  braces balanced to any depth. `\\boxed 5` (a single unbraced token, valid LaTeX) is accepted too; an unclosed
  group is skipped."""
  last_close = text.rfind("}")  # no group closes after it: later `\boxed{` need not be looked at
  braced = list(_BRACED.finditer(text, 0, max(last_close, 0)))
  closes = matching_braces(text, braced[0].end() - 1, last_close + 1) if braced else {}
  out = [(m.start(), m.end(), closes[m.end() - 1]) for m in braced if m.end() - 1 in closes]
  out += [(m.start(), m.end(), _TOKEN.match(text, m.end()).end()) for m in _UNBRACED.finditer(text)]
  return sorted(out)


def boxed_contents(text: str) -> list[tuple[int, str]]:
  """Every boxed group of `text` (clipped to limits.MAX_TEXT_CHARS) as (start offset, content)."""
  text = limits.clip(text)
  return [(start, text[a:b]) for start, a, b in boxed_spans(text)]


def last_boxed(text: str) -> str | None:
  """Content of the last balanced `\\boxed{}` in `text`, or None."""
  text = limits.clip(text)
  spans = boxed_spans(text)
  return text[spans[-1][1]:spans[-1][2]] if spans else None
