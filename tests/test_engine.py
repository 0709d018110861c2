"""The rollout engine (continuous batching over a paged KV pool) against the sampler, its independent reference.

The sampler is held to transformers `generate` token for token (tests/test_sampler.py); here the engine is held to
the sampler: the same tokens for the same (seed, uid, sample) keys, log-probs within 1e-5, whatever the slot
count, the queue order, the slot a request lands in or whether its prompt blocks are shared.
"""

import dataclasses

import jax
import numpy as np
import pytest

from rise_jax.models import load_hf_checkpoint
from rise_jax.sampling import Sampler, SamplingParams
from rise_jax.sampling.engine import CHUNK_ROW_BUCKETS, Engine, Request
# The sampler's tiny GQA Llama and windowed Mistral checkpoints, precision and samplers (module-scoped fixtures).
from tests.test_sampler import PROMPTS, checkpoints, hf_generate, highest_precision, samplers  # noqa: F401

ENGINE = dict(slots=4, block_size=4, chunk_steps=3, max_seq_len=512)  # small blocks: prompts span several


@pytest.fixture(scope="module")
def models(checkpoints):
  return {name: load_hf_checkpoint(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def engines(models):
  return {name: Engine(model, **ENGINE) for name, model in models.items()}


def requests_for(prompts, params: SamplingParams, uids) -> list[Request]:
  """The engine requests matching one `Sampler.generate(prompts, params, prompt_ids=uids)` call."""
  return [Request(p, uid=u, n=params.n, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                  top_k=params.top_k, top_p=params.top_p, stop_ids=tuple(params.stop_token_ids or ()))
          for p, u in zip(prompts, uids)]


def assert_same(engine_outs, sampler_outs, atol=1e-5):
  for got_row, want_row in zip(engine_outs, sampler_outs, strict=True):
    for got, want in zip(got_row, want_row, strict=True):
      assert got.token_ids == want.token_ids
      assert got.finish_reason == want.finish_reason
      np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol, rtol=0)
      if want.sampling_logprobs is not None:
        np.testing.assert_allclose(got.sampling_logprobs, want.sampling_logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_equals_the_sampler_and_transformers(engines, samplers, checkpoints, name):
  params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[])
  outs = engines[name].run(requests_for(PROMPTS, params, range(4)))
  assert [o[0].token_ids for o in outs] == hf_generate(checkpoints[name], PROMPTS, 16)
  assert_same(outs, samplers[name].generate(PROMPTS, params, prompt_ids=list(range(4))))


@pytest.mark.parametrize("name,top_k,top_p", [("llama", 0, 1.0), ("mistral", 3, 1.0), ("llama", 0, 0.8)])
def test_sampled_equals_the_sampler_with_stops_and_shared_prompts(engines, samplers, name, top_k, top_p):
  """T=1, n=3 samples sharing each prompt's blocks, a stop id that ends rows at different steps."""
  uids = ["a", "b", "c", "d"]
  no_stop = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=top_k, top_p=top_p, n=3, stop_token_ids=[])
  free = samplers[name].generate(PROMPTS, no_stop, seed=5, prompt_ids=uids)
  stop = free[1][0].token_ids[3]  # keys are per position: with it as a stop id, sample (1, 0) stops at token 4
  params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=top_k, top_p=top_p, n=3, stop_token_ids=[stop],
                          sampling_logprobs=True)
  want = samplers[name].generate(PROMPTS, params, seed=5, prompt_ids=uids)
  got = engines[name].run(requests_for(PROMPTS, params, uids), seed=5)
  assert_same(got, want)
  lengths = {len(s.token_ids) for row in got for s in row}
  assert len(lengths) > 1 and {s.finish_reason for row in got for s in row} == {"stop", "length"}
  assert sum(row[0].token_ids != row[1].token_ids for row in got) >= 3  # samples j draw different streams


