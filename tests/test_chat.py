"""rise_jax.chat against independent references: sentencepiece itself, Meta's Llama 2 chat encoding, mistral-common's
v1 instruct encoding, the official Hugging Face templates rendered by plain jinja2, and the toy format as the brief
spells it. Real Llama 2 vocabulary from ../shared (skipped when absent); llama3-style and toy vocabularies are built
here with `tokenizers`.
"""

import functools
import pathlib
import random
import string
import types

import jinja2
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rise_jax import chat

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer fixtures.
# ---------------------------------------------------------------------------------------------------------------

TOY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
TOY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _save(tok, directory, **specials):
  from transformers import PreTrainedTokenizerFast
  PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(directory))
  return directory


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  """The toy char-level vocabulary exactly as the brief specifies (specials first, then ASCII and newline)."""
  import tokenizers
  vocab = {t: i for i, t in enumerate(TOY_SPECIALS + TOY_CHARS)}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in TOY_SPECIALS])
  tok.decoder = tokenizers.decoders.Fuse()
  return _save(tok, tmp_path_factory.mktemp("toy"), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
               pad_token="<pad>")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
  """A small byte-level BPE with Llama 3's pre-tokenizer regex and special tokens (the real one is 128k)."""
  import tokenizers
  from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = ["Let's think step by step. 12 apples + 5 = 17 apples.\n\nThe answer is \\boxed{17}.",
            "The answer is incorrect. Please try again. Here's the question: how many?", "  x = (a+b)*2;\n\tif x:"]
  tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
      vocab_size=400, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return _save(tok, tmp_path_factory.mktemp("llama3"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@pytest.fixture(scope="module")
def sp_reference(llama2_tokenizer_model):
  return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))


@pytest.fixture(scope="module")
def tokenizers_by_template(request):
  """Template name -> ChatTokenizer; llama2 and mistral on the real Llama 2 SentencePiece vocabulary."""
  @functools.cache
  def get(name):
    if name == "toy":
      return chat.load_tokenizer(request.getfixturevalue("toy_dir"))
    if name == "llama3":
      return chat.load_tokenizer(request.getfixturevalue("llama3_dir"))
    return chat.load_tokenizer(request.getfixturevalue("llama2_tokenizer_model"), name)
  return get


TEMPLATES = ["llama2", "mistral", "llama3", "toy"]

# ---------------------------------------------------------------------------------------------------------------
# Loading: ids equal sentencepiece's own encoding.
# ---------------------------------------------------------------------------------------------------------------


def _varied_strings(n=200, seed=0):
  fixed = ["", " ", "  ", "Hello world", " leading space", "  two leading", "trailing ", "a  b   c    d",
           "tabs\tand\nnewlines\n\n\n", "\n", "12345678901234567890", "3.14159 and 2,718,281", "#### 40,000",
           "naïve café résumé", "中文字符测试", "日本語のテキスト", "emoji 😀🎉 mixed", "Ελληνικά και русский",
           "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
           "\\boxed{\\frac{1}{2}}", "$x^2 + y^2 = z^2$", "[INST] not special [/INST]", "<<SYS>>\nsys\n<</SYS>>",
           "   \n  \t  ", "ü", "\u200b zero width", "a\u00a0b non-breaking"]
  rng = random.Random(seed)
  alphabet = list(string.ascii_letters + string.digits + string.punctuation) + [" "] * 12 + ["\n"] * 4 + ["\t"] + list(
      "éüñçßøåæ中文日本😀€£→∑√")
  out = list(fixed)
  while len(out) < n:
    out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
  return out


def test_llama2_encode_equals_sentencepiece(llama2_tokenizer_model, sp_reference):
  tok = chat.load_tokenizer(llama2_tokenizer_model, "llama2")
  strings = _varied_strings()
  assert len(strings) == 200
  for s in strings:
    assert tok.encode(s, add_bos=True, add_eos=True) == sp_reference.encode(s, add_bos=True, add_eos=True), s
    assert tok.decode(tok.encode(s)) == sp_reference.decode(sp_reference.encode(s))
  assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (32000, 1, (2,))


