"""Ablation on the toy experiment: number of turns K in the collected training episodes.

    python -m rise_jax.run --config=configs/ablation_turns.py:<variant>      (default: 2)

Variants: rise_jax.pipeline.recipes.ABLATIONS["turns"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "2"):
  return finalize(recipes.toy_ablation("turns", variant))
