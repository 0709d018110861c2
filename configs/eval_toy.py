"""Evaluate a model on the toy task (char-level; minutes on a CPU):

    python -m rise_jax.evaluate --config=configs/eval_toy.py
    python -m rise_jax.evaluate --config=configs/eval_toy.py --config.model.source=hf \
        --config.model.hf_path=runs/toy/iter_1/train/hf

With the default random `toy-llama` preset the accuracies are near chance (1/180); the run measures the pipeline
and its throughput. The toy tokenizer is built into `<output_dir>/tokenizer` when `tokenizer.path` is unset.
"""

from rise_jax.config import base_config, finalize


def get_config():
  c = base_config()
  c.name = "eval_toy"
  c.output_dir = "runs/eval_toy"
  c.model.source = "preset"
  c.model.preset = "toy-llama"
  c.tokenizer.chat_template = "toy"
  c.task.name = "toy"
  c.task.prompt_set = "toy"
  c.task.grader = "robust"
  c.task.test_size = 64
  c.sampling.temperature = 1.0
  c.sampling.max_new_tokens = 24      # a worked toy answer ("3*4=12,25+12=37") is ~16 characters
  c.sampling.max_cache_length = 512
  c.sampling.batch_size = 64
  c.eval.turns = 5
  c.eval.parallel_k = 5
  c.eval.window = None
  return finalize(c)
