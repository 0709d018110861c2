"""Balanced-brace extraction of `\\boxed{...}` groups (the robust graders' extractor), linear in the text."""

from __future__ import annotations

import re

from rise_jax.rise.graders import limits

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"[{}]")
_TOKEN = re.compile(r"[^\s$]+")


def matching_braces(text: str, start: int = 0) -> dict[int, int]:
  """{offset of '{': offset of its matching '}'} for every closed group at or after `start` (one stack pass)."""
  out, stack = {}, []
  for match in _BRACE.finditer(text, start):
    if match.group() == "{":
      stack.append(match.start())
    elif stack:  # a '}' with nothing open closes nothing
      out[stack.pop()] = match.start()
  return out


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
  """(start of the command, start, end of the content) of every `\\boxed{...}` / `\\fbox{...}` in `text`,
  braces balanced to any depth. `\\boxed 5` (a single unbraced token, valid LaTeX) is accepted too; an unclosed
  group is skipped."""
  starts = list(_BOXED_START.finditer(text))
  if not starts:
    return []
  closes = matching_braces(text, starts[0].end())
  out = []
  for match in starts:
    i = match.end()
    if i < len(text) and text[i] == "{":
      if i in closes:
        out.append((match.start(), i + 1, closes[i]))
    elif match.group(0).endswith(" "):
      token = _TOKEN.match(text, i)
      if token:
        out.append((match.start(), i, token.end()))
  return out


def boxed_contents(text: str) -> list[tuple[int, str]]:
  """Every boxed group of `text` (clipped to limits.MAX_TEXT_CHARS) as (start offset, content)."""
  text = limits.clip(text)
  return [(start, text[a:b]) for start, a, b in boxed_spans(text)]


def last_boxed(text: str) -> str | None:
  """Content of the last balanced `\\boxed{}` in `text`, or None."""
  text = limits.clip(text)
  spans = boxed_spans(text)
  return text[spans[-1][1]:spans[-1][2]] if spans else None
