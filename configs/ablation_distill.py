"""Ablation on the toy experiment: self-distillation (best-of-N from the learner) vs distillation from a stronger toy checkpoint.

    python -m rise_jax.run --config=configs/ablation_distill.py:<variant>      (default: self)

Variants: rise_jax.pipeline.recipes.ABLATIONS["distill"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "self"):
  return finalize(recipes.toy_ablation("distill", variant))
