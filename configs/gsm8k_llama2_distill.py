"""GSM8K, Llama-2-7b-chat, distillation from GPT-3.5: boost, then RISE iterations 1 and 2 (paper Table 1 rows
"Llama2-7B + boost + RISE iteration 1 / 2").

Checkpoint meta-llama/Llama-2-7b-chat-hf (set --config.model.hf_path to a local copy), chat template `llama2`.
Sized for a TPU v4-32 slice (16 chips x 32 GiB): training mesh (data, fsdp, tensor) = (1, 16, 1), micro-batch 16
(one 2048-token row per chip), global batch 64 by 4 accumulation steps; sampling mesh (4, 1, 4), 32 episodes in
flight, a KV pool of 8,192 blocks (16 GiB a chip). The teacher is an OpenAI-compatible endpoint (OPENAI_API_KEY in the environment).

    python -m rise_jax.run --config=configs/gsm8k_llama2_distill.py
"""

from rise_jax.config import finalize
from rise_jax.pipeline import capacity, recipes

HARDWARE = capacity.TPU_V4_32


def get_config():
  c = recipes.paper(name="gsm8k_llama2_distill", preset="llama-2-7b-chat", task="gsm8k", improvement="teacher",
                    iterations=2, boost=True)
  c = recipes.tpu_v4_32(c)
  # 32 kv heads: a pool for all 64 slots at 4,096 tokens (32 GiB a chip) does not fit; this one runs 64 samples of
  # 2,048 tokens at once, and a fuller queue waits for blocks.
  c.sampling.num_blocks = 8192
  return finalize(c)
