"""The continuous-batching engine against independent references.

Greedy decoding equals transformers `generate` on tiny random checkpoints (a GQA Llama and a windowed Mistral,
loaded by transformers in float32); log-probabilities equal the training forward's log-softmax (float64); and
every sample equals tests/reference_generator.py, which re-runs the whole sequence through the full forward at
every step (no cache): the same tokens for the same (seed, uid, sample) keys, log-probs within 1e-5, whatever
the slot count, the queue order, the slot a request lands in, whether its prompt blocks are shared or come from
the prefix cache, the pool size, or how rows and heads are sharded.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import special

from rise_jax.models import load_hf_checkpoint
from rise_jax.sampling.engine import CHUNK_ROW_BUCKETS, Engine
from rise_jax.sampling.requests import Request
from tests.fixtures_models import save_tiny_llama, save_tiny_mistral, torch_model
from tests.reference_generator import generate

# Ragged prompts (ids < 256, the tiny vocabulary): lengths 3, 11, 6, 19.
PROMPTS = [[1, 17, 42], [1, 5, 9, 200, 31, 77, 64, 8, 13, 99, 150], [1, 250, 3, 7, 7, 7], list(range(1, 20))]
ENGINE = dict(slots=4, block_size=4, chunk_steps=3, max_seq_len=512)  # small blocks: prompts span several


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_gqa_path, tiny_mistral_path):
  # Llama: 4 heads over 2 kv heads; Mistral: window 16, shorter than prompt + generation.
  return {"llama": tiny_llama_gqa_path, "mistral": tiny_mistral_path}


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
  # One precision for every call in this module: the setting is part of the jit cache key.
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def models(checkpoints):
  return {name: load_hf_checkpoint(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def engines(models):
  return {name: Engine(model, **ENGINE) for name, model in models.items()}


def hf_generate(path, prompts, max_new, eos=None):
  """transformers greedy generate on a left-padded batch; per row the new ids (cut after eos when given)."""
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)
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


def requests(prompts, uids, **sampling) -> list[Request]:
  """One request per prompt, all with the same sampling fields (no stop ids unless given)."""
  return [Request(p, uid=u, **sampling) for p, u in zip(prompts, uids, strict=True)]


def assert_same(got_outs, want_outs, atol=1e-5):
  for got_row, want_row in zip(got_outs, want_outs, strict=True):
    for got, want in zip(got_row, want_row, strict=True):
      assert got.token_ids == want.token_ids
      assert got.finish_reason == want.finish_reason and got.prompt_tokens == want.prompt_tokens
      np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol, rtol=0)
      np.testing.assert_allclose(got.sampling_logprobs, want.sampling_logprobs, atol=atol, rtol=0)


def token_ids(outs):
  return [[s.token_ids for s in row] for row in outs]


@pytest.mark.parametrize("name", ["llama", "mistral"])  # mistral: 11..19 prompt tokens + 16 run past window 16
def test_greedy_equals_transformers_generate_and_the_reference(engines, models, checkpoints, name):
  reqs = requests(PROMPTS, range(4), max_new_tokens=16, temperature=0.0)
  outs = engines[name].run(reqs)
  assert [o[0].token_ids for o in outs] == hf_generate(checkpoints[name], PROMPTS, 16)
  assert all(o[0].finish_reason == "length" and len(o[0].token_ids) == 16 for o in outs)
  assert_same(outs, generate(models[name], reqs))


def test_a_stop_token_ends_rows_at_different_steps_like_transformers(engines, checkpoints):
  engine = engines["llama"]
  free = [o[0].token_ids for o in engine.run(requests(PROMPTS, range(4), max_new_tokens=16, temperature=0.0))]
  eos = free[1][5]  # a token row 1 produces at step 5: rows stop at different steps (or run to length)
  outs = engine.run(requests(PROMPTS, range(4), max_new_tokens=16, temperature=0.0, stop_ids=(eos,)))
  ours = [o[0].token_ids for o in outs]
  assert ours == hf_generate(checkpoints["llama"], PROMPTS, 16, eos=eos)
  assert outs[1][0].finish_reason == "stop" and ours[1][-1] == eos and len(ours[1]) <= 6
  assert {o[0].finish_reason for o in outs} <= {"stop", "length"}
  assert len({len(r) for r in ours}) > 1


@pytest.mark.parametrize("name,top_k,top_p", [("llama", 0, 1.0), ("mistral", 3, 1.0), ("llama", 0, 0.8)])
def test_sampled_equals_the_reference_with_stops_and_shared_prompts(engines, models, name, top_k, top_p):
  """T=1, n=3 samples sharing each prompt's blocks, a stop id that ends rows at different steps."""
  uids = ["a", "b", "c", "d"]
  sampling = dict(max_new_tokens=16, temperature=1.0, top_k=top_k, top_p=top_p, n=3)
  free = generate(models[name], requests(PROMPTS, uids, **sampling), seed=5)
  stop = free[1][0].token_ids[3]  # keys are per position: with it as a stop id, sample (1, 0) stops by token 4
  reqs = requests(PROMPTS, uids, **sampling, stop_ids=(stop,))
  got = engines[name].run(reqs, seed=5)
  assert_same(got, generate(models[name], reqs, seed=5))
  lengths = {len(s.token_ids) for row in got for s in row}
  assert len(lengths) > 1 and {s.finish_reason for row in got for s in row} == {"stop", "length"}
  assert sum(row[0].token_ids != row[1].token_ids for row in got) >= 3  # samples j draw different streams


