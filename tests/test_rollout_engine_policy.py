"""`EnginePolicy`: the continuous-batching engine behind the runner's `Policy` protocol draws what an independent
reference draws for the same rendered prompts, random streams (`sample_uid`), stop ids and reply text, with every
turn of every episode in one engine queue whatever each request's `n`; the sampling config builds it; boost
validation swaps each checkpoint's weights into it.

The reference is tests/reference_generator.py (the whole sequence re-run at every step, no cache, no batching
across turns) behind a small policy written here, on a one-layer toy-vocabulary model with the toy tokenizer
(103 ids; the model's 128 are cut to them).
"""

from __future__ import annotations

import json
import types

import pytest

from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.policies import (Completion, EnginePolicy, InstantStream, Sample, TurnRequest, TurnSampling,
                                       sample_uid)
from rise_jax.rollout.runner import Protocol, run_episodes
from rise_jax.tasks import graders
from rise_jax.tasks.base import Problem
from rise_jax.tasks.prompts import get_prompt_set
from train_helpers import TINY

PROBLEMS = [Problem(id=f"toy/test/{i}", question=q, reference=r)
            for i, (q, r) in enumerate([("3+4", "3+4=7"), ("2+3", "2+3=5"), ("9-5", "9-5=4")])]
# Stop ids beyond EOS so that short sampled replies end both ways ("stop" and "length"): EOS, 7 characters (the
# engine takes at most 8 stop ids).
STOPS = (2, *(7 + ord(c) - 32 for c in "0123456"))
BLOCK = 4     # small blocks: a reply of a few tokens fills whole blocks of the prefix cache
CAPACITY = 512


class _GraderTask:
  name = "toy"

  def grade(self, response, reference, mode):
    return graders.grade(self.name, response, reference, mode)

  def extract_answer(self, response, mode):
    return graders.get_grader(self.name).extract_answer(response, mode)


class _CountingEngine:
  """The real engine, recording the `n` of the requests submitted to each stream it opens, and every request's
  (tag, results)."""

  def __init__(self, engine):
    self.engine, self.config, self.calls, self.results = engine, engine.config, [], []

  def stream(self, seed=0):
    inner, submitted, results = self.engine.stream(seed), [], self.results
    self.calls.append(submitted)

    class Counted:
      busy = property(lambda _: inner.busy)

      def submit(self, request, tag):
        submitted.append(request.n)
        inner.submit(request, tag)

      def step(self):
        done = inner.step()
        results.extend(done)
        return done

    return Counted()


