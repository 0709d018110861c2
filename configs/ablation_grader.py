"""Ablation on the toy experiment: the reference's grader vs the robust one (identical on the toy task's integer answers; run it on a real-scale config with --config.task.grader).

    python -m rise_jax.run --config=configs/ablation_grader.py:<variant>      (default: robust)

Variants: rise_jax.pipeline.recipes.ABLATIONS["grader"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "robust"):
  return finalize(recipes.toy_ablation("grader", variant))
