"""plan(): memory arithmetic against hand-computed numbers for Llama-2-7B (independent of the code's formula)."""

import pytest

from rise_jax import sharding
from rise_jax.models import get_preset
from rise_jax.sampling import kv_bytes_per_token, memory_at, param_count, plan

LLAMA2_7B = get_preset("llama-2-7b-chat").config
GiB = 2**30


def test_llama2_7b_parameter_count_and_cache_bytes():
  assert param_count(LLAMA2_7B) == 6_738_415_616  # the published size of Llama-2-7b-hf
  assert kv_bytes_per_token(LLAMA2_7B, "bfloat16") == 512 * 1024  # 2 x 32 layers x 32 heads x 128 x 2 bytes
  # Best-of-16 on a 2k-token history: 16 GiB of cache per prompt (plus the shared prompt row while forking).
  m = memory_at(LLAMA2_7B, None, 1, 2048, 16)
  assert m.kv_cache == 17 * 2048 * 512 * 1024


def test_plan_picks_the_largest_fitting_batch():
  weights = (6_738_415_616 + 32 * 202_383_360) * 2  # + the decode loop's per-layer copy of the 32 layers
  per_prompt = 2048 * 512 * 1024 + 32000 * 4 * 3  # n = 1: one row of 2048 tokens + logits
  hbm = 80 * GiB
  want = int((hbm * 0.9 - weights) // per_prompt)
  assert plan(LLAMA2_7B, None, hbm, history_tokens=2048, n=1) == want
  with pytest.raises(ValueError, match="need"):
    plan(LLAMA2_7B, None, 16 * GiB, history_tokens=2048, n=16)


def test_plan_with_a_mesh_counts_per_device_and_rounds_to_row_shards():
  mesh = sharding.make_mesh((4, 1, 2))  # 4 row shards, weights and kv heads split over tensor = 2
  batch = plan(LLAMA2_7B, mesh, 40 * GiB, history_tokens=4096, n=4)
  assert batch % 4 == 0
  fits = lambda b: memory_at(LLAMA2_7B, mesh, b, 4096, 4).total <= 40 * GiB * 0.9
  assert fits(batch) and not fits(batch + 4)
  m = memory_at(LLAMA2_7B, mesh, batch, 4096, 4)
  assert m.weights == (6_738_415_616 + 32 * 202_383_360) * 2 // 2 and m.kv_cache == batch * 5 // 4 * 4096 * 512 * 1024 // 2
