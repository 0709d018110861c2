"""Evaluate a local HF checkpoint on MATH (the paper's 5-turn protocol, Table 1 metrics):

    python -m rise_jax.evaluate --config=configs/eval_math.py \
        --config.model.hf_path=/path/to/Mistral-7B-Instruct-v0.2 \
        --config.task.test_source=../shared/data/math/test.jsonl

`model.hf_path` is a checkpoint directory or a `.gguf` file; the chat template is the checkpoint's own
(`tokenizer.chat_template = "auto"`). The paper's MATH numbers are on a 1,000-problem test subset (../shared/data/math/test.jsonl, fields `problem`,
`level`, `type`, `solution`); without `task.test_source` the hub's full 5,000-problem test split is used.
"""

from rise_jax.config import base_config, finalize


def get_config():
  c = base_config()  # already the paper's protocol: prompt set and grader "paper", temperature 1.0,
  # top-p 1.0, 1000 new tokens, 5 turns, 5 parallel samples
  c.name = "eval_math"
  c.output_dir = "runs/eval_math"
  c.model.source = "hf"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.task.name = "math"
  c.sampling.max_cache_length = 8192
  return finalize(c)