def test_slots_are_refilled_under_mixed_lengths(engines, samplers):
  """12 requests with max_new 1..20 through 4 slots: every slot refilled as rows finish, each request's tokens
  the first max_new of the sampler's greedy continuation."""
  engine = engines["llama"]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 256, int(rng.integers(2, 23))).tolist() for _ in range(12)]
  max_new = [1, 20, 3, 9, 2, 17, 5, 12, 7, 1, 14, 4]
  reference = samplers["llama"].generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0,
                                                                 stop_token_ids=[]))
  before = dict(engine.stats)
  outs = engine.run([Request(p, uid=i, max_new_tokens=m, temperature=0.0) for i, (p, m) in
                     enumerate(zip(prompts, max_new))])
  delta = {k: engine.stats[k] - before.get(k, 0) for k in ("admitted", "decode_tokens", "slot_steps")}
  for out, ref, m in zip(outs, reference, max_new):
    assert out[0].token_ids == ref[0].token_ids[:m] and out[0].finish_reason == "length"
    np.testing.assert_allclose(out[0].logprobs, ref[0].logprobs[:m], atol=1e-5, rtol=0)
  assert delta["admitted"] == sum(m > 1 for m in max_new)  # max_new 1 ends at the prefill, without a slot
  assert delta["decode_tokens"] == sum(max_new) - len(max_new)
  # Static batches of 4 decode each batch's longest row (192 slot-steps); refilled slots need far fewer (the
  # 20-token row alone is a tail of 4 slot-steps per token).
  static = sum(4 * (max(max_new[i:i + 4]) - 1) for i in range(0, 12, 4))
  assert delta["slot_steps"] <= 0.7 * static and delta["decode_tokens"] / delta["slot_steps"] > 0.65
  assert engine.blocks_in_use == 0  # every block returned


def test_prompt_blocks_are_shared_once_and_equal_copies(models, samplers):
  """Best-of-8 on a 37-token prompt (9 full blocks of 4 + 1 partial): the prompt's blocks are held once, each
  sample holds its own tokens plus the copied partial block, and the samples equal the sampler's (which copies
  the whole prompt cache per sample)."""
  engine = Engine(models["llama"], **dict(ENGINE, slots=8))
  prompt = list(range(3, 40))
  params = SamplingParams(max_new_tokens=12, temperature=1.0, n=8, stop_token_ids=[])
  got = engine.run(requests_for([prompt, prompt[:36]], params, ["p", "q"]), seed=1)
  want = samplers["llama"].generate([prompt, prompt[:36]], params, seed=1, prompt_ids=["p", "q"])
  assert_same(got, want)
  own = -(-(37 + 12 - 1) // 4) - 37 // 4  # blocks of one sample's own tokens, partial prompt block included
  assert engine.stats["peak_blocks"] == 10 + 8 * own  # the first request alone fills the 8 slots
  assert engine.stats["cow_copies"] == 8  # the 36-token prompt ends on a block boundary: nothing to copy
  assert engine.stats["peak_blocks"] < 8 * 10


def test_output_ignores_slot_count_and_queue_order(models, engines):
  params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=2, stop_token_ids=[])
  requests = requests_for(PROMPTS, params, [10, 11, 12, 13])
  whole = engines["llama"].run(requests, seed=7)
  order = [2, 0, 3, 1]
  permuted = engines["llama"].run([requests[i] for i in order], seed=7)
  three_slots = Engine(models["llama"], **dict(ENGINE, slots=3, chunk_steps=2)).run(requests, seed=7)
  for other in ([permuted[order.index(i)] for i in range(4)], three_slots):
    assert_same(other, whole)
  assert [[s.token_ids for s in r] for r in engines["llama"].run(requests, seed=8)] != \
      [[s.token_ids for s in r] for r in whole]


