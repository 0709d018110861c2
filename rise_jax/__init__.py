"""rise_jax: RISE (Recursive Introspection, NeurIPS 2024) in JAX/Flax.

Subpackages: `models` (Llama/Mistral ports, HF I/O), `chat` (the one chat renderer), `sampling` (the
continuous-batching engine), `train` (sharded reward-weighted training), `rise` (tasks, graders, the episode runner,
collection, metrics). Importing the top-level package imports nothing heavy.
"""

__version__ = "0.1.0"
