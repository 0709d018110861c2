"""Ablation on the toy experiment: number of RISE iterations.

    python -m rise_jax.run --config=configs/ablation_iterations.py:<variant>      (default: 1)

Variants: rise_jax.pipeline.recipes.ABLATIONS["iterations"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "1"):
  return finalize(recipes.toy_ablation("iterations", variant))
