"""Answer checkers per task and grading mode ("paper" reproduces the reference, "robust" is 0/1 and lenient).

Each task module exposes the same four functions: `extract_answer(response, mode)`, `reference_answer(reference,
mode)`, `grade(response, reference, mode) -> float` and `answers_equivalent(a, b, mode)`. Correct means
`grade(...) == 1.0` everywhere.
"""

from __future__ import annotations

import types

from rise_jax.tasks.graders import gsm8k, math, toy

MODES = ("paper", "robust")
GRADERS: dict[str, types.ModuleType] = {"gsm8k": gsm8k, "math": math, "toy": toy}


def get_grader(task: str) -> types.ModuleType:
  """The grader module of a task name."""
  if task not in GRADERS:
    raise ValueError(f"no grader for task {task!r}; known: {sorted(GRADERS)}")
  return GRADERS[task]


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"grading mode {mode!r} is not one of {list(MODES)}")
  return mode


def grade(task, response: str, reference: str, mode: str = "robust") -> float:
  """Reward of `response` against the dataset's own answer field `reference` (GSM8K answer, MATH solution).

  `task` is a task name ("gsm8k", "math", "toy") or a Task.
  """
  name = task if isinstance(task, str) else task.name
  return get_grader(name).grade(response, reference, check_mode(mode))
