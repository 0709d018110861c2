"""Ablation on the toy experiment: history window W at inference (full history, or the last W-1 attempts).

    python -m rise_jax.run --config=configs/ablation_window.py:<variant>      (default: full)

Variants: rise_jax.pipeline.recipes.ABLATIONS["window"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "full"):
  return finalize(recipes.toy_ablation("window", variant))