def test_llama2_directory_and_file_load_alike(llama2_tokenizer_model, tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(pathlib.Path(llama2_tokenizer_model).read_bytes())
  from_dir = chat.load_tokenizer(tmp_path, "llama2")
  from_file = chat.load_tokenizer(llama2_tokenizer_model, "llama2")
  s = " Same ids  either way\n"
  assert from_dir.encode(s) == from_file.encode(s)


# ---------------------------------------------------------------------------------------------------------------
# Chat encodings equal the model makers' own code.
# ---------------------------------------------------------------------------------------------------------------


def _meta_llama2_chat(sp, dialog):
  """Meta's llama `chat_completion` encoding (llama/generation.py), recomputed with sentencepiece."""
  if dialog[0]["role"] == "system":
    dialog = [{"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1][
        "content"]}] + dialog[2:]
  ids = []
  for prompt, answer in zip(dialog[::2], dialog[1::2]):
    ids += sp.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ", add_bos=True,
                     add_eos=True)
  if dialog[-1]["role"] == "user":
    ids += sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]", add_bos=True)
  return ids


def _mistral_common_v1(sp, dialog):
  """mistral-common's InstructTokenizerV1 (Mistral-7B-Instruct-v0.2): [bos], user chunks, answers + eos."""
  ids = [sp.bos_id()]
  for m in dialog:
    if m["role"] == "user":
      ids += sp.encode(f"[INST] {m['content']} [/INST]")
    else:
      ids += sp.encode(m["content"]) + [sp.eos_id()]
  return ids


# Contents with whitespace runs, newlines, digits, unicode and brackets; no "<" so no special-token text.
_CONTENT = st.text(alphabet=st.sampled_from(list("ab xyz Q  \n\t09.,:;!?()[]{}#$%*+-=/'\"éü中😀")), max_size=24)
_TOY_CONTENT = st.text(alphabet=st.sampled_from(list("ab xyz Q  \n09.,:;!?()[]{}#$%*+-=/'\"")), max_size=24)


@st.composite
def _conversation(draw, content=_CONTENT, system=True, end="any"):
  """A user-first alternating conversation; end: 'user', 'assistant' or 'any'."""
  turns = draw(st.integers(1, 5))
  roles = ["user" if i % 2 == 0 else "assistant" for i in range(turns)]
  if end == "user" and roles[-1] == "assistant":
    roles.append("user")
  if end == "assistant" and roles[-1] == "user":
    roles.append("assistant")
  messages = [{"role": r, "content": draw(content)} for r in roles]
  if system and draw(st.booleans()):
    messages = [{"role": "system", "content": draw(content)}] + messages
  return messages


_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@_SETTINGS
@given(dialog=_conversation())
def test_llama2_chat_ids_equal_meta_reference(tokenizers_by_template, sp_reference, dialog):
  tok = tokenizers_by_template("llama2")
  assert chat.render(tok, dialog, add_generation_prompt=True).ids == _meta_llama2_chat(sp_reference, dialog)


@_SETTINGS
@given(dialog=_conversation(content=_CONTENT.filter(bool), system=False))
def test_mistral_chat_ids_equal_mistral_common(tokenizers_by_template, sp_reference, dialog):
  # The Llama 2 SentencePiece model stands in for Mistral's (same library and algorithm; only the vocab differs).
  # Non-empty contents: for an empty answer the official template still emits its ' ' (one extra "▁" token).
  tok = tokenizers_by_template("mistral")
  assert chat.render(tok, dialog, add_generation_prompt=True).ids == _mistral_common_v1(sp_reference, dialog)


# Official templates, verbatim from the models' tokenizer_config.json (no generation markers).
OFFICIAL = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
        "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
        "        {%- if loop.first and system_message is defined %}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
        "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
        "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
SPECIALS = {"llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>")}


@functools.cache
def _official_template(name):
  def fail(msg):
    raise ValueError(msg)
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = fail
  return env.from_string(OFFICIAL[name])


def _official_text(name, messages, add_generation_prompt):
  bos, eos = SPECIALS[name]
  return _official_template(name).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos, eos_token=eos)


