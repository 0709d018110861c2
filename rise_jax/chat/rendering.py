"""Messages to token ids with exact assistant spans; training arrays; the inference-time history window.

Token spans come from character spans by re-encoding prefixes: the span of assistant message i starts at token
k = len(encode(text[:start])) and this is accepted only if encode(text[:start]) == ids[:k], i.e. the tokenization
of everything before the span is exactly the first k ids. So a span is exact by construction, whatever merges the
tokenizer does; a template whose boundary falls inside a token is an error, never a silent misalignment.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rise_jax.chat import templates as templates_lib

Message = dict[str, Any]


class SpanAlignmentError(templates_lib.ChatTemplateError):
  """An assistant span boundary falls inside a token."""


class TruncationError(ValueError):
  """max_length cuts into a trained assistant message even after dropping all droppable history."""

  def __init__(self, message: str, *, length: int, max_length: int):
    super().__init__(message)
    self.length = length
    self.max_length = max_length


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  """ids of the rendered conversation; assistant_spans: (message_index, start, end) token ranges [start, end),
  each covering the assistant message's tokens including its end-of-turn token."""
  ids: list[int]
  assistant_spans: list[tuple[int, int, int]]


def _token_boundary(tokenizer, text: str, ids: list[int], char_pos: int, message_index: int) -> int:
  prefix = tokenizer.encode_chat_text(text[:char_pos])
  if ids[:len(prefix)] != prefix:
    raise SpanAlignmentError(
        f"template {tokenizer.chat_template_name!r}: the span of message {message_index} starts or ends at "
        f"character {char_pos} inside a token ({text[max(0, char_pos - 20):char_pos]!r} | "
        f"{text[char_pos:char_pos + 20]!r}); the template must put span boundaries on token boundaries")
  return len(prefix)


