"""Ablation on the toy experiment, a 2 x 2: the repairing teacher in iteration 1 (`collect.teacher.kind = "repair"`)
and single-turn records mixed into RISE's data (`rise.mix_single_turn`).

    python -m rise_jax.run --config=configs/ablation_variants.py:<variant>      (default: base)

Variants: rise_jax.pipeline.recipes.ABLATIONS["variants"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "base"):
  return finalize(recipes.toy_ablation("variants", variant))