@pytest.mark.parametrize("save", [save_tiny_llama, save_tiny_mistral])
def test_long_conversations_attend_through_quarter_octave_spans_in_pieces_like_the_reference(tmp_path, save):
  """Past FINE_SPAN_TOKENS a chunk's attention span is the next quarter octave above its longest slot (640, 768,
  1,024 tokens here), not the next power of two, and on CPU it is read in PIECE_TOKENS pieces (with a Mistral
  window most pieces see no key): every key up to each row's position, and only those, is still read."""
  path = save(tmp_path / "long", seed=3, num_key_value_heads=2, max_position_embeddings=2048)
  model = load_hf_checkpoint(path)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, 256, n).tolist() for n in (530, 600, 700, 890)]
  reqs = requests(prompts, range(4), max_new_tokens=40, temperature=1.0, n=2)
  engine = Engine(model, slots=2, block_size=16, chunk_steps=8, max_seq_len=1024)  # one prompt at a time
  assert_same(engine.run(reqs, seed=2), generate(model, reqs, seed=2))
  assert engine.compile_counts()["chunk"] >= 3  # spans 640, 768, 1,024 (powers of two: 1,024 x <= 2 row buckets)


def test_logprobs_equal_the_training_forward(engines, models):
  """`logprobs` are the full forward's float64 log-softmax at the sampled tokens; at T=1 without filters the
  distribution a token was drawn from is that one too, so `sampling_logprobs` equal them."""
  outs = engines["llama"].run(requests(PROMPTS, range(4), max_new_tokens=16, temperature=1.0, n=2), seed=3)
  samples = [(prompt, s) for prompt, row in zip(PROMPTS, outs) for s in row]
  width = max(len(p) + len(s.token_ids) for p, s in samples)
  ids = np.zeros((len(samples), width), np.int32)  # right-padded: causal, so padding cannot reach real tokens
  for b, (p, s) in enumerate(samples):
    ids[b, :len(p) + len(s.token_ids)] = p + s.token_ids
  logp = special.log_softmax(np.asarray(models["llama"](ids), np.float64), axis=-1)
  for b, (p, s) in enumerate(samples):
    expected = logp[b, np.arange(len(p) - 1, len(p) + len(s.token_ids) - 1), s.token_ids]
    np.testing.assert_allclose(s.logprobs, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(s.sampling_logprobs, expected, atol=1e-4, rtol=0)


def test_slots_are_refilled_under_mixed_lengths(engines, models):
  """12 requests with max_new 1..20 through 4 slots: every slot refilled as rows finish, each request equal to
  the reference."""
  engine = engines["llama"]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 256, int(rng.integers(2, 23))).tolist() for _ in range(12)]
  max_new = [1, 20, 3, 9, 2, 17, 5, 12, 7, 1, 14, 4]
  reqs = [Request(p, uid=i, max_new_tokens=m, temperature=0.0) for i, (p, m) in enumerate(zip(prompts, max_new))]
  before = dict(engine.stats)
  outs = engine.run(reqs)
  delta = {k: engine.stats[k] - before.get(k, 0) for k in ("admitted", "decode_tokens", "slot_steps")}
  assert_same(outs, generate(models["llama"], reqs))
  assert all(o[0].finish_reason == "length" for o in outs)
  assert delta["admitted"] == sum(m > 1 for m in max_new)  # max_new 1 ends at the prefill, without a slot
  assert delta["decode_tokens"] == sum(max_new) - len(max_new)
  # Static batches of 4 decode each batch's longest row (192 slot-steps); refilled slots need far fewer (the
  # 20-token row alone is a tail of 4 slot-steps per token).
  static = sum(4 * (max(max_new[i:i + 4]) - 1) for i in range(0, 12, 4))
  assert delta["slot_steps"] <= 0.7 * static and delta["decode_tokens"] / delta["slot_steps"] > 0.65
  assert engine.blocks_in_use == 0  # every block returned


