"""What a problem is and how it is graded: tasks by name (`get_task("gsm8k" | "math" | "toy", **source_kwargs) ->
Task`), their graders (`grade(task, response, reference, mode)`) and prompt sets (`get_prompt_set(name)`).
Importing it imports neither JAX nor math-verify."""

from __future__ import annotations

from typing import Any

from rise_jax.tasks.base import SPLITS, Problem, Task, read_jsonl, split_dev
from rise_jax.tasks.graders import grade
from rise_jax.tasks.gsm8k import GSM8KTask
from rise_jax.tasks.math import MATHTask
from rise_jax.tasks.prompts import PromptSet, get_prompt_set
from rise_jax.tasks.toy import ToyTask

TASKS: dict[str, type[Task]] = {"gsm8k": GSM8KTask, "math": MATHTask, "toy": ToyTask}


def get_task(name: str, **kwargs: Any) -> Task:
  """A task by name. kwargs: dev_size, dev_seed, train_size, test_size; gsm8k/math: train_source,
  test_source (local jsonl or hub "owner/name[:config,...]"); toy: seed, form, max_addend, max_factor."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name](**kwargs)


def task_from_config(task_config) -> Task:
  """The task of a config's `task` section (contracts §1): name, sources, dev_size and the size caps."""
  kwargs: dict[str, Any] = {"dev_size": task_config.dev_size, "train_size": task_config.train_size}
  if task_config.test_size is not None or task_config.name != "toy":
    kwargs["test_size"] = task_config.test_size
  if task_config.name == "toy":
    kwargs.update(form=task_config.toy_form, max_factor=task_config.toy_max_factor)
  else:
    kwargs.update(train_source=task_config.train_source, test_source=task_config.test_source)
  return get_task(task_config.name, **kwargs)


__all__ = ["SPLITS", "TASKS", "GSM8KTask", "MATHTask", "Problem", "PromptSet", "Task", "ToyTask", "get_prompt_set",
           "get_task", "grade", "read_jsonl", "split_dev", "task_from_config"]
