"""RISE proper, the paper and nothing else: `algorithm` (Algorithms 1 and 2: protocols, seed rule, criteria,
dedupe, exp(r / tau) weights, iteration schedule), `dataset` (rollouts -> weighted training records), `metrics`
and `report`. Problems live in `rise_jax.tasks`, the episode engine in `rise_jax.rollout`, the run in
`rise_jax.pipeline` (docs/architecture.md).
"""