def test_a_long_prompt_in_the_queue_does_not_split_the_short_ones_calls(models):
  """64 prompts of 5 tokens with a 100-token one 11th in the queue: the short ones share one call of width 8
  (block size 4; the long one, waiting, is passed over instead of padding them to 128 or ending their call), the
  long one gets its own, and every request equals the reference."""
  engine = Engine(models["llama"], slots=80, max_seq_len=128, block_size=4, prefill_tokens=512, prefix_cache=False)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 256, 5).tolist() for _ in range(64)]
  prompts.insert(10, rng.integers(3, 256, 100).tolist())
  reqs = [Request(p, uid=i, max_new_tokens=3, temperature=1.0) for i, p in enumerate(prompts)]
  outs = engine.run(reqs, seed=5)
  assert_same(outs, generate(models["llama"], reqs, seed=5, capacity=128))
  assert engine.stats["prefill_calls"] == 2
  assert engine.stats["prefill_padded_tokens"] == 64 * 8 + 4 * 128  # 64 rows of 8, 4 rows of 128


def test_prompt_blocks_are_shared_once_and_equal_copies(models):
  """Best-of-8 on a 37-token prompt (9 full blocks of 4 + 1 partial): the prompt's blocks are held once, each
  sample holds its own tokens plus the copied partial block, and the samples equal the reference's (which
  runs every sample's whole sequence on its own)."""
  engine = Engine(models["llama"], **dict(ENGINE, slots=8))
  prompt = list(range(3, 40))
  reqs = requests([prompt, prompt[:36]], ["p", "q"], max_new_tokens=12, temperature=1.0, n=8)
  assert_same(engine.run(reqs, seed=1), generate(models["llama"], reqs, seed=1))
  own = -(-(37 + 12 - 1) // 4) - 37 // 4  # blocks of one sample's own tokens, partial prompt block included
  assert engine.stats["peak_blocks"] == 10 + 8 * own  # the first request alone fills the 8 slots
  assert engine.stats["cow_copies"] == 8  # the 36-token prompt ends on a block boundary: nothing to copy
  assert engine.stats["peak_blocks"] < 8 * 10


def test_output_ignores_slot_count_queue_order_and_batching(models, engines):
  """A request's samples depend on (seed, uid, sample) only: not on the other requests of its run, their
  order, the number of slots or how the requests are split into runs."""
  reqs = requests(PROMPTS, [10, 11, 12, 13], max_new_tokens=10, temperature=1.0, top_p=0.9, n=2)
  engine = engines["llama"]
  whole = engine.run(reqs, seed=7)
  assert_same(whole, generate(models["llama"], reqs, seed=7))
  order = [2, 0, 3, 1]
  permuted = engine.run([reqs[i] for i in order], seed=7)
  split = engine.run(reqs[:2], seed=7) + engine.run(reqs[2:], seed=7)
  three_slots = Engine(models["llama"], **dict(ENGINE, slots=3, chunk_steps=2)).run(reqs, seed=7)
  for other in ([permuted[order.index(i)] for i in range(4)], split, three_slots):
    assert_same(other, whole)
  assert token_ids(engine.run(reqs, seed=8)) != token_ids(whole)
  assert all(row[0].token_ids != row[1].token_ids for row in whole)  # samples j differ


def test_compiles_stay_bounded_while_values_and_weights_vary(models, tmp_path):
  """8 slots take every sample of the 4 prompts at once, so each run's shapes are those of the warm-up (an
  uncached and a cached prefill, 4 or 8 decode rows): temperature, top-k, top-p, max_new_tokens and the seed
  are traced values and compile nothing; new weights neither."""
  engine = Engine(models["llama"], **dict(ENGINE, slots=8))
  for n in (1, 2):
    for _ in range(2):  # the second run reads the prompts' blocks from the prefix cache
      engine.run(requests(PROMPTS, range(4), max_new_tokens=10, temperature=1.0, n=n))
  counts = engine.compile_counts()
  rng = np.random.default_rng(0)
  for call in range(6):
    sampling = dict(max_new_tokens=int(rng.integers(5, 16)), n=int(rng.integers(1, 3)),
                    temperature=float(rng.choice([0.0, 0.7, 1.3])), top_p=float(rng.uniform(0.5, 1.0)),
                    top_k=int(rng.integers(0, 50)))
    engine.run(requests(PROMPTS, range(4), **sampling), seed=call)
  assert engine.compile_counts() == counts
  # New weights (another checkpoint): outputs follow them, through the same compiled programs.
  other = save_tiny_llama(tmp_path / "other", seed=11, num_key_value_heads=2)
  greedy = requests(PROMPTS, range(4), max_new_tokens=16, temperature=0.0)
  before = [o[0].token_ids for o in engine.run(greedy)]
  engine.update_params(load_hf_checkpoint(other))
  after = [o[0].token_ids for o in engine.run(greedy)]
  assert after == hf_generate(other, PROMPTS, 16) and after != before
  assert engine.compile_counts() == counts


def test_ten_thousand_requests_through_64_slots(models):
  engine = Engine(models["llama"], slots=64, block_size=8, chunk_steps=4, max_seq_len=64)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 256, int(rng.integers(1, 13))).tolist() for _ in range(10_000)]
  max_new = rng.integers(1, 5, 10_000)
  reqs = [Request(p, uid=i, max_new_tokens=int(m), temperature=0.0) for i, (p, m) in enumerate(zip(prompts, max_new))]
  outs = engine.run(reqs)
  assert [len(o[0].token_ids) for o in outs] == max_new.tolist()
  assert engine.stats["admitted"] == int((max_new > 1).sum()) and engine.blocks_in_use == 0
  assert engine.stats["decode_tokens"] / engine.stats["slot_steps"] > 0.5
  check = rng.choice(10_000, 48, replace=False)
  assert_same([outs[i] for i in check], generate(models["llama"], [reqs[i] for i in check]))
  # Chunks: one span bucket (max_seq_len 64 is the smallest) x <= 4 row buckets (64, 32, 16, 8: the drain packs
  # the last rows); prefill: row buckets 1, 4, 16, 64 x 2 widths (8, 16), where powers of two met up to 14.
  assert engine.compile_counts()["chunk"] <= CHUNK_ROW_BUCKETS and engine.compile_counts()["prefill"] <= 4 * 2
  assert engine.stats["chunk_rows_below_slots"] > 0