def test_ten_thousand_requests_through_64_slots(models, samplers):
  engine = Engine(models["llama"], slots=64, block_size=8, chunk_steps=4, max_seq_len=64)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 256, int(rng.integers(1, 13))).tolist() for _ in range(10_000)]
  max_new = rng.integers(1, 5, 10_000)
  outs = engine.run([Request(p, uid=i, max_new_tokens=int(m), temperature=0.0) for i, (p, m) in
                     enumerate(zip(prompts, max_new))])
  assert [len(o[0].token_ids) for o in outs] == max_new.tolist()
  assert engine.stats["admitted"] == int((max_new > 1).sum()) and engine.blocks_in_use == 0
  assert engine.stats["decode_tokens"] / engine.stats["slot_steps"] > 0.5
  check = rng.choice(10_000, 48, replace=False)
  reference = samplers["llama"].generate([prompts[i] for i in check], SamplingParams(
      max_new_tokens=4, temperature=0.0, stop_token_ids=[]))
  assert [outs[i][0].token_ids for i in check] == [r[0].token_ids[:max_new[i]] for i, r in zip(check, reference)]
  # Chunks: one span bucket (max_seq_len 64 is the smallest) x <= 4 row buckets (64, 32, 16, 8: the drain packs
  # the last rows); prefill: row buckets 1, 4, 16, 64 x 2 widths (8, 16), where powers of two met up to 14.
  assert engine.compile_counts()["chunk"] <= CHUNK_ROW_BUCKETS and engine.compile_counts()["prefill"] <= 4 * 2
  assert engine.stats["chunk_rows_below_slots"] > 0


def test_overflow_raises_or_reports_cache_full(models, checkpoints):
  engine = Engine(models["llama"], **dict(ENGINE, max_seq_len=24))
  with pytest.raises(ValueError, match="exceeds the capacity 24"):
    engine.run([Request(PROMPTS[3], uid=0, max_new_tokens=6)])
  with pytest.raises(ValueError, match="raise num_blocks"):
    Engine(models["llama"], **dict(ENGINE, num_blocks=8)).run([Request(PROMPTS[3], uid=0, max_new_tokens=16)])
  report = Engine(models["llama"], **dict(ENGINE, max_seq_len=24, on_overflow="report"))
  sampler = Sampler(models["llama"], None, max_cache_length=24, on_overflow="report")
  params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[])
  prompts = PROMPTS + [[1] * 24]
  got = report.run(requests_for(prompts, params, range(5)))
  assert_same(got, sampler.generate(prompts, params, prompt_ids=list(range(5))))
  assert [o[0].finish_reason for o in got] == ["length", "cache_full", "length", "cache_full", "cache_full"]
  assert got[-1][0].token_ids == []


def test_a_pool_smaller_than_the_slots_need_waits_instead_of_dropping(models, samplers):
  """13 blocks for 4 slots: requests wait for blocks between chunks; every one still completes, unchanged."""
  engine = Engine(models["llama"], **dict(ENGINE, num_blocks=13))
  params = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, stop_token_ids=[])
  got = engine.run(requests_for(PROMPTS, params, range(4)), seed=2)
  assert_same(got, samplers["llama"].generate(PROMPTS, params, seed=2, prompt_ids=list(range(4))))
  assert engine.stats["peak_blocks"] <= 12


def test_sharded_engine_equals_unsharded(engines, checkpoints):
  """Rows over 4 data shards, kv heads over 2 tensor shards (8 fake CPU devices): the same tokens, log-probs
  within 1e-5, through a row bucket of 4 and a drained one of 2 (not divisible by the 4 data shards)."""
  from rise_jax import sharding
  mesh = sharding.make_mesh((4, 1, 2))
  sharded = Engine(load_hf_checkpoint(checkpoints["llama"], mesh=mesh), **ENGINE, mesh=mesh)
  params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, stop_token_ids=[])
  requests = requests_for(PROMPTS[:3], params, ["x", "y", "z"])
  requests[1] = dataclasses.replace(requests[1], max_new_tokens=14)  # its 2 samples drain alone
  want = engines["llama"].run(requests, seed=3)
  got = sharded.run(requests, seed=3)
  assert_same(got, want)
  assert len(sharded._pool.k[0].sharding.device_set) == 8 and not sharded._pool.k[0].sharding.is_fully_replicated
  assert len(jax.tree.leaves(sharded._params)[0].sharding.device_set) == 8
  assert sharded.stats["chunk_rows_below_slots"] > 0
  assert_same(sharded.run(requests, seed=3), want)  # the prompts' blocks now come from the prefix cache
  assert sharded.stats["cached_tokens"] > 0
  engines["llama"].run(requests, seed=3)
  compiled = [e.compile_counts() for e in (sharded, engines["llama"])]
  assert_same(sharded.run(requests, seed=3), want)
  engines["llama"].run(requests, seed=3)
  assert [e.compile_counts() for e in (sharded, engines["llama"])] == compiled  # a third run compiles nothing


