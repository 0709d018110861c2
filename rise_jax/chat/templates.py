"""Chat templates: the registry of named jinja templates and their rendering to text plus assistant spans.

A template is Hugging Face chat-template jinja. Rendering returns the text and, per assistant message, the character
span of its trained text (content and end-of-turn token); `rise_jax.chat.render` turns those into token spans.
Spans come from one of two sources:
- marked templates (the shipped ones) put `{% generation %}...{% endgeneration %}` around that text;
- unmarked templates (what checkpoints ship) get it from the prefix property every chat template used for multi-turn
  generation must have: the text of messages[:i] with the generation prompt is a prefix of the text of
  messages[:i + 1], which is a prefix of the whole conversation's; message i's span runs from the end of the former
  to the end of the last end-of-turn token in the latter. A template that breaks the property is an error.
"""

import dataclasses
import datetime
import functools
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parents[1] / "chat_templates"
# Pinned so that a template calling strftime_now (Llama 3.1-style) renders identically on every day.
PINNED_DATE = datetime.datetime(2024, 7, 26)
# Private-use code points that bracket a generation block in the raw render; never valid in message content.
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


class ChatTemplateError(ValueError):
  """A conversation the template cannot render, or a template that breaks the span contract."""


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
  """A chat template and the tokens it relies on.

  Attributes:
    name: registry name.
    source: the jinja text (written as the tokenizer's `chat_template` on export).
    bos_token: the string bound to `bos_token` in the template.
    end_of_turn: the token that closes an assistant message (stop token for sampling).
    extra_stop_tokens: further tokens that end generation (e.g. Llama 3's <|end_of_text|>).
    sentencepiece_prefix: for SentencePiece vocabularies, which text segments (the pieces between special tokens)
      get SentencePiece's dummy-prefix space: "every_segment" (Meta's Llama 2 chat code encodes each chunk on its
      own) or "text_start" (only at the very start of the text, Hugging Face's Metaspace prepend_scheme="first",
      as the Mistral v0.2 repository and mistral-common do). Ignored by non-SentencePiece tokenizers.
  """
  name: str
  source: str
  bos_token: str | None
  end_of_turn: str | None
  extra_stop_tokens: tuple[str, ...] = ()
  sentencepiece_prefix: str = "text_start"

  def __post_init__(self):
    if self.sentencepiece_prefix not in ("every_segment", "text_start"):
      raise ValueError(f"template {self.name!r}: sentencepiece_prefix must be 'every_segment' or 'text_start', "
                       f"got {self.sentencepiece_prefix!r}")

  @property
  def marked(self) -> bool:
    """Whether the template marks assistant spans itself ({% generation %}); else they follow from prefixes."""
    return has_generation_markers(self.source)


def has_generation_markers(source: str) -> bool:
  return re.search(r"{%-?\s*generation\s*-?%}", source) is not None


_SHIPPED = {
    "llama2": dict(bos_token="<s>", end_of_turn="</s>", sentencepiece_prefix="every_segment"),
    "mistral": dict(bos_token="<s>", end_of_turn="</s>", sentencepiece_prefix="text_start"),
    "llama3": dict(bos_token="<|begin_of_text|>", end_of_turn="<|eot_id|>", extra_stop_tokens=("<|end_of_text|>",)),
    "toy": dict(bos_token="<s>", end_of_turn="</s>"),
}
_REGISTRY: dict[str, TemplateSpec] = {}


def register_template(name: str, source: str, *, bos_token: str | None = None, end_of_turn: str | None = None,
                      extra_stop_tokens: Sequence[str] = (), sentencepiece_prefix: str = "text_start") -> TemplateSpec:
  """Registers a jinja chat template under `name` (bos/end-of-turn default to the tokenizer's bos/eos)."""
  _compile(source)  # Syntax errors surface at registration, not at the first render.
  spec = TemplateSpec(name, source, bos_token, end_of_turn, tuple(extra_stop_tokens), sentencepiece_prefix)
  _REGISTRY[name] = spec
  return spec


def get_template(name: str) -> TemplateSpec:
  """Returns a registered template, a shipped one (llama2, mistral, llama3, toy) or one read from a .jinja path."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if name in _SHIPPED:
    return register_template(name, (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8"), **_SHIPPED[name])
  path = pathlib.Path(name)
  if path.suffix == ".jinja" and path.is_file():
    return register_template(str(path), path.read_text(encoding="utf-8"))
  raise ChatTemplateError(f"unknown chat template {name!r}: expected one of {sorted(set(_SHIPPED) | set(_REGISTRY))} "
                          "or a path to a .jinja file")


def shipped_templates() -> tuple[str, ...]:
  return tuple(_SHIPPED)


class _GenerationExtension(jinja2.ext.Extension):
  """`{% generation %}body{% endgeneration %}`: brackets the rendered body with sentinel characters."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

  def _bracket(self, caller):
    return _GEN_OPEN + caller() + _GEN_CLOSE