def test_overflow_raises_or_reports_cache_full(models, engines):
  engine = engines["llama"]
  calls = engine.stats["prefill_calls"]
  with pytest.raises(ValueError, match="exceeds the capacity 512"):  # checked before anything runs
    engine.run(requests(PROMPTS, range(4), max_new_tokens=500, temperature=0.0))
  assert engine.stats["prefill_calls"] == calls
  with pytest.raises(ValueError, match="exceeds the capacity 24"):
    Engine(models["llama"], **dict(ENGINE, max_seq_len=24)).run([Request(PROMPTS[3], uid=0, max_new_tokens=6)])
  with pytest.raises(ValueError, match="raise num_blocks"):
    Engine(models["llama"], **dict(ENGINE, num_blocks=8)).run([Request(PROMPTS[3], uid=0, max_new_tokens=16)])
  report = Engine(models["llama"], **dict(ENGINE, max_seq_len=24, on_overflow="report"))
  reqs = requests(PROMPTS + [[1] * 24, [1] * 25], range(6), max_new_tokens=16, temperature=0.0)
  got = report.run(reqs)
  assert_same(got[:4], generate(models["llama"], reqs[:4], capacity=24))
  assert [o[0].finish_reason for o in got] == ["length", "cache_full", "length", "cache_full", "cache_full",
                                                "cache_full"]
  for prompt, row in zip(PROMPTS, got):  # a full sample holds exactly the capacity
    assert len(prompt) + len(row[0].token_ids) == min(len(prompt) + 16, 24)
  assert got[4][0].token_ids == got[5][0].token_ids == []  # no room for a single token


