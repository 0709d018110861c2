"""Train the char-level toy model on a small weighted dataset (written on first use): the training demo.

    python -m rise_jax.train --config=configs/train_tiny.py
"""

from rise_jax.config import base_config, finalize


def get_config():
  c = base_config()
  c.name = "train_tiny"
  c.output_dir = "runs/train_tiny"
  c.model.preset = "toy-llama"
  c.tokenizer.path = "runs/train_tiny/toy_tokenizer"
  c.tokenizer.chat_template = "toy"
  c.train.data_path = "runs/train_tiny/data/sft.jsonl"
  c.train.demo_data = True
  c.train.epochs = 2
  c.train.lr = 1e-3                      # a random toy model learns visibly in a few dozen steps
  c.train.global_batch = 16
  c.train.micro_batch = 8
  c.train.max_length = 256
  c.train.ckpt_every = 4
  c.train.log_every = 2
  return finalize(c)
