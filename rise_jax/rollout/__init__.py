"""The multi-turn episode runner, knowing nothing of RISE: a `Protocol` says what an episode is, `run_episodes`
runs it over problems with one policy per turn (the learner through the engine, a teacher, a script) and appends
one record per episode to the rollout log (`rise_jax.rollout/2`, docs/contracts.md §3). Importing it imports no JAX.
"""

from rise_jax.rollout.policies import (Completion, EnginePolicy, InstantStream, Policy, ReferencePolicy,
                                       RepairPolicy, RepairPromptPolicy, Sample, ScriptedPolicy, TurnRequest,
                                       TurnSampling, sample_uid)
from rise_jax.rollout.protocol import Protocol
from rise_jax.rollout.runner import RunSummary, run_episodes

__all__ = ["Completion", "EnginePolicy", "InstantStream", "Policy", "Protocol", "ReferencePolicy", "RepairPolicy",
           "RepairPromptPolicy", "RunSummary", "Sample", "ScriptedPolicy", "TurnRequest", "TurnSampling",
           "run_episodes", "sample_uid"]