def test_a_pool_smaller_than_the_slots_need_waits_instead_of_dropping(models):
  """13 blocks for 4 slots: requests wait for blocks between chunks; every one still completes, unchanged."""
  engine = Engine(models["llama"], **dict(ENGINE, num_blocks=13))
  reqs = requests(PROMPTS, range(4), max_new_tokens=16, temperature=1.0, n=2)
  assert_same(engine.run(reqs, seed=2), generate(models["llama"], reqs, seed=2))
  assert engine.stats["peak_blocks"] <= 12


def test_sharded_engine_equals_unsharded(engines, checkpoints):
  """Rows over 4 data shards, kv heads over 2 tensor shards (8 fake CPU devices): the same tokens, log-probs
  within 1e-5, through a row bucket of 4 and a drained one of 2 (not divisible by the 4 data shards)."""
  from rise_jax import sharding
  mesh = sharding.make_mesh((4, 1, 2))
  sharded = Engine(load_hf_checkpoint(checkpoints["llama"], mesh=mesh), **ENGINE, mesh=mesh)
  reqs = requests(PROMPTS[:3], ["x", "y", "z"], max_new_tokens=8, temperature=1.0, top_p=0.9, n=2)
  reqs[1] = dataclasses.replace(reqs[1], max_new_tokens=14)  # its 2 samples drain alone
  want = engines["llama"].run(reqs, seed=3)
  got = sharded.run(reqs, seed=3)
  assert_same(got, want)
  assert len(sharded._pool.k[0].sharding.device_set) == 8 and not sharded._pool.k[0].sharding.is_fully_replicated
  assert len(jax.tree.leaves(sharded._params)[0].sharding.device_set) == 8
  assert sharded.stats["chunk_rows_below_slots"] > 0
  assert_same(sharded.run(reqs, seed=3), want)  # the prompts' blocks now come from the prefix cache
  assert sharded.stats["cached_tokens"] > 0
  engines["llama"].run(reqs, seed=3)
  compiled = [e.compile_counts() for e in (sharded, engines["llama"])]
  assert_same(sharded.run(reqs, seed=3), want)
  engines["llama"].run(reqs, seed=3)
  assert [e.compile_counts() for e in (sharded, engines["llama"])] == compiled  # a third run compiles nothing


