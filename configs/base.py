"""The base config tree (docs/contracts.md §1). Every experiment file starts from `rise_jax.config.base_config()`.

    python -m rise_jax.run --config=configs/base.py --config.task.name=toy
"""

from rise_jax.config import base_config, finalize


def get_config():
  return finalize(base_config())
