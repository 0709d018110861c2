"""The embedded default experiment: RISE on the toy task, end to end on 2 CPU cores in minutes (target 420 s).

A 0.4M-parameter char-level Llama is trained from scratch on `a+b*c` worked answers (the boost, stopped by dev
validation), then three RISE iterations (distillation from the reference solutions, then two of self-distillation
collected without an oracle), each beside a single-turn SFT control on the same data; the boost, iteration 3 and
control 3 are evaluated on 2,000 test problems over 5 turns (with and without oracle) and with 5 parallel
samples. Design and measured results: docs/toy.md.

    python -m rise_jax.run --config=configs/toy.py
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.CPU_2_CORES


def get_config():
  return finalize(recipes.toy())