def _toy_reference_text(messages, add_generation_prompt):
  """The toy format in the brief's words."""
  out = "<s>"
  for m in messages:
    out += ("<|user|>" + m["content"] + "<|end|>") if m["role"] == "user" else (
        "<|assistant|>" + m["content"] + "</s>")
  return out + ("<|assistant|>" if add_generation_prompt else "")


@_SETTINGS
@given(dialog=_conversation(content=_TOY_CONTENT, system=False), gen=st.booleans())
def test_templates_render_the_official_text(dialog, gen):
  for name in ("llama2", "mistral", "llama3"):
    spec = chat.get_template(name)
    bos, eos = SPECIALS[name]
    text, _ = chat.templates.render_text(spec, dialog, add_generation_prompt=gen, bos_token=bos, eos_token=eos)
    assert text == _official_text(name, dialog, gen), name
  text, _ = chat.templates.render_text(chat.get_template("toy"), dialog, add_generation_prompt=gen,
                                       bos_token="<s>", eos_token="</s>")
  assert text == _toy_reference_text(dialog, gen)


def test_llama3_ids_equal_tokenizer_json_on_the_official_text(llama3_dir):
  import tokenizers
  reference = tokenizers.Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
  tok = chat.load_tokenizer(llama3_dir)
  dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 12+5? \n"},
            {"role": "assistant", "content": "Let's think step by step.\n\nThe answer is \\boxed{17}."},
            {"role": "user", "content": "The answer is incorrect. Please try again."}]
  text = _official_text("llama3", dialog, True)
  assert chat.render(tok, dialog, add_generation_prompt=True).ids == reference.encode(
      text, add_special_tokens=False).ids
  assert tok.bos_token_id == reference.token_to_id("<|begin_of_text|>")
  assert tok.eos_token_ids == (reference.token_to_id("<|eot_id|>"), reference.token_to_id("<|end_of_text|>"))


def test_toy_vocabulary_and_ids(toy_dir):
  tok = chat.load_tokenizer(toy_dir)
  assert tok.chat_template_name == "toy" and tok.vocab_size == 103 <= 128
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (0, 1, (2,))
  ids = chat.render(tok, [{"role": "user", "content": "2+2"}], add_generation_prompt=True).ids
  assert ids == [1, 4] + [7 + TOY_CHARS.index(c) for c in "2+2"] + [6, 5]


