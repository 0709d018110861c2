"""The one tokenizer resolution rule every command follows, on explicit arguments (`config.tokenizer_args` maps a
config onto them)."""

from __future__ import annotations

import os
import pathlib

from rise_jax import gguf
from rise_jax.chat.tokenizer import ChatTokenizer, load_tokenizer
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer


def tokenizer_source(path: str | None = None, *, checkpoint: str | None = None,
                     toy_dir: str | os.PathLike | None = None) -> str:
  """`path`; else the checkpoint's own tokenizer (a `.gguf` file's is in its converted directory); else the toy
  tokenizer built under `<toy_dir>/tokenizer` (a pure function of the code: a resumed run rebuilds it
  identically)."""
  if path is not None:
    return _gguf_as_dir(path)
  if checkpoint is not None:
    return _gguf_as_dir(checkpoint)
  if toy_dir is not None:
    return build_toy_tokenizer(pathlib.Path(toy_dir) / "tokenizer")
  raise ValueError("no tokenizer: give a tokenizer path, a checkpoint that has one, or a directory to build the "
                   "toy tokenizer in")


def _gguf_as_dir(path: str) -> str:
  """A .gguf file's converted directory; anything else (a directory, a hub id) as is."""
  return gguf.as_hf_dir(path) if gguf.is_gguf(path) else path


def resolve_tokenizer(path: str | None = None, *, checkpoint: str | None = None,
                      toy_dir: str | os.PathLike | None = None, chat_template: str = "auto") -> ChatTokenizer:
  """The tokenizer of `tokenizer_source`, with `chat_template`."""
  return load_tokenizer(tokenizer_source(path, checkpoint=checkpoint, toy_dir=toy_dir), chat_template)
