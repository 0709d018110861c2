"""Ablation on the toy experiment: which prefixes are trained (rise.md): all, better, best, success.

    python -m rise_jax.run --config=configs/ablation_criteria.py:<variant>      (default: all)

Variants: rise_jax.pipeline.recipes.ABLATIONS["criteria"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "all"):
  return finalize(recipes.toy_ablation("criteria", variant))
