"""MATH, Mistral-7B-Instruct-v0.2, distillation from GPT-3.5, RISE iteration 1 (paper Table 1, MATH columns).

Checkpoint mistralai/Mistral-7B-Instruct-v0.2, chat template `mistral`. Training problems from the hub's
EleutherAI/hendrycks_math; evaluation on the paper's 1,000-problem test subset (pass
--config.task.test_source=../shared/data/math/test.jsonl, or any copy of it). Sized for a TPU v4-32 slice
(16 chips x 32 GiB): training mesh (1, 16, 1), micro-batch 16; sampling mesh (4, 1, 4).

    python -m rise_jax.run --config=configs/math_mistral_distill.py --config.task.test_source=<math test.jsonl>
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.TPU_V4_32


def get_config():
  c = recipes.paper(name="math_mistral_distill", preset="mistral-7b-instruct-v0.2", task="math",
                    improvement="teacher")
  return finalize(recipes.tpu_v4_32(c))
