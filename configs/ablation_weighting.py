"""Ablation on the toy experiment: reward weighting vs filtering: exp(r/tau) at several tau, uniform (plain SFT), filter (tau -> 0: correct actions only), the self-normalised estimator.

    python -m rise_jax.run --config=configs/ablation_weighting.py:<variant>      (default: exp_tau0.4)

Variants: rise_jax.pipeline.recipes.ABLATIONS["weighting"]; experiments/ablations.py runs them all and writes the table.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "exp_tau0.4"):
  return finalize(recipes.toy_ablation("weighting", variant))
