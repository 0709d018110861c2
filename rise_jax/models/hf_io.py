"""Hugging Face safetensors checkpoints <-> rise_jax Transformers, both ways, one tensor at a time.

Loading reads `config.json` (through transformers' config class), then every tensor of a single
`model.safetensors` or a sharded `model.safetensors.index.json`, converts it to the head-explicit stacked layout
and places it straight into its target sharding; a GGUF file is first converted into a cached HF directory
(rise_jax.gguf.as_hf_dir). Saving writes a directory that transformers and vLLM load as is. Any disagreement
(missing or extra tensor, wrong shape) is an error naming the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from rise_jax import gguf, hf_files, sharding as sharding_lib
from rise_jax.chat import templates
from rise_jax.hf_files import INDEX_FILE, MAX_SHARD_BYTES, SINGLE_FILE, remove_partial_exports, tmp_prefix
from rise_jax.models.build import abstract_model
from rise_jax.models.configs import ModelConfig
from rise_jax.models.transformer import Transformer

# Buffers some older checkpoints carry that are recomputed from the config, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# -- the layout map: rise_jax leaf <-> HF tensor(s) ---------------------------------------------------------

def _layer_map(c: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """Per-layer leaf -> (HF name suffix, hf->ours, ours->hf). HF Linear weights are [out, in]."""
  D, H, KV, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  ident = lambda w: w
  return {
      "attn_norm": ("input_layernorm.weight", ident, ident),
      "q_proj": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, hd), lambda w: w.reshape(D, H * hd).T),
      "k_proj": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, KV, hd), lambda w: w.reshape(D, KV * hd).T),
      "v_proj": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, KV, hd), lambda w: w.reshape(D, KV * hd).T),
      "o_proj": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, hd, D), lambda w: w.reshape(H * hd, D).T),
      "mlp_norm": ("post_attention_layernorm.weight", ident, ident),
      "gate_proj": ("mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
      "up_proj": ("mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
      "down_proj": ("mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
  }


def hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name this config implies, with its shape (what a checkpoint must hold, exactly)."""
  D, F = c.hidden_size, c.intermediate_size
  qo, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  per_layer = {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (qo, D),
               "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
               "self_attn.o_proj.weight": (D, qo), "post_attention_layernorm.weight": (D,),
               "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F)}
  out = {"model.embed_tokens.weight": (c.vocab_size, D)}
  for i in range(c.num_layers):
    out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
  out["model.norm.weight"] = (D,)
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = (c.vocab_size, D)
  return out


# -- reading ------------------------------------------------------------------------------------------------

class _TensorReader:
  """Lazy access to the tensors of a single-file or index-sharded safetensors checkpoint."""

  def __init__(self, path: str):
    self._open = safe_open
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
      self.file_of = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
      for fname in sorted(set(self.file_of.values())):
        if not os.path.isfile(fname):
          raise FileNotFoundError(f"{index} names {os.path.basename(fname)}, which is missing from {path}")
    elif os.path.isfile(single):
      with self._safe_open(single) as f:
        self.file_of = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    value = self._handle(name).get_tensor(name)
    # A NaN or inf weight would surface much later as NaN log-probs or loss, blamed on the data: refused here.
    if value.dtype.kind in "fcV" and not np.isfinite(value).all():
      bad = np.flatnonzero(~np.isfinite(value.reshape(-1)))
      raise ValueError(f"{self.file_of[name]}: tensor {name} holds {bad.size} non-finite value(s) (NaN or inf; "
                       f"first at flat index {int(bad[0])}): the checkpoint is damaged or was saved from a diverged "
                       "run; re-export it from a good checkpoint")
    return value

  def __enter__(self) -> "_TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def _safe_open(self, fname: str):
    """safe_open, its errors (a truncated or corrupt file: "incomplete metadata") naming the file."""
    try:
      return self._open(fname, "numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError is not importable by a stable name
      raise ValueError(f"{fname}: unreadable safetensors file, truncated or corrupt? ({type(e).__name__}: {e})") \
          from None

  def _handle(self, name: str):
    fname = self.file_of[name]
    if fname not in self._handles:
      self._handles[fname] = self._safe_open(fname).__enter__()
    return self._handles[fname]


def _check_tensors(reader: _TensorReader, c: ModelConfig, path: str) -> None:
  want = hf_shapes(c)
  have = {n for n in reader.names() if not n.endswith(IGNORED_SUFFIXES)}
  if c.tie_word_embeddings:
    have.discard("lm_head.weight")  # a tied checkpoint may still store the head; it is checked equal below
  missing = sorted(set(want) - have)
  extra = sorted(have - set(want))
  if missing:
    raise ValueError(f"{path}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                     f"({len(missing)} in all) for the architecture in config.json")
  if extra:
    raise ValueError(f"{path}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                     f"({len(extra)} in all) that config.json does not account for")
  for name, shape in want.items():
    got = reader.shape(name)
    if got != shape:
      raise ValueError(f"{path}: tensor {name} has shape {got}, but config.json implies {shape}")


def _leaf_arrays(reader: _TensorReader, c: ModelConfig, np_dtype) -> Iterator[tuple[tuple[str, ...], Callable]]:
  """(leaf path, loader) per rise_jax leaf; each loader reads and converts only its own tensors."""
  cast = lambda w: np.asarray(w).astype(np_dtype)
  yield ("embedder",), lambda: cast(reader.get("model.embed_tokens.weight"))
  for leaf, (suffix, to_ours, _) in _layer_map(c).items():
    yield ("layers", leaf), (lambda suffix=suffix, to_ours=to_ours: np.stack(
        [cast(to_ours(reader.get(f"model.layers.{i}.{suffix}"))) for i in range(c.num_layers)]))
  yield ("final_norm",), lambda: cast(reader.get("model.norm.weight"))
  if not c.tie_word_embeddings:
    yield ("lm_head",), lambda: cast(reader.get("lm_head.weight").T)


def _place(value: np.ndarray, expected: tuple[int, ...], sharding, leaf: tuple[str, ...], path: str) -> jax.Array:
  """One host array -> a global array in `sharding`; each device receives only its own slice."""
  if value.shape != expected:  # unreachable after _check_tensors; guards the layout map itself
    raise ValueError(f"{path}: leaf {'/'.join(leaf)} converted to {value.shape}, expected {expected}")
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = "float32", mesh: Mesh | None = None, *,
                       compute_dtype: Any = None, attention: str = "xla", scan_layers: bool = False,
                       remat: str = "none", rules=sharding_lib.TRAIN_RULES,
                       on_indivisible: str = "replicate") -> Transformer:
  """Load a Llama / Mistral safetensors checkpoint directory (or a GGUF file) into a (sharded) Transformer.

  `dtype` is the parameter dtype; `compute_dtype` defaults to it. Each tensor is read, converted and placed into
  its shard of `mesh` (a 1-device mesh when None) before the next is read.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(gguf.SUFFIX):
    path = gguf.as_hf_dir(path)  # converted once into a cached HF directory, then read like any other
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a checkpoint directory (nor a {gguf.SUFFIX} file)")
  config = ModelConfig.from_hf(path)
  mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
  options = dict(param_dtype=dtype, dtype=dtype if compute_dtype is None else compute_dtype, attention=attention,
                 scan_layers=scan_layers, remat=remat)
  with _TensorReader(path) as reader:
    _check_tensors(reader, config, path)
    if config.tie_word_embeddings and "lm_head.weight" in reader.names():
      if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise ValueError(f"{path}: tie_word_embeddings is true but tensor lm_head.weight differs from "
                         "model.embed_tokens.weight")
    graphdef, state, shardings = abstract_model(config, mesh, rules, on_indivisible, **options)
    np_dtype = _NP_DTYPES[str(jax.numpy.dtype(dtype))]
    flat_sh = dict(nnx.to_flat_state(shardings))
    flat = dict(nnx.to_flat_state(state))
    leaves = list(_leaf_arrays(reader, config, np_dtype))
    for leaf, load in tqdm(leaves, desc=f"loading {os.path.basename(path)}", unit="leaf", leave=False):
      flat[leaf].set_value(_place(load(), flat[leaf].get_value().shape, flat_sh[leaf].get_value(), leaf, path))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# -- writing ------------------------------------------------------------------------------------------------

def _host(x: jax.Array) -> np.ndarray:
  """A full copy of a (possibly multi-host sharded) array on this host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
  """(HF name, producer) in checkpoint order; each stacked leaf is gathered once, then sliced per layer."""
  c = model.config
  yield "model.embed_tokens.weight", lambda: _host(model.embedder[...])
  cache: dict[str, np.ndarray] = {}

  def layer_tensor(leaf, i, to_hf):
    if leaf not in cache:
      cache.clear()  # only one stacked leaf lives on the host at a time
      cache[leaf] = _host(model.layers[leaf][...])
    return np.ascontiguousarray(to_hf(cache[leaf][i]))

  for leaf, (suffix, _, to_hf) in _layer_map(c).items():
    for i in range(c.num_layers):
      yield f"model.layers.{i}.{suffix}", (lambda leaf=leaf, i=i, to_hf=to_hf: layer_tensor(leaf, i, to_hf))
  yield "model.norm.weight", lambda: _host(model.final_norm[...])
  if model.lm_head is not None:
    yield "lm_head.weight", lambda: np.ascontiguousarray(_host(model.lm_head[...]).T)


def _write_order(c: ModelConfig) -> list[str]:
  """HF names in the order `_hf_tensors` produces them (leaf-major), so shards fill one after another."""
  names = ["model.embed_tokens.weight"]
  for suffix, _, _ in _layer_map(c).values():
    names += [f"model.layers.{i}.{suffix}" for i in range(c.num_layers)]
  names.append("model.norm.weight")
  if not c.tie_word_embeddings:
    names.append("lm_head.weight")
  return names


def _plan_shards(c: ModelConfig, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
  shapes = hf_shapes(c)
  return hf_files.plan_shards(((name, int(np.prod(shapes[name])) * itemsize) for name in _write_order(c)),
                              max_shard_bytes)


def _template_source(chat_template: str) -> str:
  """Jinja text as is; a name resolves through rise_jax.chat's template registry."""
  if "{%" in chat_template or "{{" in chat_template:
    return chat_template
  return templates.get_template(chat_template).source


def _save_tokenizer(tokenizer: Any, chat_template: str | None, path: str) -> None:
  if tokenizer is None:
    if chat_template is not None:
      raise ValueError("save_hf_checkpoint: chat_template given without a tokenizer to store it with")
    return
  if chat_template is None and hasattr(tokenizer, "hf") and hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(path)  # a ChatTokenizer: HF files + its own template (+ tokenizer.model)
    return
  hf_tok = getattr(tokenizer, "hf", tokenizer)
  if chat_template is not None:
    hf_tok.chat_template = _template_source(chat_template)
  hf_tok.save_pretrained(path)


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, tokenizer: Any = None,
                       chat_template: str | None = None, *, max_shard_bytes: int = MAX_SHARD_BYTES,
                       overwrite: bool = False) -> str:
  """Write `model` as an HF checkpoint directory (config.json, generation_config.json, safetensors, tokenizer).

  Tensors are gathered leaf by leaf; process 0 writes. The directory appears atomically (built beside `path`,
  then renamed). `tokenizer` is an HF tokenizer or anything with an `.hf` attribute holding one (rise_jax's
  ChatTokenizer, saved with its own template); `chat_template` (jinja text or a rise_jax template name) overrides
  the template stored with it. Returns the path.
  """
  import transformers
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
  c = model.config
  param_dtype = str(model.param_dtype)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  if writer:
    remove_partial_exports(path)
  tmp = tempfile.mkdtemp(prefix=tmp_prefix(path), dir=os.path.dirname(path)) if writer else None
  try:
    if writer:
      hf_config = c.to_hf()
      hf_config.dtype = param_dtype
      hf_config.save_pretrained(tmp)
      eos = list(c.eos_token_id)
      transformers.GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
                                    pad_token_id=c.pad_token_id).save_pretrained(tmp)
    shards = _plan_shards(c, np.dtype(_NP_DTYPES[param_dtype]).itemsize, max_shard_bytes)
    files = hf_files.shard_names(len(shards))
    shard_of = {name: k for k, names in enumerate(shards) for name in names}
    pending: dict[str, np.ndarray] = {}
    total = 0
    for name, produce in tqdm(list(_hf_tensors(model)), desc=f"saving {os.path.basename(path)}", unit="tensor",
                              leave=False, disable=not writer):
      array = produce()  # every process joins the gather; only process 0 keeps the result
      if not writer:
        continue
      pending[name] = array
      total += array.nbytes
      k = shard_of[name]
      if len(pending) == len(shards[k]):
        save_file(pending, os.path.join(tmp, files[k]), metadata={"format": "pt"})
        pending = {}
    if writer:
      if len(shards) > 1:
        hf_files.write_index(tmp, {name: files[shard_of[name]] for name in hf_shapes(c)}, total)
      _save_tokenizer(tokenizer, chat_template, tmp)
      if os.path.exists(path):
        shutil.rmtree(path)
      os.replace(tmp, path)
      tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      shutil.rmtree(tmp)
  return path
