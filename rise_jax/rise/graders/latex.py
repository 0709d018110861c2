"""Balanced-brace extraction of `\\boxed{...}` groups (the robust graders' extractor)."""

from __future__ import annotations

import re

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*")


def boxed_contents(text: str) -> list[tuple[int, str]]:
  """Every `\\boxed{...}` / `\\fbox{...}` in `text` as (start offset, content), braces balanced to any depth.

  `\\boxed 5` (a single unbraced token, valid LaTeX) is accepted too; an unclosed group is skipped.
  """
  out = []
  for match in _BOXED_START.finditer(text):
    i = match.end()
    if i < len(text) and text[i] == "{":
      depth = 0
      for j in range(i, len(text)):
        if text[j] == "{":
          depth += 1
        elif text[j] == "}":
          depth -= 1
          if depth == 0:
            out.append((match.start(), text[i + 1:j]))
            break
    else:
      token = re.match(r"[^\s$]+", text[i:])
      if token and match.group(0).endswith(" "):
        out.append((match.start(), token.group(0)))
  return out


def last_boxed(text: str) -> str | None:
  """Content of the last balanced `\\boxed{}` in `text`, or None."""
  found = boxed_contents(text)
  return found[-1][1] if found else None