class _ReferenceGeneratorPolicy:
  """tests/reference_generator.py as a runner policy: each request rendered by the tokenizer's template, drawn
  on its `sample_uid` stream, the text its ids decoded without a final stop token; one generate call per batch."""

  name = "learner"

  def __init__(self, model, tokenizer, stop_ids, vocab_limit):
    self.model, self.tokenizer, self.stop_ids, self.vocab_limit = model, tokenizer, tuple(stop_ids), vocab_limit

  def sample(self, requests, sampling, seed):
    from rise_jax.sampling.requests import Request as GenerateRequest
    from tests.reference_generator import generate
    prompts = [list(self.tokenizer.render(list(r.messages), add_generation_prompt=True).ids) for r in requests]
    outs = generate(self.model, [
        GenerateRequest(p, uid=sample_uid(r.key, r.turn, r.round, r.stream), n=r.n,
                        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                        top_k=sampling.top_k, top_p=sampling.top_p, stop_ids=self.stop_ids)
        for p, r in zip(prompts, requests)], seed, capacity=CAPACITY, vocab_limit=self.vocab_limit)
    return [Completion(samples=tuple(self._sample(s) for s in row), history_tokens=len(p), prefill_tokens=len(p))
            for p, row in zip(prompts, outs)]

  def _sample(self, s) -> Sample:
    ids = tuple(int(t) for t in s.token_ids)
    text = self.tokenizer.decode(list(ids[:-1] if s.finish_reason == "stop" else ids))
    return Sample(text=text, finish_reason=s.finish_reason, num_tokens=len(ids), token_ids=ids,
                  logprob_sum=s.logprob_sum)

  def release(self, keys):
    del keys

  def open_stream(self, seed):
    return InstantStream(self, seed)


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
  from rise_jax import chat
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  return chat.load_tokenizer(build_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy"), chat_template="toy")


@pytest.fixture(scope="module")
def model_and_engine(toy_tokenizer):
  """A tiny model and an engine on it, cut to the tokenizer's vocabulary."""
  from rise_jax.models.build import build_model
  from rise_jax.sampling.engine import Engine
  from rise_jax.sampling.requests import vocab_limit
  model = build_model(TINY, seed=1)
  limit = vocab_limit(toy_tokenizer, model.config)
  assert limit == toy_tokenizer.vocab_size < model.config.vocab_size
  return model, Engine(model, slots=4, max_seq_len=CAPACITY, block_size=BLOCK, chunk_steps=4, vocab_limit=limit)


def _episodes(tmp_path, name, policy, protocol):
  path = tmp_path / f"{name}.jsonl"
  header = rollout_log.make_header("cfg", "tiny", versions={}, git_commit="abc")
  run_episodes(PROBLEMS, policy, protocol, path, task=_GraderTask(), prompts=get_prompt_set("toy"), header=header,
               batch_size=len(PROBLEMS), progress=False)
  _, records, torn = rollout_log.read_rollouts(path)
  assert torn == 0 and len(records) == len(PROBLEMS)
  return sorted(records, key=lambda r: r["problem_id"])  # episodes are logged as they end


def _split(records):
  """(records without each turn's prefill_tokens and each candidate's logprob_sum, the prefill tokens, the sums)."""
  records = json.loads(json.dumps(records))
  prefill, sums = [], []
  for record in records:
    prefill.append([turn.pop("prefill_tokens") for turn in record["turns"]])
    for turn in record["turns"]:
      for cand in turn["candidates"]:
        sums.append(cand.pop("logprob_sum"))
  return records, prefill, sums


@pytest.mark.parametrize("temperature,stops", [(1.0, STOPS), (0.0, None)], ids=["sampled", "greedy"])
def test_engine_policy_logs_what_the_reference_logs(tmp_path, toy_tokenizer, model_and_engine, temperature, stops):
  """Three turns with 1, 3, 2 samples, best-reward selection and a window of 2, for three problems: the logs
  agree on every field (texts, ids, rewards, chosen, finish reasons, histories), log-probability sums within
  1e-4; one engine queue holds every turn of every problem. Turn 2 prefills only what follows the cached turn-1
  prompt and chosen reply; the windowed turn 3 reads at least the instruction's blocks from the cache."""
  model, engine = model_and_engine
  engine.forget_prefix_cache()  # turn 1 prefills whole, whatever an earlier test left cached
  counting = _CountingEngine(engine)
  sampling = TurnSampling(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=6)
  protocol = Protocol.sequential(3, samples=(1, 3, 2), select="best_reward", window=2, sampling=sampling,
                                 grader="robust", seed=5)
  reference = _ReferenceGeneratorPolicy(model, toy_tokenizer, stops or toy_tokenizer.eos_token_ids,
                                        engine.vocab_limit)
  want, want_prefill, want_sums = _split(_episodes(tmp_path, "reference", reference, protocol))
  got, got_prefill, got_sums = _split(_episodes(tmp_path, "engine", EnginePolicy(counting, toy_tokenizer,
                                                                               stop_token_ids=stops), protocol))
  assert got == want
  assert got_sums == pytest.approx(want_sums, abs=1e-4)
  assert len(counting.calls) == 1 and sorted(counting.calls[0]) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
  turns = [t for r in got for t in r["turns"]]
  assert any(t["window_applied"] for t in turns)
  reasons = {c["finish_reason"] for t in turns for c in t["candidates"]}
  assert reasons == ({"stop", "length"} if stops else {"length"})
  for record, prefill, ref_prefill in zip(got, got_prefill, want_prefill, strict=True):
    (h1, h2, h3), t1 = [t["history_tokens"] for t in record["turns"]], record["turns"][0]
    assert ref_prefill == [h1, h2, h3]
    # The chosen sample's pool held its prompt and all of its reply but the last token; full blocks are cached.
    chosen = len(t1["candidates"][t1["chosen"]]["token_ids"])
    assert prefill[:2] == [h1, h2 - min((h1 + chosen - 1) // BLOCK, (h2 - 1) // BLOCK) * BLOCK]
    assert record["turns"][2]["window_applied"] and prefill[2] <= h3 - min(h1 // BLOCK, (h3 - 1) // BLOCK) * BLOCK


def test_requests_with_different_n_come_back_in_order_from_one_engine_call(toy_tokenizer, model_and_engine):
  """Nine requests (three problems x three resample rounds, n in a Latin square) in one engine call: each comes
  back in its place with its `n` samples, the samples the reference draws for that request's stream."""
  from rise_jax.sampling.requests import Request as GenerateRequest
  from tests.reference_generator import generate
  model, engine = model_and_engine
  counting = _CountingEngine(engine)
  policy = EnginePolicy(counting, toy_tokenizer, stop_token_ids=STOPS)
  messages = get_prompt_set("toy").initial_messages
  ns = [(2, 1, 3), (1, 3, 2), (3, 2, 1)]  # ns[round - 1][problem]
  requests = [TurnRequest(key=p.id, messages=tuple(messages(p.question)), n=ns[r - 1][i], turn=2, round=r,
                          stream="sequential") for r in (1, 2, 3) for i, p in enumerate(PROBLEMS)]
  got = policy.sample(requests, TurnSampling(temperature=1.0, max_new_tokens=6), seed=11)
  assert counting.calls == [[2, 1, 3, 1, 3, 2, 3, 2, 1]]
  assert [len(c.samples) for c in got] == [2, 1, 3, 1, 3, 2, 3, 2, 1]
  prompts = [toy_tokenizer.render(list(r.messages), add_generation_prompt=True).ids for r in requests]
  want = generate(model, [GenerateRequest(p, uid=sample_uid(r.key, 2, r.round, "sequential"), n=r.n,
                                          max_new_tokens=6, temperature=1.0, stop_ids=STOPS)
                          for p, r in zip(prompts, requests)], 11, capacity=CAPACITY, vocab_limit=engine.vocab_limit)
  results_in_order = [r for _, r in sorted(counting.results, key=lambda d: d[0])]  # tags: (index, prompt tokens)
  for completion, results, reference, prompt in zip(got, results_in_order, want, prompts, strict=True):
    assert [s.token_ids for s in completion.samples] == [tuple(w.token_ids) for w in reference]
    assert [s.text for s in completion.samples] == [
        toy_tokenizer.decode(w.token_ids[:-1] if w.finish_reason == "stop" else w.token_ids) for w in reference]
    assert [s.logprob_sum for s in completion.samples] == pytest.approx([w.logprob_sum for w in reference],
                                                                        abs=1e-4)
    # The prompt's tokens are prefilled except those the engine read from its prefix cache.
    assert completion.history_tokens == len(prompt)
    assert completion.prefill_tokens == len(prompt) - min(r.cached_tokens for r in results)


def test_default_stop_ids_are_the_tokenizers_end_of_turn(toy_tokenizer, model_and_engine):
  _, engine = model_and_engine
  assert EnginePolicy(engine, toy_tokenizer).stop_ids == tuple(toy_tokenizer.eos_token_ids) == (2,)
  assert EnginePolicy(engine, toy_tokenizer, stop_token_ids=[6, 2, 6]).stop_ids == (6, 2)
  with pytest.raises(ValueError, match="at most 8"):
    EnginePolicy(engine, toy_tokenizer, stop_token_ids=range(10, 19))


def test_the_sampling_config_builds_an_engine_policy(tmp_path, monkeypatch):
  import rise_jax.pipeline.resources
  from rise_jax.config import finalize
  from rise_jax.models.configs import get_preset
  from rise_jax.pipeline import recipes
  from rise_jax.pipeline.resources import Resources

  built = {}

  def fake_engine(model, **options):
    built.update(options)
    return types.SimpleNamespace(config=model.config)

  monkeypatch.setattr(rise_jax.pipeline.resources, "Engine", fake_engine)  # where learner looks it up
  c = recipes.toy_smoke()
  c.output_dir, c.sampling.on_overflow = str(tmp_path), "report"
  c.sampling.slots, c.sampling.block_size, c.sampling.chunk_steps, c.sampling.num_blocks = 12, 32, 3, 50
  res = Resources(finalize(c), tmp_path)
  policy = res.learner(types.SimpleNamespace(config=get_preset("toy-llama").config), name="learner@1")
  assert isinstance(policy, EnginePolicy) and policy.name == "learner@1"
  assert built == dict(slots=12, max_seq_len=c.sampling.max_cache_length, block_size=32, chunk_steps=3,
                       num_blocks=50, on_overflow="report", vocab_limit=res.tokenizer.vocab_size, mesh=built["mesh"])
  assert res.tokenizer.vocab_size < 128


def test_a_model_teacher_loads_with_the_learners_options(tmp_path, monkeypatch, tiny_llama_gqa_path):
  """A `model` teacher gets the config's parameter dtype (not its compute dtype), compute dtype, attention, scan
  and remat settings, as the learner does."""
  import jax.numpy as jnp
  from rise_jax.config import finalize
  from rise_jax.pipeline import recipes
  from rise_jax.pipeline.resources import Resources

  c = recipes.toy_smoke()
  c.output_dir, c.collect.teacher.kind, c.collect.teacher.path = str(tmp_path), "model", str(tiny_llama_gqa_path)
  c.model.param_dtype, c.model.dtype, c.model.remat = "float32", "bfloat16", "full"
  c.model.scan_layers = not c.model.scan_layers
  res = Resources(finalize(c), tmp_path)
  monkeypatch.setattr(res, "learner", lambda model, name: (model, name))
  model, name = res.teacher(res.config, PROBLEMS)
  assert name == f"teacher:{tiny_llama_gqa_path.name}" and model.config.num_kv_heads == 2
  assert model.embedder[...].dtype == jnp.float32 and model.dtype == jnp.bfloat16
  assert (model.scan_layers, model.remat, model.attention) == (c.model.scan_layers, "full", "xla")


def test_boost_validation_swaps_weights_into_one_learner():
  """The learner is built once and each later checkpoint's weights are swapped in (`update_params`, which the
  engine policy has), so no validation scores a stale model and none recompiles."""
  from rise_jax.config import finalize
  from rise_jax.pipeline import recipes, stages
  from rise_jax.rollout.policies import ScriptedPolicy

  built, models = [], []  # models the learner was built with; models it answers with (the last)

  def learner(model, name):
    built.append(model)
    models.append(model)
    policy = ScriptedPolicy(lambda request, j: "3+4=7" if models[-1] == "good" else "3+4=8", name=name)
    policy.update_params = models.append
    return policy

  task = types.SimpleNamespace(load=lambda split: PROBLEMS[:1], grade=lambda text, ref, mode: float(text == ref))
  res = types.SimpleNamespace(config=finalize(recipes.toy_smoke()), task=task, prompts=get_prompt_set("toy"),
                              learner=learner)
  score = stages._dev_accuracy(res)
  assert [score("bad"), score("good"), score("bad")] == [0.0, 1.0, 0.0]
  assert built == ["bad"]
  assert callable(EnginePolicy.update_params)
