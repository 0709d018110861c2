"""Ablation on the toy experiment: gradient clipping off (the reference) vs max_grad_norm 1.0.

    python -m rise_jax.run --config=configs/ablation_clip.py:<variant>      (default: off)

Variants: rise_jax.pipeline.recipes.ABLATIONS["clip"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "off"):
  return finalize(recipes.toy_ablation("clip", variant))
