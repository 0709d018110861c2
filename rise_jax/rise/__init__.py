"""RISE proper: tasks and their graders, prompt sets, and (in sibling modules) the episode runner, collection,
metrics and reports.

Public entry points here: `grade(task, response, reference, mode="robust")`, `get_task(name, **kwargs)`,
`get_prompt_set(name)`. Importing this package imports neither JAX nor math-verify.
"""

from rise_jax.rise.graders import grade
from rise_jax.rise.prompts import PromptSet, get_prompt_set
from rise_jax.rise.tasks import Problem, Task, get_task

__all__ = ["Problem", "PromptSet", "Task", "get_prompt_set", "get_task", "grade"]
