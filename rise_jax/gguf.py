"""GGUF (llama.cpp) files -> Hugging Face checkpoint directories, so every loader above reads one format.

`convert_gguf(src, dst)` writes config.json, generation_config.json, float32 safetensors (dequantised with
`gguf.quants`, one tensor at a time, sharded like models/hf_io.py's exports), the tokenizer with the file's chat
template, and `rise_jax_gguf.json` (which file it came from: name, size, sha256). `as_hf_dir(path)` is what
loaders call: a directory is returned as is; a `.gguf` file is converted once into `$RISE_JAX_CACHE/gguf/`.

Llama and Mistral only (GGUF calls both `llama`; transformers tells Mistral by `general.name`). This module sits
on the bottom floor because both tokenizer resolution (chat/) and checkpoint loading (models/) call it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from importlib.metadata import version
from typing import Any, Iterator

import numpy as np

from rise_jax import files, hf_files

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
PROVENANCE_FILE = "rise_jax_gguf.json"
# Bumped whenever the conversion's output changes: a cached directory of another format version is rebuilt.
FORMAT_VERSION = 1
CACHE_ENV = "RISE_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/rise_jax"
SUPPORTED_ARCHITECTURES = ("llama",)  # general.architecture; Mistral files say llama too
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's value when llama.rope.freq_base is absent

# GGUF per-layer tensor -> HF suffix under model.layers.{i}.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


class GGUFError(ValueError):
  """A GGUF file this converter cannot turn into a checkpoint; the message names the file and the field."""


# -- reading the file ---------------------------------------------------------------------------------------------

class _Metadata:
  """The key/value fields of a GGUF file; a missing required key is an error naming the file and the key."""

  def __init__(self, reader: Any, src: str):
    self._fields, self.src = reader.fields, src

  def get(self, key: str, default: Any = None) -> Any:
    field = self._fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str) -> Any:
    if key not in self._fields:
      raise GGUFError(f"{self.src}: metadata key {key} is missing")
    return self.get(key)


def _gguf_package():
  """The gguf package, imported on first use: it costs ~0.25 s, and every command imports this module."""
  import gguf
  return gguf


def _open(src: str):
  gguf = _gguf_package()
  try:
    return gguf.GGUFReader(src)
  except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError on a bad file
    raise GGUFError(f"{src}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row order: per head it interleaves the two rotary halves (rows i, i + hd/2 adjacent)."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- config ------------------------------------------------------------------------------------------------------

def _hf_config(meta: _Metadata, tied: bool, vocab_from_tokens: int | None):
  import transformers
  src = meta.src
  arch = meta.require("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(f"{src}: general.architecture {arch!r} is not supported (supported: llama and mistral, "
                    "which GGUF files also call llama)")
  p = f"{arch}."
  scaling = meta.get(p + "rope.scaling.type")
  if scaling not in (None, "none"):
    raise GGUFError(f"{src}: {p}rope.scaling.type = {scaling!r}: rope scaling is not supported from GGUF")
  hidden, heads = int(meta.require(p + "embedding_length")), int(meta.require(p + "attention.head_count"))
  kv_heads = int(meta.get(p + "attention.head_count_kv", heads))  # llama.cpp's default: no grouping
  head_dim = meta.get(p + "attention.key_length", meta.get(p + "rope.dimension_count"))
  head_dim = int(head_dim) if head_dim is not None else hidden // heads
  vocab = meta.get(p + "vocab_size", vocab_from_tokens)
  if vocab is None:
    raise GGUFError(f"{src}: metadata key {p}vocab_size is missing and there is no tokenizer.ggml.tokens")
  pad = meta.get("tokenizer.ggml.padding_token_id")
  common = dict(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(meta.require(p + "feed_forward_length")),
      num_hidden_layers=int(meta.require(p + "block_count")), num_attention_heads=heads,
      num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
      max_position_embeddings=int(meta.require(p + "context_length")),
      rms_norm_eps=float(meta.require(p + "attention.layer_norm_rms_epsilon")), tie_word_embeddings=tied,
      bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
      eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")), pad_token_id=_opt_int(pad),
      rope_parameters={"rope_type": "default",
                       "rope_theta": float(meta.get(p + "rope.freq_base", DEFAULT_ROPE_THETA))})
  window = meta.get(p + "attention.sliding_window")
  if "mistral" in str(meta.get("general.name", "")).lower() or window is not None:
    cfg = transformers.MistralConfig(sliding_window=_opt_int(window), **common)
    cfg.architectures = ["MistralForCausalLM"]
  else:
    cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    cfg.architectures = ["LlamaForCausalLM"]
  cfg.dtype = "float32"
  return cfg


def _opt_int(value: Any) -> int | None:
  return None if value is None else int(value)


# -- tensors -----------------------------------------------------------------------------------------------------

def _hf_name(gguf_name: str) -> str | None:
  if gguf_name in _TOP_TENSORS:
    return _TOP_TENSORS[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
    return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"
  return None


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Every HF tensor the config implies, [out, in] like torch Linear weights."""
  D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  qo, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  per_layer = {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (qo, D),
               "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
               "self_attn.o_proj.weight": (D, qo), "post_attention_layernorm.weight": (D,),
               "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F)}
  out = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
  for i in range(cfg.num_hidden_layers):
    out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = (cfg.vocab_size, D)
  return out


def _check_tensors(reader: Any, cfg, src: str) -> list[tuple[str, Any]]:
  """(HF name, GGUF tensor) in file order, after checking names, shapes and quantisation types."""
  gguf = _gguf_package()
  want = _expected_shapes(cfg)
  mapped, unknown = [], []
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name in want:
      mapped.append((name, t))
    else:
      unknown.append(t.name)  # e.g. output.weight beyond vocab, rope_freqs.weight (llama3 scaling), biases
  if unknown:
    raise GGUFError(f"{src}: unexpected tensor(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                    f"({len(unknown)} in all) for a {cfg.architectures[0]} with the file's metadata")
  missing = sorted(set(want) - {name for name, _ in mapped})
  if missing:
    raise GGUFError(f"{src}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                    f"({len(missing)} in all) that the file's metadata implies")
  for name, t in mapped:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    if shape != want[name]:
      raise GGUFError(f"{src}: tensor {t.name} has shape {shape} (as {name}), but the metadata implies "
                      f"{want[name]}")
    try:  # one row is enough to learn whether gguf.quants implements this type
      gguf.quants.dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
    except NotImplementedError:
      raise GGUFError(f"{src}: tensor {t.name} has quantisation type {t.tensor_type.name}, which gguf.quants "
                      f"(gguf {_gguf_version()}) cannot dequantise") from None
  return mapped


def _gguf_version() -> str:
  return version("gguf")


def _dequantised(name: str, t: Any, cfg) -> np.ndarray:
  gguf = _gguf_package()
  w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
  w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
  if name.endswith("self_attn.q_proj.weight"):
    w = _unpermute(w, cfg.num_attention_heads)
  elif name.endswith("self_attn.k_proj.weight"):
    w = _unpermute(w, cfg.num_key_value_heads)
  return np.ascontiguousarray(w)


def _write_weights(mapped: list[tuple[str, Any]], cfg, out: str, max_shard_bytes: int) -> None:
  from safetensors.numpy import save_file
  shapes = _expected_shapes(cfg)
  shards = hf_files.plan_shards(((name, int(np.prod(shapes[name])) * 4) for name, _ in mapped), max_shard_bytes)
  names = hf_files.shard_names(len(shards))
  shard_of = {name: k for k, shard in enumerate(shards) for name in shard}
  pending: dict[str, np.ndarray] = {}
  total = 0
  for name, t in mapped:  # only the current shard's float32 tensors are held
    pending[name] = _dequantised(name, t, cfg)
    total += pending[name].nbytes
    k = shard_of[name]
    if len(pending) == len(shards[k]):
      save_file(pending, os.path.join(out, names[k]), metadata={"format": "pt"})
      pending = {}
  if len(shards) > 1:
    hf_files.write_index(out, {name: names[shard_of[name]] for name, _ in mapped}, total)


# -- tokenizer ---------------------------------------------------------------------------------------------------

# GGUF tokenizer key -> the field name transformers' GGUF tokenizer builder reads.
_TOKENIZER_FIELDS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _save_tokenizer(meta: _Metadata, out: str) -> None:
  """tokenizer.json + tokenizer_config.json, built as transformers builds them from a GGUF (its torch-free
  tokenizer builder, fed the fields read here), carrying the file's chat template and special tokens."""
  import transformers
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  tokens = meta.require("tokenizer.ggml.tokens")
  fields = {name: meta.get(f"tokenizer.{key}") for key, name in _TOKENIZER_FIELDS.items()}
  fields = {k: v for k, v in fields.items() if v is not None}
  try:
    backend, _ = convert_gguf_tokenizer(meta.require("general.architecture"), fields)
  except ValueError as e:
    raise GGUFError(f"{meta.src}: tokenizer.ggml.model {fields.get('tokenizer_type')!r}: {e}") from None
  except KeyError as e:  # the builder needs a field this file lacks (a vocabulary without merges needs scores)
    key = {name: key for key, name in _TOKENIZER_FIELDS.items()}.get(e.args[0], e.args[0])
    raise GGUFError(f"{meta.src}: metadata key tokenizer.{key} is missing (the "
                    f"{fields.get('tokenizer_type')!r} tokenizer needs it)") from None
  kwargs: dict[str, Any] = {}
  for key in ("chat_template", "ggml.add_bos_token", "ggml.add_eos_token"):
    value = meta.get(f"tokenizer.{key}")
    if value is not None:
      kwargs[key.removeprefix("ggml.")] = value
  if fields.get("tokenizer_type") == "llama":
    kwargs.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
  for name, key in _SPECIAL_IDS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= int(token_id) < len(tokens):
        raise GGUFError(f"{meta.src}: tokenizer.ggml.{key} = {token_id} is outside the {len(tokens)} tokens")
      kwargs[name] = tokens[int(token_id)]
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
  tok.save_pretrained(out)


# -- the directory -----------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
  stat = os.stat(path)
  return _sha256_of(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
  """sha256 of a file, once per process for the same size and mtime (a run resolves its checkpoint for the
  tokenizer and for every model load; a 7B file takes seconds)."""
  del size, mtime_ns  # the cache key: a rewritten file is hashed again
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_bytes: int = hf_files.MAX_SHARD_BYTES,
                 overwrite: bool = False, sha256: str | None = None) -> str:
  """Write the HF checkpoint directory for GGUF file `src` at `dst` (atomically: built beside it, then renamed).

  Every check of the weights (architecture, metadata, tensor names, shapes, quantisation types) runs before
  anything is written, and the tokenizer is built before the weights are dequantised. `sha256` of `src` may be passed when already known. Returns the absolute path of `dst`.
  """
  import transformers
  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  if not os.path.isfile(src):
    raise FileNotFoundError(f"{src}: no such GGUF file")
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not overwrite:
    raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True to replace it)")
  reader = _open(src)
  meta = _Metadata(reader, src)
  tokens = meta.get("tokenizer.ggml.tokens")
  tied = "output.weight" not in {t.name for t in reader.tensors}
  cfg = _hf_config(meta, tied, None if tokens is None else len(tokens))
  mapped = _check_tensors(reader, cfg, src)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  hf_files.remove_partial_exports(dst)
  tmp = tempfile.mkdtemp(prefix=hf_files.tmp_prefix(dst), dir=os.path.dirname(dst))
  try:
    cfg.save_pretrained(tmp)
    transformers.GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                  pad_token_id=cfg.pad_token_id).save_pretrained(tmp)
    _save_tokenizer(meta, tmp)  # before the weights: its errors should not wait for gigabytes of dequantising
    _write_weights(mapped, cfg, tmp, max_shard_bytes)
    files.atomic_write_json(os.path.join(tmp, PROVENANCE_FILE), {
        "source": os.path.basename(src), "size": os.path.getsize(src), "sha256": sha256 or _sha256(src),
        "format_version": FORMAT_VERSION,
        "gguf_version": _gguf_version(), "file_type": meta.get("general.file_type"),
        "name": meta.get("general.name")})
    if os.path.exists(dst):
      shutil.rmtree(dst) if os.path.isdir(dst) else os.unlink(dst)
    os.replace(tmp, dst)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp)
  log.info("converted %s -> %s", src, dst)
  return dst


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _complete(path: pathlib.Path, sha256: str) -> bool:
  try:
    provenance = json.loads((path / PROVENANCE_FILE).read_text())
  except (OSError, ValueError):
    return False
  return provenance.get("sha256") == sha256 and provenance.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
  """One converter per cache entry on this host; a second process waits, then finds the directory done."""
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_gguf(path: str | os.PathLike | None) -> bool:
  """Whether `path` names a GGUF file (by its suffix: a hub id or a directory never ends in .gguf)."""
  return path is not None and os.fspath(path).endswith(SUFFIX)


def as_hf_dir(path: str | os.PathLike) -> str:
  """An HF checkpoint directory for `path`: a directory as is, a `.gguf` file converted once into
  `$RISE_JAX_CACHE/gguf/<stem>-<sha256[:16]>` (reused while its provenance names the same file contents)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory or GGUF file")
  if not path.endswith(SUFFIX):
    raise ValueError(f"{path}: a file, but not a {SUFFIX} file (a checkpoint is a directory or a GGUF file)")
  sha = _sha256(path)
  target = cache_root() / "gguf" / f"{pathlib.Path(path).stem}-{sha[:16]}"
  if _complete(target, sha):
    return str(target)
  with _locked(target.parent / f".{target.name}.lock"):
    if not _complete(target, sha):
      log.info("converting %s into %s (once; later loads reuse it)", path, target)
      convert_gguf(path, target, overwrite=True, sha256=sha)
  return str(target)
