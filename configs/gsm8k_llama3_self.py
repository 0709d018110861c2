"""GSM8K, Llama-3-8B-Instruct, self-distillation (best-of-16 from the learner), RISE iteration 1 (the paper's
self-distillation table).

Checkpoint meta-llama/Meta-Llama-3-8B-Instruct, chat template `llama3`. Sized for a TPU v5p-16 slice (8 chips x
95 GiB): training mesh (1, 8, 1), micro-batch 8; sampling mesh (4, 1, 2), 8 prompts per sampler call (x16 samples
= 128 cached rows).

    python -m rise_jax.run --config=configs/gsm8k_llama3_self.py
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.TPU_V5P_16


def get_config():
  c = recipes.paper(name="gsm8k_llama3_self", preset="llama-3-8b-instruct", task="gsm8k", improvement="self")
  c.mesh.train = (1, 8, 1)
  c.mesh.sample = (4, 1, 2)
  c.train.micro_batch = 8
  c.sampling.batch_size = 8
  return finalize(c)
