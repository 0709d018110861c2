"""rise_jax.chat: the only code that turns messages into tokens (contracts §2).

The engine's policy, the trainer and the evaluator all render through here, so training and sampling contexts cannot
drift. Public API: load_tokenizer, ChatTokenizer, check_vocab, render, RenderedChat, train_arrays,
truncate_history, window, attempts, continuation_ids, register_template, get_template, build_toy_tokenizer
(the toy task's char-level vocabulary), resolve_tokenizer (the one resolution rule: a path, a checkpoint's own,
the toy's).
"""

from rise_jax.chat.rendering import (RenderedChat, SpanAlignmentError, TruncationError, continuation_ids,
                                     attempts, render, rendered_length, train_arrays, trained_message_indices,
                                     truncate_history, window)
from rise_jax.chat.templates import (ChatTemplateError, TemplateSpec, get_template, register_template,
                                     shipped_templates)
from rise_jax.chat.tokenizer import ChatTokenizer, TokenizerLoadError, check_vocab, load_tokenizer
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
from rise_jax.chat.resolve import resolve_tokenizer, tokenizer_source

__all__ = [
    "ChatTemplateError", "ChatTokenizer", "RenderedChat", "SpanAlignmentError", "TemplateSpec",
    "TokenizerLoadError", "TruncationError", "build_toy_tokenizer", "check_vocab", "continuation_ids",
    "attempts", "get_template", "load_tokenizer", "register_template", "render", "rendered_length",
    "resolve_tokenizer", "shipped_templates", "tokenizer_source", "train_arrays", "trained_message_indices",
    "truncate_history", "window",
]
