"""Sharded reward-weighted likelihood training.

`loss` (the estimators), `data` (sft/1 records -> planned global batches), `optim` (the AdamW recipe and its
schedule, analytic FLOPs), `checkpoint` (orbax), `trainer` (state, step, loop and the `train` library call);
`python -m rise_jax.train --config=configs/train_tiny.py` is the command.
"""


def train(*args, **kwargs):
  """`rise_jax.train.trainer.train` (imported lazily so `import rise_jax.train` stays light)."""
  from rise_jax.train.trainer import train as _train
  return _train(*args, **kwargs)


def __getattr__(name):
  # `rise_jax.train.Validation` without importing jax at package import.
  if name == "Validation":
    from rise_jax.train.trainer import Validation
    return Validation
  raise AttributeError(name)
