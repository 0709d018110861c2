"""Prompt sets as data: `get_prompt_set(name)` reads `rise_jax/tasks/prompts/<name>.json` (or any JSON file path).

A set holds the opening turns (an instruction with a worked example as the first user turn, the example's answer
as the first assistant turn), the template of the turn that poses the problem, the template of the feedback
after an attempt and, optionally, the template of a request to repair a failed attempt (`repair`: what a teacher
prompted with `collect.teacher.prompt = "repair"` receives). Templates substitute the literals `{question}` and,
in `repair`, `{attempt}` (plain replacement, not `str.format`, since problems and instructions contain LaTeX
braces). Adding a set is adding a JSON file; no code changes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

PROMPT_DIR = os.path.dirname(os.path.abspath(__file__))
_TEXT_FIELDS = ("name", "description", "source", "instruction", "example_answer", "problem", "feedback")
_TEMPLATES = ("problem", "feedback")
PLACEHOLDER = "{question}"
ATTEMPT = "{attempt}"
# One pass over both fields, so a question quoting "{attempt}" (or an attempt "{question}") is left as written.
_REPAIR_FIELDS = re.compile(re.escape(PLACEHOLDER) + "|" + re.escape(ATTEMPT))


@dataclasses.dataclass(frozen=True)
class PromptSet:
  name: str
  description: str
  source: str            # where the strings come from (the reference file, a paper)
  instruction: str       # first user turn: instruction + worked example
  example_answer: str    # first assistant turn: the example's answer
  problem_template: str   # the turn that poses a problem; contains {question}
  feedback_template: str  # the turn after an attempt; contains {question}
  repair_template: str | None = None  # a request to repair a failed attempt; contains {question} and {attempt}

  def problem(self, question: str) -> str:
    """The user turn that poses `question`."""
    return self.problem_template.replace(PLACEHOLDER, question)

  def initial_messages(self, question: str) -> list[dict[str, str]]:
    """[instruction (user), example answer (assistant), the problem (user)]: the state before turn 1."""
    return [{"role": "user", "content": self.instruction},
            {"role": "assistant", "content": self.example_answer},
            {"role": "user", "content": self.problem(question)}]

  def feedback(self, question: str) -> str:
    """The user turn after an attempt at `question` (the same whatever the attempt was)."""
    return self.feedback_template.replace(PLACEHOLDER, question)

  def repair(self, question: str, attempt: str) -> str:
    """The one user turn asking to repair `attempt` at `question`; an error for a set without a repair template."""
    if self.repair_template is None:
      raise ValueError(f"prompt set {self.name!r} has no repair template")
    values = {PLACEHOLDER: question, ATTEMPT: attempt}
    return _REPAIR_FIELDS.sub(lambda m: values[m.group(0)], self.repair_template)


def available() -> list[str]:
  """Names of the shipped prompt sets."""
  return sorted(f[:-len(".json")] for f in os.listdir(PROMPT_DIR) if f.endswith(".json"))


def load_prompt_set(path: str) -> PromptSet:
  """A prompt set from a JSON file; a missing or non-string field, or a template without {question} (a repair
  template also without {attempt}), is an error naming the file and the field."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  for field in _TEXT_FIELDS:
    if not isinstance(data.get(field), str):
      raise ValueError(f"{path}: field {field!r} is missing or not a string")
  for field in _TEMPLATES:
    if PLACEHOLDER not in data[field]:
      raise ValueError(f"{path}: field {field!r} must contain {PLACEHOLDER}")
  if "repair" in data:
    _check_repair(path, data["repair"])
  unknown = set(data) - set(_TEXT_FIELDS) - {"repair"}
  if unknown:
    raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
  return PromptSet(name=data["name"], description=data["description"], source=data["source"],
                   instruction=data["instruction"], example_answer=data["example_answer"],
                   problem_template=data["problem"], feedback_template=data["feedback"],
                   repair_template=data.get("repair"))


def _check_repair(path: str, template) -> None:
  if not isinstance(template, str):
    raise ValueError(f"{path}: field 'repair' is not a string")
  missing = [p for p in (PLACEHOLDER, ATTEMPT) if p not in template]
  if missing:
    raise ValueError(f"{path}: field 'repair' must contain {' and '.join(missing)}")


@functools.lru_cache(maxsize=None)
def get_prompt_set(name: str) -> PromptSet:
  """A shipped set by name ("paper", "self_refine", "toy", ...) or a JSON file by path."""
  if name.endswith(".json") or os.sep in name:
    return load_prompt_set(name)
  path = os.path.join(PROMPT_DIR, f"{name}.json")
  if not os.path.isfile(path):
    raise ValueError(f"unknown prompt set {name!r}; shipped: {available()} (or pass a .json path)")
  return load_prompt_set(path)
