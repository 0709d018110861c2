"""Tokenizer loading that is correct under transformers 5, and the ChatTokenizer every part of rise_jax uses.

transformers 5 has silent traps with SentencePiece vocabularies: an AutoTokenizer built from a bare tokenizer.model
drops the dummy prefix and adds no BOS, LlamaTokenizer(vocab_file=...) yields a 3-token vocabulary, and even the
correct LlamaTokenizer.from_pretrained(dir) merges whitespace runs differently from SentencePiece ("a  b") and
adds no BOS. So a SentencePiece vocabulary (a tokenizer.model file, or a directory holding one) is encoded by
`sentencepiece` itself, the library the checkpoints were trained with; any other directory by its tokenizer.json
through `tokenizers`, exactly as the file says (not as transformers' class rebuilds it). The transformers
tokenizer (`.hf`) is only built for export.
"""

import dataclasses
import functools
import json
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jinja2

from rise_jax.chat import templates as templates_lib


class TokenizerLoadError(ValueError):
  """A tokenizer path or vocabulary that cannot be used as asked."""


class _SentencePieceEngine:
  """SentencePiece with special-token splitting; text segments get the dummy prefix per the template's rule."""

  def __init__(self, model_path: pathlib.Path, prefix_rule: str):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    self.model_path = model_path
    serialized = model_path.read_bytes()
    self.sp = spm.SentencePieceProcessor(model_proto=serialized)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    # A second processor without the dummy prefix encodes text that follows a special token mid-sequence.
    proto.normalizer_spec.add_dummy_prefix = False
    self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.prefix_rule = prefix_rule
    size = self.sp.get_piece_size()
    self.special_to_id = {self.sp.id_to_piece(i): i for i in range(size) if self.sp.is_control(i)}
    self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special_to_id, key=len, reverse=True)))
    self.vocab_size = size
    self.unk_id = self.sp.unk_id()

  def encode_text(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_chat(self, text: str) -> list[int]:
    ids, pos = [], 0
    for match in self._special_re.finditer(text):
      ids += self._encode_segment(text[pos:match.start()], pos)
      ids.append(self.special_to_id[match.group()])
      pos = match.end()
    return ids + self._encode_segment(text[pos:], pos)

  def _encode_segment(self, segment: str, offset: int) -> list[int]:
    if not segment:
      return []
    with_prefix = self.prefix_rule == "every_segment" or offset == 0
    return (self.sp if with_prefix else self.sp_no_prefix).encode(segment)

  def special_tokens_in(self, text: str) -> list[str]:
    return self._special_re.findall(text)

  def token_to_id(self, token: str) -> int | None:
    if token in self.special_to_id:
      return self.special_to_id[token]
    i = self.sp.piece_to_id(token)
    return None if i == self.unk_id and token != self.sp.id_to_piece(self.unk_id) else i

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    out, run = [], []
    for i in ids:
      if self.sp.is_control(i):
        out.append(self.sp.decode(run))
        run = []
        if not skip_special_tokens:
          out.append(self.sp.id_to_piece(i))
      else:
        run.append(i)
    out.append(self.sp.decode(run))
    return "".join(out)

  def build_hf(self):
    from transformers import LlamaTokenizer
    # from_pretrained(dir) is the correct conversion (LlamaTokenizer(vocab_file=...) is the 3-token trap); legacy
    # selects Metaspace prepend_scheme "always" (every segment) vs "first" (text start), matching our rule.
    with tempfile.TemporaryDirectory() as tmp:
      shutil.copyfile(self.model_path, pathlib.Path(tmp) / "tokenizer.model")
      tok = LlamaTokenizer.from_pretrained(tmp, legacy=self.prefix_rule == "every_segment")
    # transformers 5 rebuilds the Metaspace pre-tokenizer from `legacy` on load, ignoring tokenizer.json: save it.
    tok.init_kwargs["legacy"] = self.prefix_rule == "every_segment"
    return tok


class _TokenizersEngine:
  """A tokenizer.json through `tokenizers`, with its own normalizer / pre-tokenizer / added tokens."""

  def __init__(self, tokenizer_json: pathlib.Path):
    import tokenizers
    self.path = tokenizer_json
    try:
      self.tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # noqa: BLE001 - the library's parse errors name no file
      raise TokenizerLoadError(f"{tokenizer_json}: cannot be read as a tokenizer ({e})") from None
    self.tok.no_padding()
    self.tok.no_truncation()
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.special_ids = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

  def encode_text(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  encode_chat = encode_text  # Added tokens in the text are matched by `tokenizers` itself.

  def special_tokens_in(self, text: str) -> list[str]:
    by_id = {i: t for t, i in self.special_ids.items()}
    return [by_id[i] for i in self.encode_text(text) if i in by_id]

  def token_to_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def build_hf(self):
    from transformers import PreTrainedTokenizerFast
    config = _read_tokenizer_config(self.path.parent)
    specials = {k: _token_content(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if config.get(k) is not None}
    # tokenizer_object keeps the file's pipeline as is; AutoTokenizer may rebuild it from the class defaults.
    return PreTrainedTokenizerFast(tokenizer_object=self.tok, **specials)


def _read_tokenizer_config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / "tokenizer_config.json"
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise TokenizerLoadError(f"{path}: invalid JSON ({e})") from e


def _token_content(value: Any) -> str:
  return value["content"] if isinstance(value, dict) else value


class ChatTokenizer:
  """A tokenizer bound to one chat template: encode/decode, special ids, and chat rendering.

  Attributes:
    bos_token_id: the template's BOS id.
    eos_token_ids: every id that ends an assistant turn (the template's end-of-turn token first).
    pad_token_id: the tokenizer's pad id, else the end-of-turn id (pad positions are always masked).
    vocab_size: number of ids the tokenizer can produce (base vocabulary plus added tokens).
    chat_template_name: registry name of the template.
    template: the TemplateSpec.
  """

  def __init__(self, engine, template: templates_lib.TemplateSpec, source: pathlib.Path,
               config: dict[str, Any], extra_stop_ids: Sequence[int] = ()):
    self._engine = engine
    self.template = template
    self.chat_template_name = template.name
    self.source = source
    self.vocab_size = engine.vocab_size
    self.bos_token = template.bos_token or _token_content(config.get("bos_token"))
    self.eos_token = template.end_of_turn or _token_content(config.get("eos_token"))
    if self.bos_token is None or self.eos_token is None:
      raise TokenizerLoadError(f"{source}: template {template.name!r} names no bos/end-of-turn token and the "
                               "tokenizer config has none")
    self.bos_token_id = self._required_id(self.bos_token, "bos")
    stops = [self.eos_token, *template.extra_stop_tokens]
    config_eos = _token_content(config.get("eos_token")) if config.get("eos_token") else None
    if config_eos is not None and engine.token_to_id(config_eos) is not None:
      stops.append(config_eos)
    ids = [self._required_id(t, "end-of-turn") for t in stops]
    for i in extra_stop_ids:
      if not 0 <= i < engine.vocab_size:
        raise TokenizerLoadError(f"{source}: generation_config.json's eos id {i} is outside the vocabulary "
                                 f"(size {engine.vocab_size})")
    self.eos_token_ids = tuple(dict.fromkeys([*ids, *extra_stop_ids]))
    pad = _token_content(config.get("pad_token")) if config.get("pad_token") else None
    pad_id = engine.token_to_id(pad) if pad is not None else None
    self.pad_token_id = pad_id if pad_id is not None else self.eos_token_ids[0]

  def _required_id(self, token: str, what: str) -> int:
    i = self._engine.token_to_id(token)
    if i is None:
      raise TokenizerLoadError(f"{self.source}: the {what} token {token!r} of template "
                               f"{self.chat_template_name!r} is not in the vocabulary")
    return i

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Plain text to ids (SentencePiece: special-token strings are literal text, as in sentencepiece)."""
    ids = self._engine.encode_text(text)
    return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_ids[0]] if add_eos else [])

  def encode_chat_text(self, text: str) -> list[int]:
    """Rendered chat text to ids: special-token strings become their ids, segments follow the template's rule."""
    return self._engine.encode_chat(text)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self._engine.decode([int(i) for i in ids], skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._engine.token_to_id(token)

  def render(self, messages, add_generation_prompt: bool = False):
    from rise_jax.chat import rendering
    return rendering.render(self, messages, add_generation_prompt=add_generation_prompt)

  @functools.cached_property
  def hf(self):
    """A transformers tokenizer carrying the chat template, for export (save_pretrained, vLLM)."""
    tok = self._engine.build_hf()
    tok.chat_template = self.template.source
    return tok

  def save_pretrained(self, path: str | pathlib.Path) -> None:
    """Writes the transformers tokenizer files (with the chat template) plus tokenizer.model when there is one,
    so that `load_tokenizer(path)` reloads exactly this tokenizer."""
    path = pathlib.Path(path)
    self.hf.save_pretrained(str(path))
    if isinstance(self._engine, _SentencePieceEngine):
      shutil.copyfile(self._engine.model_path, path / "tokenizer.model")

  def __repr__(self):
    return (f"ChatTokenizer({str(self.source)!r}, template={self.chat_template_name!r}, vocab={self.vocab_size}, "
            f"engine={type(self._engine).__name__})")


AUTO = "auto"
# A short RISE-shaped exchange every template must render with exact spans before a tokenizer is handed out.
_PROBE = ({"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5. The answer is 5."},
          {"role": "user", "content": "That was wrong. Try again."},
          {"role": "assistant", "content": "Again: 2+3=5. The answer is 5."})


def _stored_template(config: dict[str, Any], directory: pathlib.Path) -> tuple[str, str] | None:
  """The checkpoint's own chat template as (source, where it was read), or None when it ships none."""
  stored = config.get("chat_template")
  if isinstance(stored, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
    stored = next((t.get("template") for t in stored if isinstance(t, dict) and t.get("name") == "default"), None)
  if isinstance(stored, str) and stored.strip():
    return stored, str(directory / "tokenizer_config.json")
  jinja = directory / "chat_template.jinja"  # transformers 5 saves the template beside the config
  if jinja.is_file():
    return jinja.read_text(encoding="utf-8"), str(jinja)
  return None


def _vocabulary_template(engine, source: pathlib.Path) -> str:
  """A shipped template recognised from the vocabulary alone (for tokenizers that ship no template)."""
  if engine.token_to_id("<|eot_id|>") is not None:
    return "llama3"
  if engine.token_to_id("<|assistant|>") is not None and engine.token_to_id("<|user|>") is not None:
    return "toy"
  raise TokenizerLoadError(f"{source}: ships no chat template and its vocabulary is none of the shipped templates'; "
                           f"pass chat_template= one of {templates_lib.shipped_templates()} or a .jinja path")


def _auto_template(engine, config: dict[str, Any], directory: pathlib.Path, sentencepiece: bool):
  """`chat_template="auto"`: the template the checkpoint ships, else one recognised from the vocabulary.

  A stored template whose text is a shipped one's is that shipped template (its name carries its tokenizer rules).
  On a SentencePiece vocabulary a Llama 2 / Mistral family template resolves to the shipped `llama2` / `mistral`,
  whose dummy-prefix rules reproduce Meta's and mistral-common's encodings, which rendering the text alone does not.
  """
  stored = _stored_template(config, directory)
  if stored is None:
    return templates_lib.get_template(_vocabulary_template(engine, directory))
  source, where = stored
  for name in templates_lib.shipped_templates():
    if source.strip() == templates_lib.get_template(name).source.strip():
      return templates_lib.get_template(name)
  if sentencepiece and "<<SYS>>" in source:
    return templates_lib.get_template("llama2")
  if sentencepiece and "[INST]" in source:
    return templates_lib.get_template("mistral")
  return checkpoint_template(source, where, engine, config)


def checkpoint_template(source: str, where: str, engine, config: dict[str, Any]) -> templates_lib.TemplateSpec:
  """A template read from a checkpoint or a file, its end-of-turn token found by rendering one reply: the first
  special token after the reply's text (ChatML's <|im_end|>, Llama 3's <|eot_id|>), else the tokenizer's eos."""
  spec = templates_lib.TemplateSpec(where, source, None, None)
  bos = _token_content(config.get("bos_token")) or ""
  eos = _token_content(config.get("eos_token")) or ""
  reply = _PROBE[1]["content"]
  try:
    text = templates_lib.render_plain(spec, _PROBE[:2], add_generation_prompt=False, bos_token=bos, eos_token=eos)
  except (templates_lib.ChatTemplateError, jinja2.TemplateError) as e:
    raise TokenizerLoadError(f"{where}: the chat template cannot render a user/assistant exchange ({e})") from None
  if reply not in text:
    raise TokenizerLoadError(f"{where}: the chat template does not render an assistant message's content")
  after = text[text.rindex(reply) + len(reply):]
  end_of_turn = next((t for t in engine.special_tokens_in(after)), None) or (eos if eos and eos in after else None)
  if end_of_turn is None:
    raise TokenizerLoadError(f"{where}: no special token closes an assistant message in the chat template "
                             f"(rendered {after[:40]!r} after the reply) and the tokenizer's eos {eos!r} is not there")
  return dataclasses.replace(spec, end_of_turn=end_of_turn)


def _generation_eos_ids(directory: pathlib.Path) -> tuple[int, ...]:
  """`eos_token_id` of generation_config.json (an int or a list), the ids `generate` stops on."""
  path = directory / "generation_config.json"
  if not path.is_file():
    return ()
  try:
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise TokenizerLoadError(f"{path}: invalid JSON ({e})") from e
  eos = [eos] if isinstance(eos, int) else (eos or [])
  if not all(isinstance(i, int) and i >= 0 for i in eos):
    raise TokenizerLoadError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
  return tuple(eos)


def _check_probe(tokenizer: ChatTokenizer) -> None:
  """Renders a RISE-shaped exchange, so a template whose spans cannot be derived fails at load, naming itself."""
  from rise_jax.chat import rendering
  try:
    whole = rendering.render(tokenizer, _PROBE).ids
    prompt = rendering.render(tokenizer, _PROBE[:3], add_generation_prompt=True).ids
    if whole[:len(prompt)] != prompt:
      raise templates_lib.ChatTemplateError("the generation prompt's ids are not a prefix of the reply's")
  except templates_lib.ChatTemplateError as e:
    raise TokenizerLoadError(f"{tokenizer.source}: chat template {tokenizer.chat_template_name!r} cannot be used "
                             f"for multi-turn training and sampling: {e}") from None


def load_tokenizer(path: str | pathlib.Path, chat_template: str = AUTO) -> ChatTokenizer:
  """Loads a tokenizer and binds it to a chat template.

  Args:
    path: a SentencePiece `tokenizer.model` file, or a directory with `tokenizer.model` (SentencePiece, preferred:
      it is what Llama 2 / Mistral were trained with) or `tokenizer.json` (+ optional `tokenizer_config.json`,
      `chat_template.jinja`, `generation_config.json`).
    chat_template: "auto" (the template the checkpoint ships, see `_auto_template`; else one recognised from the
      vocabulary), a shipped or registered template name (llama2, mistral, llama3, toy), or a .jinja path.

  Stops: the template's end-of-turn token, its extra stop tokens, the tokenizer's eos and generation_config.json's
  eos ids. Every template renders a probe exchange at load (`_check_probe`).
  """
  path = pathlib.Path(path)
  if path.is_file():
    sp_model, directory = path, path.parent
    if path.suffix != ".model":
      raise TokenizerLoadError(f"{path}: expected a SentencePiece .model file or a tokenizer directory")
  elif path.is_dir():
    sp_model, directory = (path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None), path
    if sp_model is None and not (path / "tokenizer.json").is_file():
      raise TokenizerLoadError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
  else:
    raise TokenizerLoadError(f"{path}: no such file or directory")
  # A .model file given alone is that vocabulary alone: no config, template or generation config beside it.
  config = _read_tokenizer_config(directory) if path.is_dir() else {}
  if sp_model is not None:
    # The dummy-prefix rule is part of the template spec: resolve it on a plain engine, then build the real one.
    named = chat_template != AUTO and pathlib.Path(chat_template).suffix != ".jinja"
    spec = templates_lib.get_template(chat_template) if named else _resolve_template(
        chat_template, _SentencePieceEngine(sp_model, "text_start"), config, path, sentencepiece=True)
    engine = _SentencePieceEngine(sp_model, spec.sentencepiece_prefix)
  else:
    engine = _TokenizersEngine(path / "tokenizer.json")
    spec = _resolve_template(chat_template, engine, config, directory, sentencepiece=False)
  tokenizer = ChatTokenizer(engine, spec, path, config, extra_stop_ids=_generation_eos_ids(path))
  _check_probe(tokenizer)
  return tokenizer


def _resolve_template(chat_template: str, engine, config: dict[str, Any], directory: pathlib.Path,
                      sentencepiece: bool) -> templates_lib.TemplateSpec:
  """The spec `chat_template` names for this vocabulary: "auto", a .jinja path, or a shipped/registered name."""
  if chat_template == AUTO:
    return _auto_template(engine, config, directory, sentencepiece)
  if pathlib.Path(chat_template).suffix == ".jinja":
    return _file_template(chat_template, engine, config)
  return templates_lib.get_template(chat_template)


def _file_template(path: str, engine, config: dict[str, Any]) -> templates_lib.TemplateSpec:
  """A .jinja file: marked ones register as they are; unmarked ones find their end-of-turn like a checkpoint's."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise templates_lib.ChatTemplateError(f"chat template {path}: no such file")
  source = file.read_text(encoding="utf-8")
  if templates_lib.has_generation_markers(source):
    return templates_lib.get_template(path)
  return checkpoint_template(source, str(file), engine, config)


def check_vocab(tokenizer: ChatTokenizer, model_config) -> None:
  """Raises when the tokenizer can produce an id the model has no embedding for."""
  model_vocab = int(model_config.vocab_size)
  if tokenizer.vocab_size > model_vocab:
    raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                     f"{model_vocab}: ids >= {model_vocab} would index past the embedding table")
