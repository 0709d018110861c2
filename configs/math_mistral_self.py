"""MATH, Mistral-7B-Instruct-v0.2, self-distillation (best-of-16 from the learner at the improvement turn), RISE
iteration 1 (the paper's self-distillation table; the reference README's "Example 2").

Checkpoint mistralai/Mistral-7B-Instruct-v0.2, chat template `mistral`. Sized for one node of 8x NVIDIA A100
80GB: training mesh (1, 8, 1), micro-batch 8; sampling mesh (4, 1, 2) with 8 prompts per sampler call (x16
samples = 128 cached rows).

    python -m rise_jax.run --config=configs/math_mistral_self.py --config.task.test_source=<math test.jsonl>
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.GPU_8XA100_80


def get_config():
  c = recipes.paper(name="math_mistral_self", preset="mistral-7b-instruct-v0.2", task="math", improvement="self")
  c = recipes.gpu_8x80(c)
  c.sampling.batch_size = 8
  return finalize(c)
