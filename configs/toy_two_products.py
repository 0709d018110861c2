"""The toy experiment on the harder form `a*b+c*d` (factors 1..12; three steps: two products, then their sum),
collecting on 1,000 problems per iteration so the first turn ends below the ceiling.

    python -m rise_jax.run --config=configs/toy_two_products.py            (the recipe)
    python -m rise_jax.run --config=configs/toy_two_products.py:mix        (single-turn records mixed into RISE's)

Variants: rise_jax.pipeline.recipes.TWO_PRODUCTS_VARIANTS (recipe, mix, success, success_mix). Design and measured
results: docs/toy.md, "A toy with headroom".
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "recipe"):
  return finalize(recipes.toy_two_products(variant))
