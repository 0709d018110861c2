"""GSM8K, Mistral-7B-Instruct-v0.2, distillation from GPT-3.5, RISE iteration 1 (paper Table 1 row
"Mistral-7B + RISE iteration 1"; no boost, as in the paper).

Checkpoint mistralai/Mistral-7B-Instruct-v0.2, chat template `mistral`. Sized for a TPU v4-32 slice (16 chips x
32 GiB): training mesh (1, 16, 1), micro-batch 16; sampling mesh (4, 1, 4) (8 KV heads split 4 ways).

    python -m rise_jax.run --config=configs/gsm8k_mistral_distill.py
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.TPU_V4_32


def get_config():
  c = recipes.paper(name="gsm8k_mistral_distill", preset="mistral-7b-instruct-v0.2", task="gsm8k",
                    improvement="teacher")
  return finalize(recipes.tpu_v4_32(c))
