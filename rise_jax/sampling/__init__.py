"""Batched, jitted, multi-turn sampling over an explicit KV cache (see `sampler.py` for the API and contracts).

`Sampler` (prefill + `lax.while_loop` decode, continuation across turns), `SamplingParams` (what to sample),
`Engine` (continuous batching over a paged, shared KV pool).
"""

from rise_jax.sampling.engine import Engine, EngineStream, Request, SampleResult
from rise_jax.sampling.params import SamplingParams
from rise_jax.sampling.sampler import Conversation, SampleOutput, Sampler

__all__ = ["Conversation", "Engine", "EngineStream", "Request", "SampleOutput", "SampleResult", "Sampler",
           "SamplingParams"]
