"""Evaluate a local HF checkpoint on GSM8K test (the paper's 5-turn protocol, Table 1 metrics):

    python -m rise_jax.evaluate --config=configs/eval_gsm8k.py \
        --config.model.hf_path=/path/to/Llama-2-7b-chat-hf \
        --config.task.test_source=../shared/data/gsm8k/test.jsonl

`model.hf_path` is a checkpoint directory or a `.gguf` file (converted once into `$RISE_JAX_CACHE`); the chat
template is the checkpoint's own (`tokenizer.chat_template = "auto"`). `task.test_source` may be a local jsonl (`question`, `answer`) or the hub's "openai/gsm8k:main". The paper's
sampling is temperature 1.0, top-p 1.0, up to 1000 new tokens; its graders are the `paper` mode.
"""

from rise_jax.config import base_config, finalize


def get_config():
  c = base_config()  # already the paper's protocol: prompt set and grader "paper", temperature 1.0,
  # top-p 1.0, 1000 new tokens, 5 turns, 5 parallel samples
  c.name = "eval_gsm8k"
  c.output_dir = "runs/eval_gsm8k"
  c.model.source = "hf"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.task.name = "gsm8k"
  c.task.test_source = "openai/gsm8k:main"
  c.sampling.max_cache_length = 8192
  return finalize(c)
