"""Ablation on the toy experiment: iterative vs one-shot at the same number of collected episodes (paper Fig. 6c).

    python -m rise_jax.run --config=configs/ablation_oneshot.py:<variant>      (default: iterative)

Variants: rise_jax.pipeline.recipes.ABLATIONS["oneshot"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "iterative"):
  return finalize(recipes.toy_ablation("oneshot", variant))
