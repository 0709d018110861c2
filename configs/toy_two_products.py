"""The toy experiment on the harder form `a*b+c*d` (three steps: two products, then their sum), with room below
the ceiling for a retry to gain on.

    python -m rise_jax.run --config=configs/toy_two_products.py            (the recipe)
    python -m rise_jax.run --config=configs/toy_two_products.py:mix        (single-turn records mixed into RISE's)

Variants: rise_jax.pipeline.recipes.TWO_PRODUCTS_VARIANTS. Design and measured results: docs/toy.md, "A toy with
headroom".
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config(variant: str = "recipe"):
  return finalize(recipes.toy_two_products(variant))
