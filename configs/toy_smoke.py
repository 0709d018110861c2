"""configs/toy.py shrunk to a few problems and steps: runs every stage of the loop in well under a minute.

    python -m rise_jax.run --config=configs/toy_smoke.py
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config():
  return finalize(recipes.toy_smoke())