def test_continuation_from_the_prefix_cache_equals_re_prefill(models, samplers):
  """Turn 2 = turn 1's prompt + a sampled reply + feedback: the engine reads the prompt and the reply (written by
  its own decode steps) from the cache and prefills only the rest; tokens equal the sampler's full re-prefill of
  turn 2 and log-probs agree within 1e-5. A windowed turn 3 (the first prompt + feedback again) reuses the
  prompt's blocks only."""
  engine = Engine(models["llama"], **dict(ENGINE, slots=8))
  params = SamplingParams(max_new_tokens=11, temperature=1.0, n=2, stop_token_ids=[])
  first = engine.run(requests_for(PROMPTS, params, range(4)), seed=5)
  feedback = [7, 8, 9, 10, 11]
  second = [p + o[1].token_ids + feedback for p, o in zip(PROMPTS, first)]
  third = [p + feedback for p in PROMPTS]
  got = engine.run(requests_for(second + third, params, range(10, 18)), seed=5)
  assert_same(got, samplers["llama"].generate(second + third, params, seed=5, prompt_ids=list(range(10, 18))))
  bs = ENGINE["block_size"]
  # Sample 1's pool holds its prompt and all of its reply but the last token: those full blocks are cached.
  want_cached = [min((len(p) + len(o[1].token_ids) - 1) // bs, (len(q) - 1) // bs) * bs
                 for p, o, q in zip(PROMPTS, first, second)]
  want_cached += [min(len(p) // bs, (len(q) - 1) // bs) * bs for p, q in zip(PROMPTS, third)]
  assert [o[0].cached_tokens for o in got] == want_cached and sum(want_cached[:4]) > sum(map(len, PROMPTS))
  assert engine.blocks_in_use == 0


def test_the_prefix_cache_evicts_instead_of_refusing(models, samplers):
  """A pool of 24 blocks cannot keep every finished conversation: cached blocks nobody holds are taken back
  (least recently released first) and every request still runs, unchanged."""
  engine = Engine(models["llama"], **dict(ENGINE, num_blocks=24))
  params = SamplingParams(max_new_tokens=9, temperature=1.0, n=2, stop_token_ids=[])
  for seed in range(3):
    got = engine.run(requests_for(PROMPTS, params, range(4)), seed=seed)
    assert_same(got, samplers["llama"].generate(PROMPTS, params, seed=seed, prompt_ids=list(range(4))))
  assert engine._blocks.stats["evicted"] > 0 and engine.stats["cached_tokens"] > 0
  assert engine.blocks_in_use == 0 and engine.blocks_cached <= 23


def test_block_table_evicts_a_released_tail_before_its_prefix():
  """Three cached blocks of one sequence, released tail first: once the never-used blocks are gone, eviction
  takes the tail, so the shared prefix stays findable; a digest chain differing in one token finds nothing."""
  from rise_jax.sampling.blocks import BlockTable, chain_digests
  table = BlockTable(6)  # blocks 1-5 (block 0 is the trash block)
  held = table.allocate(3)
  digests = chain_digests(list(range(13)), 4)  # 3 full blocks; the 13th token is a partial block
  for block, digest in zip(held, digests):
    table.register(block, digest)
  table.release(held[::-1])
  assert table.in_use == 0 and table.available == 5 and table.cached == 3
  table.allocate(3)  # the 2 never-used blocks, then the least recently released: the tail
  assert table.lookup(digests) == held[:2] and table.stats["evicted"] == 1
  assert table.lookup(chain_digests([0, 1, 2, 99] + list(range(4, 12)), 4)) == []


def test_new_weights_empty_the_prefix_cache(models):
  """After `update_params` the engine answers as a fresh engine on the new weights: nothing the old weights
  computed is read from the cache, and no program compiles again."""
  from flax import nnx
  engine = Engine(models["llama"], **ENGINE)
  params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, stop_token_ids=[])
  requests = requests_for(PROMPTS, params, range(4))
  engine.run(requests, seed=4)
  engine.run(requests, seed=4)  # the cached-prefix prefill programs compile here
  compiled = engine.compile_counts()
  graphdef, state = nnx.split(models["llama"])
  scaled = jax.tree.map(lambda x: x * 1.25, state)
  engine.update_params(scaled)
  got = engine.run(requests, seed=4)
  assert_same(got, Engine(nnx.merge(graphdef, scaled), **ENGINE).run(requests, seed=4))
  assert {s.cached_tokens for o in got for s in o} == {0} and engine.compile_counts() == compiled


def test_a_stream_takes_requests_while_it_runs_and_draws_what_run_draws(models, samplers):
  """RISE's pattern through `Engine.stream`: a conversation's next turn (prompt + reply + feedback) is submitted
  the moment its turn comes back, while other requests decode and the rest of the first turn is still arriving.
  Every sample equals the sampler's for its (seed, uid) (the next turn re-prefilled whole), the next turns read
  their history from the prefix cache, and a stream left busy is abandoned by the next one without leaking a
  block or changing what the engine draws."""
  engine = Engine(models["llama"], **ENGINE)
  params = SamplingParams(max_new_tokens=9, temperature=1.0, n=2, stop_token_ids=[])
  feedback = [7, 8, 9, 10, 11]
  request = lambda prompt, uid: requests_for([prompt], params, [uid])[0]
  stream = engine.stream(seed=5)
  for i in (0, 1):
    stream.submit(request(PROMPTS[i], i), tag=("turn1", i))
  got, second, late, steps = {}, {}, [2, 3], 0
  while stream.busy:
    steps += 1
    for tag, samples in stream.step():
      got[tag] = samples
      if tag[0] == "turn1":
        second[tag[1]] = PROMPTS[tag[1]] + samples[1].token_ids + feedback
        stream.submit(request(second[tag[1]], 10 + tag[1]), tag=("turn2", tag[1]))
    if late and steps >= 2:  # the rest of the first turn arrives while the stream runs
      stream.submit(request(PROMPTS[late[0]], late[0]), tag=("turn1", late.pop(0)))
  assert sorted(got) == [(kind, i) for kind in ("turn1", "turn2") for i in range(4)]
  assert_same([got["turn1", i] for i in range(4)],
              samplers["llama"].generate(PROMPTS, params, seed=5, prompt_ids=list(range(4))))
  assert_same([got["turn2", i] for i in range(4)],
              samplers["llama"].generate([second[i] for i in range(4)], params, seed=5,
                                         prompt_ids=[10 + i for i in range(4)]))
  assert all(got["turn2", i][0].cached_tokens >= len(PROMPTS[i]) // ENGINE["block_size"] * ENGINE["block_size"]
             for i in range(4))
  assert engine.blocks_in_use == 0

  abandoned = engine.stream(seed=5)
  abandoned.submit(request(PROMPTS[0], 0), tag=0)
  abandoned.step()  # its samples now hold slots and blocks
  assert abandoned.busy and engine.blocks_in_use > 0
  again = engine.run(requests_for(PROMPTS, params, range(4)), seed=5)
  assert_same(again, [got["turn1", i] for i in range(4)])
  assert engine.blocks_in_use == 0 and not abandoned.busy
  with pytest.raises(RuntimeError, match="closed"):
    abandoned.step()
