"""The multi-turn episode engine, knowing nothing of RISE: a `Protocol` says what an episode is, `run_episodes`
runs it over problems with one policy per turn (learner through the sampler, a teacher, a script) and appends one
record per episode to the rollout log (`rise_jax.rollout/2`, docs/contracts.md §3). Importing it imports no JAX.
"""

from rise_jax.rollout.policies import (Completion, Policy, ReferencePolicy, Request, Sample, SamplerPolicy,
                                       ScriptedPolicy, TurnSampling, sample_uid)
from rise_jax.rollout.protocol import Protocol
from rise_jax.rollout.runner import RunSummary, run_episodes

__all__ = ["Completion", "Policy", "Protocol", "ReferencePolicy", "Request", "RunSummary", "Sample",
           "SamplerPolicy", "ScriptedPolicy", "TurnSampling", "run_episodes", "sample_uid"]
