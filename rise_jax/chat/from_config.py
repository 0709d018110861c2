"""The one tokenizer resolution rule every command follows (the RISE loop, `rise_jax.evaluate`, the trainer)."""

from __future__ import annotations

import os
import pathlib

from rise_jax import gguf
from rise_jax.chat.tokenizer import ChatTokenizer, load_tokenizer
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer


def tokenizer_path(cfg, build_dir: str | os.PathLike | None = None) -> str:
  """`tokenizer.path`; else the HF checkpoint's own (`model.source = "hf"`; a `.gguf` file's is in its converted
  directory); else, for the toy task, the toy tokenizer built under `<build_dir>/tokenizer` (a pure function of
  the code: a resumed run rebuilds it identically). Anything else has no tokenizer and is an error naming the
  field."""
  if cfg.tokenizer.path is not None:
    return _gguf_as_dir(cfg.tokenizer.path)
  if cfg.model.source == "hf":
    return _gguf_as_dir(cfg.model.hf_path)
  if cfg.task.name == "toy" and build_dir is not None:
    return build_toy_tokenizer(pathlib.Path(build_dir) / "tokenizer")
  raise ValueError("config field tokenizer.path: required (a preset model on a non-toy task has no tokenizer)")


def _gguf_as_dir(path: str) -> str:
  """A .gguf file's converted directory; anything else (a directory, a hub id) as is."""
  return gguf.as_hf_dir(path) if gguf.is_gguf(path) else path


def tokenizer_from_config(cfg, build_dir: str | os.PathLike | None = None) -> ChatTokenizer:
  """The tokenizer of `tokenizer_path`, with `tokenizer.chat_template`."""
  return load_tokenizer(tokenizer_path(cfg, build_dir), cfg.tokenizer.chat_template)
