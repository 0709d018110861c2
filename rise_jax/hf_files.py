"""The file layout of a Hugging Face safetensors checkpoint directory, shared by every writer of one (the
rise_jax exporter in models/hf_io.py and the GGUF converter in gguf.py, which sits below models).

- `SINGLE_FILE` / `INDEX_FILE` / `shard_names`: one `model.safetensors`, or numbered shards plus an index.
- `plan_shards`: tensors in write order, cut into shards of at most `MAX_SHARD_BYTES` (a tensor is never split).
- `tmp_prefix` / `remove_partial_exports`: a directory is built beside its target under a temporary name, then
  renamed; a killed writer's leftovers for the same target are removed by the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """(name, nbytes) in write order -> lists of names, one per shard, each within max_shard_bytes when possible."""
  shards, current, size = [], [], 0
  for name, nbytes in sizes:
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  shards.append(current)
  return shards


def shard_names(count: int) -> list[str]:
  return [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(path: str, weight_map: dict[str, str], total_size: int) -> None:
  """`model.safetensors.index.json` in `path` (only for a sharded checkpoint)."""
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def tmp_prefix(path: str) -> str:
  return ".tmp-" + os.path.basename(path)


def remove_partial_exports(path: str) -> None:
  """Delete the half-built exports of `path` that a killed writer left beside it (gigabytes at 7B). Only
  mkdtemp's names for this target match; callers hold the target's one-writer guarantee."""
  parent, prefix = os.path.dirname(path), tmp_prefix(path)
  pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
  for name in os.listdir(parent):
    if pattern.fullmatch(name) and os.path.isdir(os.path.join(parent, name)):
      shutil.rmtree(os.path.join(parent, name))
