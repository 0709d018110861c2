"""Shared builders for the trainer tests (a tiny toy-vocabulary model, the toy tokenizer, demo records)."""

import dataclasses
import types

from rise_jax.models.configs import get_preset

# One layer keeps XLA compile times (the bulk of these tests on a 2-core machine) small.
TINY = dataclasses.replace(get_preset("toy-llama").config, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8)


def optim_cfg(**overrides):
  base = dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, b1=0.9, b2=0.999, eps=1e-8)
  return types.SimpleNamespace(**{**base, **overrides})


def tiny_config(tokenizer_dir, out_dir, **train):
  """A locked config for train() on the toy tokenizer (the model itself is passed in or is toy-llama)."""
  from rise_jax.config import base_config, finalize
  c = base_config()
  c.output_dir = str(out_dir)
  c.model.preset = "toy-llama"
  c.tokenizer.path = str(tokenizer_dir)
  c.tokenizer.chat_template = "toy"
  c.train.epochs = 1
  c.train.lr = 1e-3
  c.train.global_batch = 8
  c.train.micro_batch = 4
  c.train.max_length = 128
  c.train.ckpt_every = 2
  c.train.log_every = 1
  for k, v in train.items():
    c.train[k] = v
  return finalize(c)
