"""The sampler against independent references: transformers `generate`, the full (training) forward, re-prefill.

Tiny random HF checkpoints (tests/fixtures_models.py) are loaded by both transformers (float32, the reference)
and rise_jax. One Sampler per model serves every test so compilations are shared.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import special

from rise_jax.models import load_hf_checkpoint
from rise_jax.sampling import Sampler, SamplingParams
from tests.fixtures_models import save_tiny_llama, save_tiny_mistral, torch_model

# Ragged prompts (ids < 256, the tiny vocabulary): lengths 3, 11, 6, 19.
PROMPTS = [[1, 17, 42], [1, 5, 9, 200, 31, 77, 64, 8, 13, 99, 150], [1, 250, 3, 7, 7, 7], list(range(1, 20))]
NO_STOP = dict(stop_token_ids=[])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("sampler_ckpt")
  return {"llama": save_tiny_llama(root / "llama", seed=1, num_key_value_heads=2),  # GQA: 4 heads, 2 kv heads
          "mistral": save_tiny_mistral(root / "mistral", seed=2)}                     # window 16 < generation


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
  # One precision for every call in this module: the setting is part of the jit cache key.
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def samplers(checkpoints):
  return {name: Sampler(load_hf_checkpoint(path), None, max_cache_length=512) for name, path in checkpoints.items()}


def hf_generate(path, prompts, max_new, eos=None):
  """transformers greedy generate on a left-padded batch; per row the new ids (cut after eos when given)."""
  torch = pytest.importorskip("torch")
  model = torch_model(path)
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  model.generation_config.eos_token_id = eos
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=0,
                         eos_token_id=eos)
  rows = out[:, width:].tolist()
  if eos is not None:
    rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
  return rows


@pytest.mark.parametrize("name", ["llama", "mistral"])  # mistral: 11..19 prompt tokens + 16 run past window 16
def test_greedy_equals_transformers_generate(samplers, checkpoints, name):
  outs = samplers[name].generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP))
  ours = [o[0].token_ids for o in outs]
  assert ours == hf_generate(checkpoints[name], PROMPTS, 16)
  assert all(o[0].finish_reason == "length" and len(o[0].token_ids) == 16 for o in outs)


def test_stop_token_ends_rows_at_different_steps_like_transformers(samplers, checkpoints):
  free = [o[0].token_ids for o in samplers["llama"].generate(
      PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP))]
  eos = free[1][5]  # a token row 1 produces at step 5: rows stop at different steps (or run to length)
  outs = samplers["llama"].generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0,
                                                            stop_token_ids=[eos]))
  ours = [o[0].token_ids for o in outs]
  assert ours == hf_generate(checkpoints["llama"], PROMPTS, 16, eos=eos)
  assert outs[1][0].finish_reason == "stop" and ours[1][-1] == eos and len(ours[1]) <= 6
  assert {o[0].finish_reason for o in outs} <= {"stop", "length"}
  assert len({len(r) for r in ours}) > 1


def test_logprobs_equal_the_training_forward(samplers):
  sampler = samplers["llama"]
  net = nnx.merge(sampler.graphdef, sampler._params)  # the same weights, full-sequence (training) forward
  outs = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, n=2, **NO_STOP), seed=3)
  samples = [(prompt, s) for prompt, row in zip(PROMPTS, outs) for s in row]
  width = max(len(p) + len(s.token_ids) for p, s in samples)
  ids = np.zeros((len(samples), width), np.int32)  # right-padded: causal, so padding cannot reach real tokens
  for b, (p, s) in enumerate(samples):
    ids[b, :len(p) + len(s.token_ids)] = p + s.token_ids
  logp = special.log_softmax(np.asarray(net(ids), np.float64), axis=-1)
  for b, (p, s) in enumerate(samples):
    expected = logp[b, np.arange(len(p) - 1, len(p) + len(s.token_ids) - 1), s.token_ids]
    np.testing.assert_allclose(s.logprobs, expected, atol=1e-4, rtol=0)


def _feedback(i):
  return [30 + i] * (2 + 3 * i)  # different lengths per row


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 3)])
def test_continuation_equals_reprefill_across_a_window_boundary(samplers, temperature, top_k):
  sampler = samplers["mistral"]  # window 16: turn 2 attends across the turn boundary through the window
  free = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP))
  stop = free[0][0].token_ids[4]
  params = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=top_k, n=2, stop_token_ids=[stop])
  turn1 = sampler.generate(PROMPTS, params, seed=5, prompt_ids=["a", "b", "c", "d"])
  chosen = [samples[i % 2] for i, samples in enumerate(turn1)]
  assert len({len(c.token_ids) for c in chosen}) > 1  # rows stopped at different steps
  next_ids = [p + c.token_ids + _feedback(i) for i, (p, c) in enumerate(zip(PROMPTS, chosen))]
  before = dict(sampler.stats)
  continued = sampler.generate(next_ids, params, seed=5, prompt_ids=["a", "b", "c", "d"],
                               history=[c.conversation for c in chosen])
  reused = sampler.stats["reused_tokens"] - before.get("reused_tokens", 0)
  fresh = sampler.generate(next_ids, params, seed=5, prompt_ids=["a", "b", "c", "d"])
  assert reused == sum(len(p) + len(c.token_ids) - 1 for p, c in zip(PROMPTS, chosen))
  assert sampler.stats["reprefill_rows"] == before.get("reprefill_rows", 0)
  for a_row, b_row in zip(continued, fresh):
    for a, b in zip(a_row, b_row):
      assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_continuation_reprefills_from_the_first_differing_token(samplers):
  sampler = samplers["llama"]
  params = SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP)
  turn1 = sampler.generate(PROMPTS, params)
  held = [p + o[0].token_ids for p, o in zip(PROMPTS, turn1)]
  edited = [h + [40, 41] for h in held]
  edited[0][2] = 123  # row 0 no longer extends what the cache holds: it re-prefills from token 2
  before = sampler.stats["reprefill_rows"]
  continued = sampler.generate(edited, params, history=[o[0].conversation for o in turn1])
  assert sampler.stats["reprefill_rows"] == before + 1
  fresh = sampler.generate(edited, params)
  assert [o[0].token_ids for o in continued] == [o[0].token_ids for o in fresh]


def test_outputs_ignore_batch_order_and_chunking(samplers):
  sampler = samplers["llama"]
  params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=2, **NO_STOP)
  ids = [10, 11, 12, 13]
  whole = sampler.generate(PROMPTS, params, seed=7, prompt_ids=ids)
  order = [2, 0, 3, 1]
  permuted = sampler.generate([PROMPTS[i] for i in order], params, seed=7, prompt_ids=[ids[i] for i in order])
  chunks = (sampler.generate(PROMPTS[:2], params, seed=7, prompt_ids=ids[:2])
            + sampler.generate(PROMPTS[2:], params, seed=7, prompt_ids=ids[2:]))
  got = lambda outs: [[s.token_ids for s in row] for row in outs]
  assert got(whole) == got([permuted[order.index(i)] for i in range(4)]) == got(chunks)
  other_seed = sampler.generate(PROMPTS, params, seed=8, prompt_ids=ids)
  assert got(other_seed) != got(whole)
  assert all(row[0].token_ids != row[1].token_ids for row in whole)  # samples j differ


def test_compiles_stay_bounded_while_values_and_weights_vary(samplers, checkpoints, tmp_path):
  sampler = samplers["llama"]
  shapes = [SamplingParams(max_new_tokens=10, n=n, temperature=1.0, **NO_STOP) for n in (1, 2)]
  for p in shapes:
    sampler.generate(PROMPTS, p)
  counts = sampler.compile_counts()
  rng = np.random.default_rng(0)
  for call in range(6):
    p = SamplingParams(max_new_tokens=int(rng.integers(5, 16)), n=int(rng.integers(1, 3)),
                       temperature=float(rng.choice([0.0, 0.7, 1.3])), top_p=float(rng.uniform(0.5, 1.0)),
                       top_k=int(rng.integers(0, 50)), **NO_STOP)
    sampler.generate(PROMPTS, p, seed=call)
  assert sampler.compile_counts() == counts
  # New weights (another checkpoint): outputs follow them, through the same compiled loop.
  other = save_tiny_llama(tmp_path / "other", seed=11, num_key_value_heads=2)
  greedy = SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP)
  before = [o[0].token_ids for o in sampler.generate(PROMPTS, greedy)]
  sampler.update_params(load_hf_checkpoint(other))
  try:
    after = [o[0].token_ids for o in sampler.generate(PROMPTS, greedy)]
    assert after == hf_generate(other, PROMPTS, 16) and after != before
    assert sampler.compile_counts() == counts
  finally:
    sampler.update_params(load_hf_checkpoint(checkpoints["llama"]))


def test_overflow_raises_or_reports_cache_full(samplers, checkpoints):
  params = SamplingParams(max_new_tokens=500, temperature=0.0, **NO_STOP)
  with pytest.raises(ValueError, match="exceeds the capacity 512"):  # checked before anything runs
    samplers["llama"].generate(PROMPTS, params)
  sampler = Sampler(load_hf_checkpoint(checkpoints["llama"]), None, max_cache_length=24, on_overflow="report")
  outs = sampler.generate(PROMPTS + [[1] * 25], SamplingParams(max_new_tokens=16, temperature=0.0, **NO_STOP))
  for prompt, row in zip(PROMPTS, outs):
    full = len(prompt) + 16 > 24
    assert row[0].finish_reason == ("cache_full" if full else "length")
    assert len(prompt) + len(row[0].token_ids) == (24 if full else len(prompt) + 16)
  assert outs[-1][0].finish_reason == "cache_full" and outs[-1][0].token_ids == []


def test_sharded_sampler_equals_unsharded(samplers, checkpoints):
  from rise_jax import sharding
  mesh = sharding.make_mesh((4, 1, 2))  # rows over data, heads over tensor, 8 fake CPU devices
  sharded = Sampler(load_hf_checkpoint(checkpoints["llama"], mesh=mesh), None, max_cache_length=512, mesh=mesh)
  params = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, **NO_STOP)
  want = samplers["llama"].generate(PROMPTS[:3], params, seed=4)
  got = sharded.generate(PROMPTS[:3], params, seed=4)  # 6 rows padded to 8: a multiple of the 4 row shards
  assert [[s.token_ids for s in r] for r in got] == [[s.token_ids for s in r] for r in want]
  leaf = jax.tree.leaves(sharded._params)[0]
  assert len(leaf.sharding.device_set) == 8
