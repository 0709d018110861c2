"""The real-model RISE experiment: SmolLM2-135M-Instruct on GSM8K, a boost on reference solutions, two RISE
iterations (distillation from the references, then self-distillation without an oracle) with their single-turn
controls, evaluated over 5 turns (with and without oracle) and with 5 parallel samples. Sized for <= 8 minutes
on one H100; `experiments/real_model.py` fetches the checkpoint, runs this config and prints the tables.

    python experiments/real_model.py            # one GPU
    python experiments/real_model.py --smoke    # CPU, a few problems and tokens (CI)
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.GPU_1XH100_80


def get_config():
  return finalize(recipes.smollm2_rise())