def _render_text(tokenizer, messages: Sequence[Message], add_generation_prompt: bool):
  _check_messages(messages)
  return templates_lib.render_text(tokenizer.template, messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def rendered_length(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> int:
  """len(render(...).ids) without computing spans."""
  return len(tokenizer.encode_chat_text(_render_text(tokenizer, messages, add_generation_prompt)[0]))


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> RenderedChat:
  """Renders messages through the tokenizer's chat template to ids and assistant token spans.

  As in transformers' apply_chat_template and vLLM, a special-token string inside message content (e.g. a literal
  "</s>") is encoded as that special token.
  """
  text, char_spans = _render_text(tokenizer, messages, add_generation_prompt)
  ids = tokenizer.encode_chat_text(text)
  spans = []
  for index, start, end in char_spans:
    spans.append((index, _token_boundary(tokenizer, text, ids, start, index),
                  _token_boundary(tokenizer, text, ids, end, index)))
  return RenderedChat(ids=ids, assistant_spans=spans)


def _check_messages(messages: Sequence[Message]) -> None:
  if not messages:
    raise templates_lib.ChatTemplateError("empty conversation")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
      raise templates_lib.ChatTemplateError(f"message {i}: expected a dict with role system|user|assistant, got {m!r}")


def trained_message_indices(messages: Sequence[Message]) -> list[int]:
  """contracts §4: messages with "train": true; when no message has the field, the last assistant message."""
  if any("train" in m for m in messages):
    trained = [i for i, m in enumerate(messages) if m.get("train")]
  else:
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    trained = assistant[-1:]
  for i in trained:
    if messages[i].get("role") != "assistant":
      raise templates_lib.ChatTemplateError(f"message {i}: 'train' is set on a {messages[i].get('role')} message")
  if not trained:
    raise templates_lib.ChatTemplateError("no trained message: no 'train': true and no assistant message")
  return trained


def train_arrays(tokenizer, messages: Sequence[Message], max_length: int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Next-token training arrays for one conversation.

  Returns (input_ids, targets, loss_mask), int32 [n]: position t reads input_ids[t] and is scored on targets[t]
  (= ids[t + 1]); loss_mask[t] = 1 iff targets[t] is a token of a trained assistant message (its content and
  end-of-turn token). n = len(ids) - 1 <= max_length: over-long history is first shortened by
  `truncate_history`; if the trained message still does not fit, TruncationError.
  """
  rendered = render(tokenizer, messages)
  if max_length is not None and len(rendered.ids) - 1 > max_length:
    messages = truncate_history(messages, tokenizer, max_length)
    rendered = render(tokenizer, messages)
  trained = set(trained_message_indices(messages))
  ids = np.asarray(rendered.ids, np.int32)
  mask = np.zeros(len(ids), np.int32)
  for index, start, end in rendered.assistant_spans:
    if index in trained:
      mask[start:end] = 1
  if max_length is not None and len(ids) - 1 > max_length:
    raise TruncationError(
        f"conversation is {len(ids) - 1} training positions after dropping all droppable history; max_length "
        f"{max_length} would cut a trained assistant message", length=len(ids) - 1, max_length=max_length)
  return ids[:-1], ids[1:], mask[1:]


def _head_length(messages: Sequence[Message]) -> int:
  """Length of the RISE head: [system], instruction user turn, example answer, question user turn."""
  offset = 1 if messages and messages[0].get("role") == "system" else 0
  roles = [m.get("role") for m in messages[offset:offset + 3]]
  if roles != ["user", "assistant", "user"]:
    raise templates_lib.ChatTemplateError(
        f"expected the RISE head [system], user (instruction), assistant (example answer), user (question); got "
        f"roles {[m.get('role') for m in messages[:offset + 3]]}")
  return offset + 3


def _attempt_pairs(messages: Sequence[Message]) -> tuple[int, int, bool]:
  """(head_length, number of (attempt, feedback) pairs, whether a final assistant message follows them)."""
  head = _head_length(messages)
  tail = messages[head:]
  for j, m in enumerate(tail):
    want = "assistant" if j % 2 == 0 else "user"
    if m.get("role") != want:
      raise templates_lib.ChatTemplateError(f"message {head + j}: expected role {want} after the RISE head "
                                            f"(attempt, feedback, attempt, ...), got {m.get('role')}")
  return head, len(tail) // 2, len(tail) % 2 == 1


def attempts(messages: Sequence[Message]) -> list[str]:
  """The attempts that feedback followed, after the RISE head, oldest first (none at turn 1, or under a history
  window of 1)."""
  head, pairs, _ = _attempt_pairs(messages)
  return [messages[head + 2 * i]["content"] for i in range(pairs)]


def window(messages: Sequence[Message], W: int | None) -> list[Message]:
  """RISE's inference-time sliding history window (contracts §2).

  Keeps the head — an optional system message, the instruction user turn, its example-answer assistant turn and
  the question user turn — then only the last W - 1 (attempt, feedback) pairs. The state before generating turn t
  is head + pairs ending with a feedback user turn, so the model sees the question and its W - 1 most recent
  attempts with their feedback; a trailing assistant message (the reply to that state, when present) is kept
  and not counted. W=None keeps everything.

  W = 1 keeps the head alone: every attempt is made as if it were the first (RISE's collection uses it to draw a
  model's attempts as independent first-turn samples while it cannot yet read a history). The reference
  (cmu-mind/RISE workflow_eval.py) keeps `history[-W + 1:]`, which for W = 1 is `history[-0:]`, i.e. the whole
  history rather than none: that quirk is deliberately not reproduced.
  """
  if W is None:
    return list(messages)
  if not isinstance(W, int) or W < 1:
    raise ValueError(f"window W must be an int >= 1 (or None for the full history), got {W!r}")
  head, pairs, trailing = _attempt_pairs(messages)
  keep_from = head + 2 * max(0, pairs - (W - 1))
  return list(messages[:head]) + list(messages[keep_from:])


def truncate_history(messages: Sequence[Message], tokenizer, max_length: int) -> list[Message]:
  """Drops the oldest (attempt, feedback) pairs until the conversation has <= max_length training positions.

  Keeps the head (instruction, example answer, question) and every pair that holds a trained message. Returns the
  messages unchanged when they fit, or the shortest droppable version otherwise (train_arrays then reports a cut).
  A conversation without the RISE head (e.g. plain single-exchange SFT) has no droppable history.
  """
  messages = list(messages)
  if rendered_length(tokenizer, messages) - 1 <= max_length:
    return messages
  try:
    head, pairs, _ = _attempt_pairs(messages)
  except templates_lib.ChatTemplateError:
    return messages
  trained = set(trained_message_indices(messages))
  # Keep the "train" flags attached: a dropped pair must hold no trained message.
  droppable = 0
  while droppable < pairs and not ({head + 2 * droppable, head + 2 * droppable + 1} & trained):
    droppable += 1
  for drop in range(1, droppable + 1):
    candidate = messages[:head] + messages[head + 2 * drop:]
    if rendered_length(tokenizer, candidate) - 1 <= max_length:
      return candidate
  return messages[:head] + messages[head + 2 * droppable:]


def continuation_ids(tokenizer, messages_before: Sequence[Message], messages_after: Sequence[Message],
                     add_generation_prompt: bool = True) -> list[int] | None:
  """Ids to append to render(messages_before) to get render(messages_after), both with the same
  add_generation_prompt; None when the former is not a prefix of the latter (re-prefill instead)."""
  before = render(tokenizer, messages_before, add_generation_prompt=add_generation_prompt).ids
  after = render(tokenizer, messages_after, add_generation_prompt=add_generation_prompt).ids
  if after[:len(before)] != before:
    return None
  return after[len(before):]