def test_tasks_toy_tokenizer_renders_the_toy_format(tmp_path):
  """The toy tokenizer the tasks part ships (built separately) against the brief's ids and format."""
  from rise_jax.chat import toy_tokenizer
  tok = chat.load_tokenizer(toy_tokenizer.build_toy_tokenizer(tmp_path / "toy"))
  assert (tok.chat_template_name, tok.vocab_size, tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (
      "toy", 103, 0, 1, (2,))
  dialog = [{"role": "user", "content": "7*8=?"}, {"role": "assistant", "content": "7*8=56"},
            {"role": "user", "content": "Wrong.\nAgain"}]
  text = _toy_reference_text(dialog, True)
  specials = {t: i for i, t in enumerate(TOY_SPECIALS)}
  expected, pos = [], 0
  while pos < len(text):
    special = next((t for t in TOY_SPECIALS if text.startswith(t, pos)), None)
    expected.append(specials[special] if special else 7 + TOY_CHARS.index(text[pos]))
    pos += len(special) if special else 1
  assert chat.render(tok, dialog, add_generation_prompt=True).ids == expected
  assert tok.decode(expected) == text


# ---------------------------------------------------------------------------------------------------------------
# The prefix property and exact spans, every template.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_prefix_property_and_span_start(tokenizers_by_template, name):
  tok = tokenizers_by_template(name)
  content = _TOY_CONTENT if name == "toy" else _CONTENT

  @_SETTINGS
  @given(dialog=_conversation(content=content, system=name != "toy", end="user"), reply=content)
  def check(dialog, reply):
    prompt = chat.render(tok, dialog, add_generation_prompt=True).ids
    full = chat.render(tok, dialog + [{"role": "assistant", "content": reply}])
    assert full.ids[:len(prompt)] == prompt
    # The reply's span starts where the prompt ends and runs to the end: what the engine generates is the span.
    assert full.assistant_spans[-1] == (len(dialog), len(prompt), len(full.ids))
    assert full.ids[-1] == tok.eos_token_ids[0]
    assert chat.continuation_ids(tok, dialog, dialog + [{"role": "assistant", "content": reply},
                                                        {"role": "user", "content": "again"}]) is not None

  check()


def test_misaligned_span_is_an_error(tokenizers_by_template):
  tok = tokenizers_by_template("llama2")
  # Mutation of the llama2 template: the block opens after the space that SentencePiece merges into "▁word".
  source = chat.get_template("llama2").source.replace(
      "{% generation %}{{ ' '  + content.strip()", "{{ ' ' }}{% generation %}{{ content.strip()")
  assert source != chat.get_template("llama2").source
  chat.register_template("llama2_misaligned", source, bos_token="<s>", end_of_turn="</s>",
                         sentencepiece_prefix="every_segment")
  # Refused at load, naming the template, before any conversation is rendered with it.
  with pytest.raises(chat.TokenizerLoadError, match="'llama2_misaligned' cannot be used.*inside a token"):
    chat.load_tokenizer(tok.source, "llama2_misaligned")


# ---------------------------------------------------------------------------------------------------------------
# Training arrays: only the trained message (contracts §4).
# ---------------------------------------------------------------------------------------------------------------

RISE_RECORD = [{"role": "user", "content": "Instruction with a worked example"},
               {"role": "assistant", "content": "EXAMPLE ANSWER 17"},
               {"role": "user", "content": "Great job! Next one: what is 2+3?"},
               {"role": "assistant", "content": "FIRST ATTEMPT 6"},
               {"role": "user", "content": "The answer is incorrect. Please try again."},
               {"role": "assistant", "content": "SECOND ATTEMPT 5"}]
# What the trained tokens decode to: the message and its end-of-turn token (llama2's template puts a space before).
EXPECTED_TRAINED = {"llama2": "{} </s>", "mistral": "{}</s>", "llama3": "{}<|eot_id|>", "toy": "{}</s>"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_train_mask_selects_exactly_the_trained_message(tokenizers_by_template, name):
  tok = tokenizers_by_template(name)
  expected = EXPECTED_TRAINED[name]
  input_ids, targets, mask = chat.train_arrays(tok, RISE_RECORD)
  ids = chat.render(tok, RISE_RECORD).ids
  assert input_ids.tolist() == ids[:-1] and targets.tolist() == ids[1:]
  assert tok.decode(targets[mask == 1]) == expected.format("SECOND ATTEMPT 5")
  # Exactly the tokens after the generation prompt of the state it answers.
  assert int(mask.sum()) == len(ids) - len(chat.render(tok, RISE_RECORD[:5], add_generation_prompt=True).ids)
  # The mask is one contiguous run ending at the last target.
  assert mask[-1] == 1 and np.all(np.diff(np.flatnonzero(mask)) == 1)
  flagged = [dict(m) for m in RISE_RECORD]
  flagged[3]["train"] = True
  _, targets, mask = chat.train_arrays(tok, flagged)
  assert tok.decode(targets[mask == 1]) == expected.format("FIRST ATTEMPT 6")


def test_train_flag_on_a_user_message_is_an_error(tokenizers_by_template):
  bad = [dict(m) for m in RISE_RECORD]
  bad[2]["train"] = True
  with pytest.raises(chat.ChatTemplateError, match="message 2"):
    chat.train_arrays(tokenizers_by_template("toy"), bad)


def _rise_conversation(pairs):
  messages = [dict(m) for m in RISE_RECORD[:3]]
  for k in range(pairs):
    messages += [{"role": "assistant", "content": f"attempt {k}"}, {"role": "user", "content": f"feedback {k}"}]
  return messages


def test_truncate_history_drops_oldest_pairs_then_reports_a_cut(tokenizers_by_template):
  tok = tokenizers_by_template("toy")
  messages = _rise_conversation(3) + [{"role": "assistant", "content": "final"}]
  without_two = messages[:3] + messages[7:]
  max_length = len(chat.render(tok, without_two).ids) - 1
  assert chat.truncate_history(messages, tok, max_length) == without_two
  input_ids, targets, mask = chat.train_arrays(tok, messages, max_length=max_length)
  assert len(input_ids) == max_length and tok.decode(targets[mask == 1]) == "final</s>"
  head_and_final = messages[:3] + messages[-1:]
  with pytest.raises(chat.TruncationError) as info:
    chat.train_arrays(tok, messages, max_length=len(chat.render(tok, head_and_final).ids) - 2)
  assert info.value.length == len(chat.render(tok, head_and_final).ids) - 1
  # Plain SFT (no RISE head): nothing to drop, the cut is reported.
  with pytest.raises(chat.TruncationError):
    chat.train_arrays(tok, [{"role": "user", "content": "q" * 20}, {"role": "assistant", "content": "a"}],
                      max_length=10)
  # A pair that holds a trained message is never dropped.
  flagged = [dict(m) for m in messages]
  flagged[3]["train"] = True
  assert chat.truncate_history(flagged, tok, max_length) == flagged


# ---------------------------------------------------------------------------------------------------------------
# The history window.
# ---------------------------------------------------------------------------------------------------------------


def test_window_keeps_head_and_last_pairs():
  messages = _rise_conversation(4)
  contents = lambda ms: [m["content"] for m in ms]
  head = contents(messages[:3])
  assert contents(chat.window(messages, 2)) == head + ["attempt 3", "feedback 3"]
  assert contents(chat.window(messages, 3)) == head + ["attempt 2", "feedback 2", "attempt 3", "feedback 3"]
  assert chat.window(messages, 5) == messages and chat.window(messages, 50) == messages
  assert chat.window(messages, None) == messages
  reply = messages + [{"role": "assistant", "content": "reply"}]
  assert contents(chat.window(reply, 2)) == head + ["attempt 3", "feedback 3", "reply"]
  system = [{"role": "system", "content": "sys"}] + messages
  assert contents(chat.window(system, 2)) == ["sys"] + head + ["attempt 3", "feedback 3"]


@pytest.mark.parametrize("W", [0, -1, 2.0])
def test_window_rejects_w_below_one(W):
  with pytest.raises(ValueError, match="W must be an int >= 1"):
    chat.window(_rise_conversation(2), W)


def test_window_one_keeps_the_head_alone():
  # W = 1: the state of a first turn, whatever came before (collection's independent first-turn attempts).
  messages = _rise_conversation(3)
  assert chat.window(messages, 1) == messages[:3]
  reply = messages + [{"role": "assistant", "content": "reply"}]
  assert chat.window(reply, 1) == messages[:3] + reply[-1:]


def test_window_rejects_a_conversation_without_the_rise_head():
  with pytest.raises(chat.ChatTemplateError, match="RISE head"):
    chat.window([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], 2)


def test_continuation_ids(tokenizers_by_template):
  tok = tokenizers_by_template("toy")
  before = _rise_conversation(2)
  after = before + [{"role": "assistant", "content": "attempt 2"}, {"role": "user", "content": "feedback 2"}]
  extra = chat.continuation_ids(tok, before, after)
  assert tok.decode(extra) == "attempt 2</s><|user|>feedback 2<|end|><|assistant|>"
  assert chat.render(tok, before, add_generation_prompt=True).ids + extra == chat.render(
      tok, after, add_generation_prompt=True).ids
  # A window that drops history breaks the prefix: the caller must re-prefill.
  assert chat.continuation_ids(tok, before, chat.window(after, 2)) is None


def test_render_errors(tokenizers_by_template):
  toy = tokenizers_by_template("toy")
  with pytest.raises(chat.ChatTemplateError, match="only user and assistant roles"):
    chat.render(toy, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
  with pytest.raises(chat.ChatTemplateError, match="message 1: 'content' must be a string"):
    chat.render(toy, [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}])
  with pytest.raises(chat.ChatTemplateError, match="reserved character"):
    chat.render(toy, [{"role": "user", "content": "q\ue000"}])
  with pytest.raises(chat.ChatTemplateError, match="message 0: expected a dict with role"):
    chat.render(toy, [{"role": "agent", "content": "q"}])
  with pytest.raises(chat.ChatTemplateError, match="roles must alternate"):
    chat.render(tokenizers_by_template("llama2"),
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary checks, loading errors, export.
# ---------------------------------------------------------------------------------------------------------------


def test_check_vocab_names_both_sizes(toy_dir):
  tok = chat.load_tokenizer(toy_dir)
  chat.check_vocab(tok, types.SimpleNamespace(vocab_size=128))
  chat.check_vocab(tok, types.SimpleNamespace(vocab_size=103))
  with pytest.raises(ValueError, match=r"103 ids.*vocab_size is 102"):
    chat.check_vocab(tok, types.SimpleNamespace(vocab_size=102))


def test_load_errors(tmp_path, toy_dir):
  with pytest.raises(chat.TokenizerLoadError, match="no such file"):
    chat.load_tokenizer(tmp_path / "absent")
  with pytest.raises(chat.TokenizerLoadError, match="no tokenizer.model or tokenizer.json"):
    chat.load_tokenizer(tmp_path)
  with pytest.raises(chat.ChatTemplateError, match="unknown chat template 'llama9'"):
    chat.load_tokenizer(toy_dir, "llama9")
  with pytest.raises(chat.TokenizerLoadError, match="'<\\|begin_of_text\\|>' .* not in the vocabulary"):
    chat.load_tokenizer(toy_dir, "llama3")


@pytest.mark.parametrize("name", TEMPLATES)
def test_export_reloads_and_transformers_agree(tokenizers_by_template, name, tmp_path):
  """save_pretrained reloads to the same ids; transformers' apply_chat_template on the exported directory gives the
  same ids, and its assistant mask (from its own {% generation %} handling and char offsets) equals our spans."""
  from transformers import AutoTokenizer
  tok = tokenizers_by_template(name)
  tok.save_pretrained(tmp_path)
  again = chat.load_tokenizer(tmp_path)  # the template is inferred from the saved chat_template.jinja
  prompt, full = RISE_RECORD[:5], RISE_RECORD
  ours = chat.render(tok, prompt, add_generation_prompt=True).ids
  assert again.chat_template_name == name
  assert chat.render(again, prompt, add_generation_prompt=True).ids == ours
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert list(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]) == ours
  out = hf.apply_chat_template(full, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  rendered = chat.render(tok, full)
  mask = np.zeros(len(rendered.ids), np.int64)
  for _, start, end in rendered.assistant_spans:
    mask[start:end] = 1
  assert list(out["input_ids"]) == rendered.ids and list(out["assistant_masks"]) == mask.tolist()


# ---------------------------------------------------------------------------------------------------------------
# chat_template="auto": the checkpoint's own (unmarked) template, spans from the prefix property.
# ---------------------------------------------------------------------------------------------------------------

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _with_template(src_dir, dst_dir, template, generation_eos=None):
  """A copy of a tokenizer directory whose tokenizer_config.json ships `template` (as a checkpoint does)."""
  import json
  import shutil
  shutil.copytree(src_dir, dst_dir)
  config_path = dst_dir / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["chat_template"] = template
  config_path.write_text(json.dumps(config))
  if generation_eos is not None:
    (dst_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
  return dst_dir


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
  """A small byte-level BPE with ChatML's special tokens, shipping a ChatML template without generation markers."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["Let's think step by step. 12 apples + 5 = 17 apples.\n\nThe answer is \\boxed{17}.",
            "The answer is incorrect. Please try again. Here's the question: how many?"]
  tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory = _save(tok, tmp_path_factory.mktemp("chatml") / "raw", bos_token="<|im_start|>",
                    eos_token="<|im_end|>", pad_token="<|im_end|>")
  return _with_template(directory, directory.parent / "ckpt", CHATML, generation_eos=[2, 0])


def test_auto_uses_the_checkpoint_template_with_its_end_of_turn_and_generation_config_stops(chatml_dir):
  tok = chat.load_tokenizer(chatml_dir)  # "auto" is the default
  assert tok.template.source == CHATML and not tok.template.marked
  assert tok.chat_template_name.endswith("tokenizer_config.json")
  assert tok.eos_token == "<|im_end|>"
  # The end-of-turn token first, then generation_config.json's eos ids (<|endoftext|> = 0) in their order.
  assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), 0)


@pytest.mark.parametrize("with_system", [False, True])
def test_checkpoint_template_ids_and_masks_equal_transformers(chatml_dir, with_system):
  """Ids equal apply_chat_template's; the mask covers each trained reply and its <|im_end|>, decoded."""
  from transformers import AutoTokenizer
  tok = chat.load_tokenizer(chatml_dir)
  hf = AutoTokenizer.from_pretrained(str(chatml_dir))
  record = ([{"role": "system", "content": "Be brief."}] if with_system else []) + RISE_RECORD
  for prompt_end in (3, 5):
    prompt = record[:prompt_end + with_system]
    assert chat.render(tok, prompt, add_generation_prompt=True).ids == list(
        hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
  rendered = chat.render(tok, record)
  assert rendered.ids == list(hf.apply_chat_template(record, tokenize=True, return_dict=True)["input_ids"])
  replies = [m["content"] for m in record if m["role"] == "assistant"]
  assert [tok.decode(rendered.ids[s:e]) for _, s, e in rendered.assistant_spans] == [
      r + "<|im_end|>" for r in replies]
  _, targets, mask = chat.train_arrays(tok, record)
  assert tok.decode(targets[mask == 1]) == "SECOND ATTEMPT 5<|im_end|>"


def test_unmarked_official_llama3_template_spans_equal_the_marked_one(llama3_dir, tmp_path):
  """The official Llama 3 template (no markers) shipped by a checkpoint gives the shipped template's spans."""
  marked = chat.load_tokenizer(llama3_dir)
  shipped = chat.load_tokenizer(_with_template(llama3_dir, tmp_path / "ckpt", OFFICIAL["llama3"]))
  assert marked.chat_template_name == "llama3" and not shipped.template.marked
  assert shipped.eos_token == "<|eot_id|>"
  for record in (RISE_RECORD, [{"role": "system", "content": "sys"}] + RISE_RECORD):
    assert chat.render(shipped, record) == chat.render(marked, record)
    assert chat.render(shipped, record[:-1], True) == chat.render(marked, record[:-1], True)


def test_a_template_breaking_the_prefix_property_is_refused_at_load(chatml_dir, tmp_path):
  # Mutation: the generation prompt differs from how an assistant message opens.
  broken = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant \n'")
  with pytest.raises(chat.TokenizerLoadError, match=r"tokenizer_config.json.*prefix property"):
    chat.load_tokenizer(_with_template(chatml_dir, tmp_path / "a", broken))
  # Mutation: no special token closes a reply, and the eos is not rendered either.
  unclosed = CHATML.replace("message['content'] + '<|im_end|>'", "message['content'] + '.'")
  with pytest.raises(chat.TokenizerLoadError, match="no special token closes an assistant message"):
    chat.load_tokenizer(_with_template(chatml_dir, tmp_path / "b", unclosed))


def test_checkpoint_template_export_reloads_with_the_same_template(chatml_dir, tmp_path):
  tok = chat.load_tokenizer(chatml_dir)
  tok.save_pretrained(tmp_path / "export")
  again = chat.load_tokenizer(tmp_path / "export")
  assert again.template.source == CHATML
  assert chat.render(again, RISE_RECORD) == chat.render(tok, RISE_RECORD)


def test_unmarked_jinja_file(chatml_dir, tmp_path):
  path = tmp_path / "chatml.jinja"
  path.write_text(CHATML)
  raw = chat.load_tokenizer(chatml_dir.parent / "raw", str(path))
  assert raw.eos_token == "<|im_end|>"
  assert chat.render(raw, RISE_RECORD) == chat.render(chat.load_tokenizer(chatml_dir), RISE_RECORD)
