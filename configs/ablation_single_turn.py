"""Ablation on the toy experiment: multi-turn training data vs the same data with the history stripped (the RISE chain itself).

    python -m rise_jax.run --config=configs/ablation_single_turn.py:<variant>      (default: multi)

Variants: rise_jax.pipeline.recipes.ABLATIONS["single_turn"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "multi"):
  return finalize(recipes.toy_ablation("single_turn", variant))