@pytest.mark.parametrize("name", ["llama", "mistral"])  # mistral: turn 2 attends across the turn boundary
def test_continuation_from_the_prefix_cache_equals_re_prefill(models, name):
  """Turn 2 = turn 1's prompt + a sampled reply + feedback: the engine reads the prompt and the reply (written by
  its own decode steps) from the cache and prefills only the rest; tokens equal the reference's full re-forward
  of turn 2 and log-probs agree within 1e-5. A windowed turn 3 (the first prompt + feedback again) reuses the
  prompt's blocks only."""
  engine = Engine(models[name], **dict(ENGINE, slots=8))
  sampling = dict(max_new_tokens=11, temperature=1.0, n=2)
  first = engine.run(requests(PROMPTS, range(4), **sampling), seed=5)
  feedback = [7, 8, 9, 10, 11]
  second = [p + o[1].token_ids + feedback for p, o in zip(PROMPTS, first)]
  third = [p + feedback for p in PROMPTS]
  reqs = requests(second + third, range(10, 18), **sampling)
  got = engine.run(reqs, seed=5)
  assert_same(got, generate(models[name], reqs, seed=5))
  bs = ENGINE["block_size"]
  # Sample 1's pool holds its prompt and all of its reply but the last token: those full blocks are cached.
  want_cached = [min((len(p) + len(o[1].token_ids) - 1) // bs, (len(q) - 1) // bs) * bs
                 for p, o, q in zip(PROMPTS, first, second)]
  want_cached += [min(len(p) // bs, (len(q) - 1) // bs) * bs for p, q in zip(PROMPTS, third)]
  assert [o[0].cached_tokens for o in got] == want_cached and sum(want_cached[:4]) > sum(map(len, PROMPTS))
  assert engine.blocks_in_use == 0


def test_the_prefix_cache_evicts_instead_of_refusing(models):
  """A pool of 24 blocks cannot keep every finished conversation: cached blocks nobody holds are taken back
  (least recently released first) and every request still runs, unchanged."""
  engine = Engine(models["llama"], **dict(ENGINE, num_blocks=24))
  reqs = requests(PROMPTS, range(4), max_new_tokens=9, temperature=1.0, n=2)
  for seed in range(3):
    assert_same(engine.run(reqs, seed=seed), generate(models["llama"], reqs, seed=seed))
  assert engine.kv.table.stats["evicted"] > 0 and engine.stats["cached_tokens"] > 0
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
  """After `update_params` the engine answers as the reference on the new weights: nothing the old weights
  computed is read from the cache, and no program compiles again."""
  engine = Engine(models["llama"], **ENGINE)
  reqs = requests(PROMPTS, range(4), max_new_tokens=6, temperature=1.0, n=2)
  engine.run(reqs, seed=4)
  engine.run(reqs, seed=4)  # the cached-prefix prefill programs compile here
  compiled = engine.compile_counts()
  graphdef, state = nnx.split(models["llama"])
  scaled = jax.tree.map(lambda x: x * 1.25, state)
  engine.update_params(scaled)
  got = engine.run(reqs, seed=4)
  assert_same(got, generate(nnx.merge(graphdef, scaled), reqs, seed=4))
  assert {s.cached_tokens for o in got for s in o} == {0} and engine.compile_counts() == compiled


def test_a_stream_takes_requests_while_it_runs_and_draws_what_run_draws(models):
  """RISE's pattern through `Engine.stream`: a conversation's next turn (prompt + reply + feedback) is submitted
  the moment its turn comes back, while other requests decode and the rest of the first turn is still arriving.
  Every sample equals the reference's for its (seed, uid) (the next turn re-run whole), the next turns read
  their history from the prefix cache, and a stream left busy is abandoned by the next one without leaking a
  block or changing what the engine draws."""
  engine = Engine(models["llama"], **ENGINE)
  sampling = dict(max_new_tokens=9, temperature=1.0, n=2)
  feedback = [7, 8, 9, 10, 11]
  stream = engine.stream(seed=5)
  for i in (0, 1):
    stream.submit(Request(PROMPTS[i], uid=i, **sampling), tag=("turn1", i))
  got, second, late, steps = {}, {}, [2, 3], 0
  while stream.busy:
    steps += 1
    for tag, samples in stream.step():
      got[tag] = samples
      if tag[0] == "turn1":
        second[tag[1]] = PROMPTS[tag[1]] + samples[1].token_ids + feedback
        stream.submit(Request(second[tag[1]], uid=10 + tag[1], **sampling), tag=("turn2", tag[1]))
    if late and steps >= 2:  # the rest of the first turn arrives while the stream runs
      stream.submit(Request(PROMPTS[late[0]], uid=late[0], **sampling), tag=("turn1", late.pop(0)))
  assert sorted(got) == [(kind, i) for kind in ("turn1", "turn2") for i in range(4)]
  first_turn = requests(PROMPTS, range(4), **sampling)
  assert_same([got["turn1", i] for i in range(4)], generate(models["llama"], first_turn, seed=5))
  assert_same([got["turn2", i] for i in range(4)],
              generate(models["llama"], requests([second[i] for i in range(4)], range(10, 14), **sampling), seed=5))
  assert all(got["turn2", i][0].cached_tokens >= len(PROMPTS[i]) // ENGINE["block_size"] * ENGINE["block_size"]
             for i in range(4))
  assert engine.blocks_in_use == 0

  abandoned = engine.stream(seed=5)
  abandoned.submit(Request(PROMPTS[0], uid=0, **sampling), tag=0)
  abandoned.step()  # its samples now hold slots and blocks
  assert abandoned.busy and engine.blocks_in_use > 0
  assert_same(engine.run(first_turn, seed=5), [got["turn1", i] for i in range(4)])
  assert engine.blocks_in_use == 0 and not abandoned.busy
  with pytest.raises(RuntimeError, match="closed"):
    abandoned.step()
