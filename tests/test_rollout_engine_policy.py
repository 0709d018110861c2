"""`EnginePolicy`: the continuous-batching engine behind the runner's `Policy` protocol draws what `SamplerPolicy`
draws (same rendering, random streams, stop ids and reply text), a whole turn in one engine queue whatever each
request's `n`, or every turn of every episode in one queue when the runner streams; `sampling.engine = "paged"`
builds it; boost validation swaps each checkpoint's weights into it.

The reference is `SamplerPolicy` over the static `Sampler` (a different cache layout, batching and continuation
path), on a one-layer toy-vocabulary model with the toy tokenizer (103 ids; the model's 128 are cut to them).
"""

from __future__ import annotations

import json
import types

import pytest

from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.policies import EnginePolicy, Request, SamplerPolicy, TurnSampling, sample_uid
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


class _TurnByTurnEnginePolicy(EnginePolicy):
  open_stream = None  # no stream: the runner steps its episodes turn by turn, one engine queue per turn


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
  from rise_jax import chat
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  return chat.load_tokenizer(build_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy"), chat_template="toy")


@pytest.fixture(scope="module")
def pair(toy_tokenizer):
  """(Sampler, Engine) over one tiny model, the engine cut to the tokenizer's vocabulary as the sampler is."""
  from rise_jax.models.build import build_model
  from rise_jax.sampling import Engine, Sampler
  from rise_jax.sampling.sampler import vocab_limit
  model = build_model(TINY, seed=1)
  assert vocab_limit(toy_tokenizer, model.config) == toy_tokenizer.vocab_size < model.config.vocab_size
  sampler = Sampler(model, toy_tokenizer, max_cache_length=512)
  engine = Engine(model, slots=4, max_seq_len=512, block_size=16, chunk_steps=4,
                  vocab_limit=vocab_limit(toy_tokenizer, model.config))
  return sampler, engine


def _episodes(tmp_path, name, policy, protocol):
  path = tmp_path / f"{name}.jsonl"
  header = rollout_log.make_header("cfg", "tiny", versions={}, git_commit="abc")
  run_episodes(PROBLEMS, policy, protocol, path, task=_GraderTask(), prompts=get_prompt_set("toy"), header=header,
               batch_size=len(PROBLEMS), progress=False)
  _, records, torn = rollout_log.read_rollouts(path)
  assert torn == 0 and len(records) == len(PROBLEMS)
  return records


def _split_logprobs(records):
  """(records with every candidate's logprob_sum and every turn's prefill_tokens removed, the logprob sums)."""
  records = json.loads(json.dumps(records))
  sums = []
  for record in records:
    for turn in record["turns"]:
      del turn["prefill_tokens"]   # the sampler continues its cache; the engine's cache is not here yet
      for cand in turn["candidates"]:
        sums.append(cand.pop("logprob_sum"))
  return records, sums


@pytest.mark.parametrize("temperature,stops,streamed", [(1.0, STOPS, True), (0.0, None, False)],
                         ids=["sampled-streamed", "greedy-turn_by_turn"])
def test_engine_policy_logs_what_the_sampler_policy_logs(tmp_path, toy_tokenizer, pair, temperature, stops,
                                                         streamed):
  """Three turns with 1, 3, 2 samples, best-reward selection and a window of 2, for three problems: the logs
  agree on every field (texts, ids, rewards, chosen, finish reasons, histories), log-probability sums within
  1e-4; turn by turn, each turn is one engine queue holding every problem's request; streamed, one queue holds
  every turn of every problem."""
  sampler, engine = pair
  counting = _CountingEngine(engine)
  sampling = TurnSampling(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=6)
  protocol = Protocol.sequential(3, samples=(1, 3, 2), select="best_reward", window=2, sampling=sampling,
                                 grader="robust", seed=5)
  want = _episodes(tmp_path, "sampler", SamplerPolicy(sampler, toy_tokenizer, stop_token_ids=stops), protocol)
  policy_class = EnginePolicy if streamed else _TurnByTurnEnginePolicy
  got = _episodes(tmp_path, "engine", policy_class(counting, toy_tokenizer, stop_token_ids=stops), protocol)
  by_id = lambda records: sorted(records, key=lambda r: r["problem_id"])  # a stream logs episodes as they end
  (want, want_sums), (got, got_sums) = _split_logprobs(by_id(want)), _split_logprobs(by_id(got))
  assert got == want
  assert got_sums == pytest.approx(want_sums, abs=1e-4)
  if streamed:
    assert len(counting.calls) == 1 and sorted(counting.calls[0]) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
  else:
    assert counting.calls == [[1, 1, 1], [3, 3, 3], [2, 2, 2]]
  turns = [t for r in got for t in r["turns"]]
  assert any(t["window_applied"] for t in turns)
  reasons = {c["finish_reason"] for t in turns for c in t["candidates"]}
  assert reasons == ({"stop", "length"} if stops else {"length"})


def test_requests_with_different_n_come_back_in_order_from_one_engine_call(toy_tokenizer, pair):
  """Nine requests (three problems x three resample rounds, n in a Latin square) in one engine call: each comes
  back in its place with its `n` samples, the samples the sampler draws for that request's stream."""
  from rise_jax.sampling import SamplingParams
  sampler, engine = pair
  counting = _CountingEngine(engine)
  policy = EnginePolicy(counting, toy_tokenizer, stop_token_ids=STOPS)
  messages = get_prompt_set("toy").initial_messages
  ns = [(2, 1, 3), (1, 3, 2), (3, 2, 1)]  # ns[round - 1][problem]
  requests = [Request(key=p.id, messages=tuple(messages(p.question)), n=ns[r - 1][i], turn=2, round=r,
                      stream="sequential") for r in (1, 2, 3) for i, p in enumerate(PROBLEMS)]
  got = policy.sample(requests, TurnSampling(temperature=1.0, max_new_tokens=6), seed=11)
  assert counting.calls == [[2, 1, 3, 1, 3, 2, 3, 2, 1]]
  assert [len(c.samples) for c in got] == [2, 1, 3, 1, 3, 2, 3, 2, 1]
  # The reference: the sampler, one call per n (it renders the messages itself), each request on its stream.
  want = [None] * len(requests)
  for n in (1, 2, 3):
    rows = [k for k, r in enumerate(requests) if r.n == n]
    outs = sampler.generate([list(requests[k].messages) for k in rows],
                            SamplingParams(max_new_tokens=6, n=n, stop_token_ids=STOPS), seed=11,
                            prompt_ids=[sample_uid(requests[k].key, 2, requests[k].round, "sequential") for k in rows])
    for k, out in zip(rows, outs):
      want[k] = out
  results_in_order = [r for _, r in sorted(counting.results, key=lambda d: d[0])]  # tags: (index, prompt tokens)
  for completion, results, reference in zip(got, results_in_order, want):
    assert [s.token_ids for s in completion.samples] == [tuple(w.token_ids) for w in reference]
    assert [s.text for s in completion.samples] == [w.text for w in reference]
    # The prompt's tokens are prefilled except those the engine read from its prefix cache.
    assert completion.history_tokens == reference[0].prompt_tokens
    assert completion.prefill_tokens == reference[0].prompt_tokens - min(r.cached_tokens for r in results)


def test_default_stop_ids_are_the_samplers(toy_tokenizer, pair):
  sampler, engine = pair
  assert EnginePolicy(engine, toy_tokenizer).stop_ids == sampler._default_stop_ids == (2,)
  assert EnginePolicy(engine, toy_tokenizer, stop_token_ids=[6, 2, 6]).stop_ids == (6, 2)


def test_paged_sampling_builds_an_engine_policy(tmp_path, monkeypatch):
  import rise_jax.sampling
  from rise_jax.config import finalize
  from rise_jax.models.configs import get_preset
  from rise_jax.pipeline import recipes
  from rise_jax.pipeline.resources import Resources

  built = {}

  def fake_engine(model, **options):
    built.update(options)
    return types.SimpleNamespace(config=model.config)

  monkeypatch.setattr(rise_jax.sampling, "Engine", fake_engine)
  c = recipes.toy_smoke()
  c.output_dir, c.sampling.engine, c.sampling.on_overflow = str(tmp_path), "paged", "report"
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
  """The learner is built once and each later checkpoint's weights are swapped in (`update_params`, which both
  model policies have), so no validation scores a stale model and none recompiles."""
  from rise_jax.config import finalize
  from rise_jax.pipeline import recipes, stages
  from rise_jax.rollout.policies import ScriptedPolicy, SamplerPolicy

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
  assert callable(EnginePolicy.update_params) and callable(SamplerPolicy.update_params)
