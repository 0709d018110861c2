"""The sampler with chat messages and a real tokenizer (the char-level toy one): text, stop strings, continuation."""

import numpy as np
import pytest

from rise_jax.chat import load_tokenizer
from rise_jax.models import load_hf_checkpoint
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
from rise_jax.sampling import Sampler, SamplingParams
from tests.fixtures_models import save_tiny_llama

QUESTIONS = ["1+2*3", "4+5*6=?", "7+8*9 please"]


@pytest.fixture(scope="module")
def chat_sampler(tmp_path_factory):
  root = tmp_path_factory.mktemp("sampler_chat")
  tokenizer = load_tokenizer(build_toy_tokenizer(root / "tok"))
  model = load_hf_checkpoint(save_tiny_llama(root / "model", seed=3, vocab_size=tokenizer.vocab_size))
  return Sampler(model, tokenizer, max_cache_length=256), tokenizer


def first_turn(question):
  return [{"role": "user", "content": question}]


def test_messages_render_and_text_decodes(chat_sampler):
  sampler, tokenizer = chat_sampler
  params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
  outs = sampler.generate([first_turn(q) for q in QUESTIONS], params)
  by_ids = sampler.generate([tokenizer.render(first_turn(q), add_generation_prompt=True).ids for q in QUESTIONS],
                            params)
  for q, row, same in zip(QUESTIONS, outs, by_ids):
    assert row[0].token_ids == same[0].token_ids
    assert row[0].text == tokenizer.decode(row[0].token_ids)
    assert row[0].prompt_tokens == len(tokenizer.render(first_turn(q), add_generation_prompt=True).ids)


def test_stop_strings_cut_text_and_ids(chat_sampler):
  sampler, tokenizer = chat_sampler
  prompts = [first_turn(q) for q in QUESTIONS]  # the whole batch: the buckets of the other tests
  greedy = dict(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
  free = sampler.generate(prompts, SamplingParams(**greedy))[0][0]
  text = tokenizer.decode(free.token_ids)
  stop = text[3:5]  # two characters the model produces after 3 others: a multi-token stop string
  assert len(tokenizer.encode(stop)) == 2
  out = sampler.generate(prompts, SamplingParams(**greedy, stop_strings=[stop]))[0][0]
  at = text.find(stop)
  assert out.finish_reason == "stop" and out.text == text[:at]
  assert out.token_ids == free.token_ids[:at + 2] and len(out.logprobs) == len(out.token_ids)
  # A one-token stop string joins the stop ids: the row ends on that token, which text excludes.
  one = tokenizer.decode(free.token_ids[2:3])
  out = sampler.generate(prompts, SamplingParams(**greedy, stop_strings=[one]))[0][0]
  first = free.token_ids.index(free.token_ids[2])
  assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
  assert out.text == tokenizer.decode(free.token_ids[:first])


def test_default_stop_is_the_end_of_turn_token(chat_sampler):
  sampler, tokenizer = chat_sampler
  outs = sampler.generate([first_turn(q) for q in QUESTIONS], SamplingParams(max_new_tokens=12, temperature=1.0),
                          seed=1)
  for row in outs:
    s = row[0]
    assert s.finish_reason in ("stop", "length")
    if s.finish_reason == "stop":
      assert s.token_ids[-1] in tokenizer.eos_token_ids
    assert not set(s.token_ids[:-1]) & set(tokenizer.eos_token_ids)


def test_message_continuation_equals_fresh_render(chat_sampler):
  sampler, _ = chat_sampler
  params = SamplingParams(max_new_tokens=12, temperature=1.0)
  ids = ["p0", "p1", "p2"]
  turn1 = sampler.generate([first_turn(q) for q in QUESTIONS], params, seed=2, prompt_ids=ids)
  chosen = [row[0] for row in turn1]
  nxt = [first_turn(q) + [{"role": "assistant", "content": c.text},
                          {"role": "user", "content": "The answer is incorrect. Please try again."}]
         for q, c in zip(QUESTIONS, chosen)]
  before = dict(sampler.stats)
  continued = sampler.generate(nxt, params, seed=2, prompt_ids=ids, history=[c.conversation for c in chosen])
  assert sampler.stats["reused_tokens"] > before.get("reused_tokens", 0)
  fresh = sampler.generate(nxt, params, seed=2, prompt_ids=ids)
  for a_row, b_row in zip(continued, fresh):
    for a, b in zip(a_row, b_row):
      assert a.token_ids == b.token_ids and a.text == b.text
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_padded_model_vocabulary_never_emits_a_non_token(tmp_path):
  """toy-llama pads its vocabulary to 128 past the toy tokenizer's 103 ids: those ids are not tokens."""
  tokenizer = load_tokenizer(build_toy_tokenizer(tmp_path / "tok"))
  model = load_hf_checkpoint(save_tiny_llama(tmp_path / "model", seed=5, vocab_size=128))
  assert tokenizer.vocab_size < 128
  sampler = Sampler(model, tokenizer, max_cache_length=128)
  outs = sampler.generate([first_turn(q) for q in QUESTIONS],
                          SamplingParams(max_new_tokens=48, temperature=1.0, n=4, stop_token_ids=[]), seed=1)
  ids = np.array([s.token_ids for row in outs for s in row])
  # A random model puts ~19% of its mass on the 25 padded ids: without the limit ~36 of 576 draws land there.
  assert ids.max() < tokenizer.vocab_size
  # The reported log-prob still normalises over the whole model vocabulary, as the training forward does.
  assert all(np.all(np.array(s.logprobs) < 0) for row in outs for s in row)
