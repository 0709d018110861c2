"""RISE proper, the paper and nothing else: `algorithm` (Algorithms 1 and 2: protocols, seed rule, criteria,
dedupe, exp(r / tau) weights, iteration schedule), `dataset` (rollouts -> weighted training records), `metrics`
and `report`. Problems live in `rise_jax.tasks`, the episode engine in `rise_jax.rollout`, the run in
`rise_jax.pipeline` (docs/architecture.md).
"""

# Tasks, graders and prompt sets live in `rise_jax.tasks`; this re-export keeps older callers'
# `from rise_jax.rise import grade, get_task, get_prompt_set` working. Importing it imports no JAX.
from rise_jax.tasks import Problem, PromptSet, Task, get_prompt_set, get_task, grade

__all__ = ["Problem", "PromptSet", "Task", "get_prompt_set", "get_task", "grade"]
