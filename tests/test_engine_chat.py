"""The engine behind `EnginePolicy` with chat messages and a real tokenizer (the char-level toy one): messages
render through the chat template, replies decode to text, the default stop is the end-of-turn token, and a
model vocabulary padded past the tokenizer's never emits a non-token. The reference is
tests/reference_generator.py on the rendered ids with the policy's random streams."""

import numpy as np
import pytest
from scipy import special

from rise_jax.chat import load_tokenizer
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
from rise_jax.models import load_hf_checkpoint
from rise_jax.rollout.policies import EnginePolicy, TurnRequest, TurnSampling, sample_uid
from rise_jax.sampling import requests as sampling_requests
from rise_jax.sampling.engine import Engine
from tests.fixtures_models import save_tiny_llama
from tests.reference_generator import generate

QUESTIONS = ["1+2*3", "4+5*6=?", "7+8*9 please"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return load_tokenizer(build_toy_tokenizer(tmp_path_factory.mktemp("engine_chat") / "tok"))


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory, tokenizer):
  path = save_tiny_llama(tmp_path_factory.mktemp("engine_chat") / "model", seed=3, vocab_size=tokenizer.vocab_size)
  model = load_hf_checkpoint(path)
  return Engine(model, slots=4, max_seq_len=256), model


def first_turn(question):
  return [{"role": "user", "content": question}]


def turn_requests(n: int) -> list[TurnRequest]:
  return [TurnRequest(key=f"q{i}", messages=tuple(first_turn(q)), n=n, turn=1) for i, q in enumerate(QUESTIONS)]


def reference(model, tokenizer, reqs, sampling: TurnSampling, seed: int, stop_ids, vocab_limit=None):
  """The reference generator on each request's template-rendered ids, with the policy's uid per request."""
  return generate(model, [
      sampling_requests.Request(tokenizer.render(list(r.messages), add_generation_prompt=True).ids,
                                uid=sample_uid(r.key, r.turn, r.round, r.stream), n=r.n,
                                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_k=sampling.top_k, top_p=sampling.top_p, stop_ids=tuple(stop_ids))
      for r in reqs], seed, vocab_limit=vocab_limit)


def test_messages_render_and_text_decodes(chat_engine, tokenizer):
  engine, model = chat_engine
  policy = EnginePolicy(engine, tokenizer, stop_token_ids=[])
  sampling = TurnSampling(temperature=0.0, max_new_tokens=12)
  reqs = turn_requests(1)
  got = policy.sample(reqs, sampling, seed=0)
  want = reference(model, tokenizer, reqs, sampling, 0, stop_ids=())
  for q, completion, row in zip(QUESTIONS, got, want, strict=True):
    (s,) = completion.samples
    assert s.token_ids == tuple(row[0].token_ids) and s.finish_reason == "length"
    assert s.text == tokenizer.decode(row[0].token_ids)
    assert s.logprob_sum == pytest.approx(row[0].logprob_sum, abs=1e-4)
    assert completion.history_tokens == len(tokenizer.render(first_turn(q), add_generation_prompt=True).ids)


def test_default_stop_is_the_end_of_turn_token(chat_engine, tokenizer):
  """Without stop ids given, a sample ends at the tokenizer's end-of-turn token, which its ids keep and its text
  does not: each sample is the reference's unstopped sample cut after its first end-of-turn token."""
  engine, model = chat_engine
  policy = EnginePolicy(engine, tokenizer)
  assert policy.stop_ids == tuple(tokenizer.eos_token_ids)
  sampling = TurnSampling(temperature=1.0, max_new_tokens=48)
  reqs = turn_requests(4)
  got = policy.sample(reqs, sampling, seed=1)
  free = reference(model, tokenizer, reqs, sampling, 1, stop_ids=())
  stops = set(tokenizer.eos_token_ids)
  reasons = []
  for completion, row in zip(got, free, strict=True):
    for s, unstopped in zip(completion.samples, row, strict=True):
      at = next((t for t, i in enumerate(unstopped.token_ids) if i in stops), None)
      if at is None:
        assert s.finish_reason == "length" and s.token_ids == tuple(unstopped.token_ids)
        assert s.text == tokenizer.decode(s.token_ids)
      else:
        assert s.finish_reason == "stop" and s.token_ids == tuple(unstopped.token_ids[:at + 1])
        assert s.text == tokenizer.decode(s.token_ids[:-1])
      reasons.append(s.finish_reason)
  assert set(reasons) == {"stop", "length"}


def test_padded_model_vocabulary_never_emits_a_non_token(tmp_path, tokenizer):
  """toy-llama pads its vocabulary to 128 past the toy tokenizer's 103 ids: those ids are not tokens."""
  model = load_hf_checkpoint(save_tiny_llama(tmp_path / "model", seed=5, vocab_size=128))
  limit = sampling_requests.vocab_limit(tokenizer, model.config)
  assert limit == tokenizer.vocab_size < 128
  policy = EnginePolicy(Engine(model, slots=4, max_seq_len=128, vocab_limit=limit), tokenizer, stop_token_ids=[])
  sampling = TurnSampling(temperature=1.0, max_new_tokens=48)
  reqs = turn_requests(4)
  got = policy.sample(reqs, sampling, seed=1)
  samples = [s for c in got for s in c.samples]
  assert max(max(s.token_ids) for s in samples) < tokenizer.vocab_size
  want = reference(model, tokenizer, reqs, sampling, 1, stop_ids=(), vocab_limit=limit)
  assert [s.token_ids for s in samples] == [tuple(w.token_ids) for row in want for w in row]
  # A random model puts ~19% of its mass on the 25 padded ids: without the limit, draws land there.
  unlimited = reference(model, tokenizer, reqs, sampling, 1, stop_ids=())
  assert max(max(w.token_ids) for row in unlimited for w in row) >= tokenizer.vocab_size
  # The reported log-prob still normalises over the whole model vocabulary, as the training forward does.
  prompts = [tokenizer.render(list(r.messages), add_generation_prompt=True).ids for r in reqs for _ in range(r.n)]
  for b, (p, s) in enumerate(zip(prompts, samples, strict=True)):
    row = np.array([p + list(s.token_ids)])
    logp = special.log_softmax(np.asarray(model(row), np.float64)[0], axis=-1)
    want_sum = logp[np.arange(len(p) - 1, row.shape[1] - 1), list(s.token_ids)].sum()
    assert s.logprob_sum == pytest.approx(want_sum, abs=1e-3), b