def _raise_exception(message: str):
  raise ChatTemplateError(message)


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
  # Same environment options as transformers' apply_chat_template, so an exported template renders identically.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, jinja2.ext.loopcontrols])
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = PINNED_DATE.strftime
  return env.from_string(source)


def render_plain(spec: TemplateSpec, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                 bos_token: str, eos_token: str) -> str:
  """The template's text as transformers' apply_chat_template renders it, generation markers removed."""
  raw = _raw(spec, messages, add_generation_prompt, bos_token, eos_token)
  return raw.replace(_GEN_OPEN, "").replace(_GEN_CLOSE, "")


def _raw(spec: TemplateSpec, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, bos_token: str,
         eos_token: str) -> str:
  return _compile(spec.source).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token,
      eos_token=eos_token, date_string=PINNED_DATE.strftime("%d %b %Y"))


def _marked_spans(spec: TemplateSpec, raw: str) -> tuple[str, list[tuple[int, int]]]:
  """Strips the generation sentinels from a marked template's render; returns (text, char span per block)."""
  text_parts, char_spans, pos, start = [], [], 0, None
  for piece_index, piece in enumerate(raw.replace(_GEN_CLOSE, _GEN_OPEN + _GEN_CLOSE).split(_GEN_OPEN)):
    if piece.startswith(_GEN_CLOSE):
      if start is None:
        raise ChatTemplateError(f"template {spec.name!r}: unbalanced generation block")
      char_spans.append((start, pos))
      start, piece = None, piece[1:]
    elif piece_index > 0:
      if start is not None:
        raise ChatTemplateError(f"template {spec.name!r}: nested generation blocks")
      start = pos
    text_parts.append(piece)
    pos += len(piece)
  return "".join(text_parts), char_spans


def _prefix_spans(spec: TemplateSpec, messages: Sequence[dict[str, Any]], text: str, assistant: list[int],
                  bos_token: str, eos_token: str) -> list[tuple[int, int]]:
  """An unmarked template's assistant spans, from the prefix property (module docstring)."""
  end_of_turn = spec.end_of_turn or eos_token
  spans = []
  for i in assistant:
    before = _raw(spec, messages[:i], True, bos_token, eos_token) if i else ""
    upto = _raw(spec, messages[:i + 1], False, bos_token, eos_token)
    if not (upto.startswith(before) and text.startswith(upto)):
      broken = "messages[:i] with the generation prompt" if not upto.startswith(before) else "messages[:i + 1]"
      raise ChatTemplateError(
          f"template {spec.name!r} breaks the prefix property at assistant message {i}: the text of {broken} is "
          "not a prefix of the longer conversation's, so reply spans (loss masks) and continued conversations "
          "would be wrong; pass a template with {% generation %} markers (tokenizer.chat_template)")
    end = upto.rfind(end_of_turn, len(before))
    if end < 0:
      raise ChatTemplateError(f"template {spec.name!r}: assistant message {i} is not closed by the end-of-turn "
                              f"token {end_of_turn!r}")
    spans.append((len(before), end + len(end_of_turn)))
  return spans


def render_text(spec: TemplateSpec, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                bos_token: str, eos_token: str) -> tuple[str, list[tuple[int, int, int]]]:
  """Renders `messages` to text; returns (text, [(message_index, char_start, char_end)] per assistant message)."""
  for i, message in enumerate(messages):
    content = message.get("content")
    if not isinstance(content, str):
      raise ChatTemplateError(f"message {i}: 'content' must be a string, got {type(content).__name__}")
    if _GEN_OPEN in content or _GEN_CLOSE in content:
      raise ChatTemplateError(f"message {i}: content contains a reserved character (U+E000/U+E001)")
  raw = _raw(spec, messages, add_generation_prompt, bos_token, eos_token)
  assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
  if spec.marked:
    text, char_spans = _marked_spans(spec, raw)
  else:
    text, char_spans = raw, _prefix_spans(spec, messages, raw, assistant, bos_token, eos_token)
  if len(assistant) != len(char_spans):
    raise ChatTemplateError(f"template {spec.name!r} rendered {len(char_spans)} generation blocks for "
                            f"{len(assistant)} assistant messages")
  return text, [(i, s, e) for i, (s, e) in zip(assistant, char_spans)]
