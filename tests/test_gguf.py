"""GGUF import (rise_jax.gguf): tiny synthetic files written with gguf.GGUFWriter, then the real SmolLM2-135M
Q4_1 file against transformers' own GGUF loader (the reference).

Real-weights metric: float32 logits within 1e-5 of max |ref| and argmax equal at every position, prompts alone
and left-padded together. The converted directory, loaded by transformers itself, must give transformers' GGUF
logits exactly (same dequantisation, q/k order undone, embeddings tied).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rise_jax import gguf as rj_gguf
from rise_jax.models import load_hf_checkpoint
from rise_jax.models import convert

gguf = pytest.importorskip("gguf")

LOGIT_TOL = 1e-5  # of max |ref|
PROMPT_LENGTHS = (20, 13, 7)  # tokens of real GSM8K questions; short because the CPU pays for 30 layers
FALLBACK_PROMPTS = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
                    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
                    "Betty is saving money for a new wallet which costs $100.")


# -- tiny synthetic GGUF files ----------------------------------------------------------------------------------

TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)


def _byte_vocab() -> list[str]:
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return ["<|endoftext|>", "<s>", "</s>"] + list(bytes_to_unicode().values()) + ["Ġt"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's `permute` (HF rotate-half rows -> interleaved pairs), written out here."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_tensors(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  L, D, H, KV, F = (TINY[k] for k in ("layers", "hidden", "heads", "kv_heads", "ffn"))
  hd, V = D // H, len(_byte_vocab())
  out = {"model.embed_tokens.weight": rng.randn(V, D), "model.norm.weight": 1 + 0.1 * rng.randn(D)}
  for i in range(L):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": 1 + 0.1 * rng.randn(D),
                p + "self_attn.q_proj.weight": rng.randn(H * hd, D),
                p + "self_attn.k_proj.weight": rng.randn(KV * hd, D),
                p + "self_attn.v_proj.weight": rng.randn(KV * hd, D),
                p + "self_attn.o_proj.weight": rng.randn(D, H * hd),
                p + "post_attention_layernorm.weight": 1 + 0.1 * rng.randn(D),
                p + "mlp.gate_proj.weight": rng.randn(F, D), p + "mlp.up_proj.weight": rng.randn(F, D),
                p + "mlp.down_proj.weight": rng.randn(D, F)})
  if not tied:
    out["lm_head.weight"] = rng.randn(V, D)
  return {k: (0.1 * v if v.ndim == 2 else v).astype(np.float32) for k, v in out.items()}


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _gguf_name(hf_name: str) -> str:
  if hf_name in _TO_GGUF:
    return _TO_GGUF[hf_name]
  _, _, i, suffix = hf_name.split(".", 3)
  return f"blk.{i}.{_TO_GGUF[suffix]}"


def write_tiny_gguf(path, tensors=None, arch="llama", name="tiny llama", drop_keys=(), raw_types=None,
                    extra_tensors=None) -> pathlib.Path:
  """A llama GGUF as llama.cpp's converter writes one (q/k rows permuted), from HF-named float32 tensors.

  `raw_types` maps an HF name to a GGML type whose (zero) bytes are stored instead; `drop_keys` leaves metadata
  keys out; `extra_tensors` adds GGUF-named float32 tensors."""
  tensors = tiny_hf_tensors() if tensors is None else tensors
  tokens = _byte_vocab()
  w = gguf.GGUFWriter(str(path), arch)
  p = f"{arch}."
  kv = {"general.name": ("string", name), p + "block_count": ("uint32", TINY["layers"]),
        p + "context_length": ("uint32", 256), p + "embedding_length": ("uint32", TINY["hidden"]),
        p + "feed_forward_length": ("uint32", TINY["ffn"]), p + "attention.head_count": ("uint32", TINY["heads"]),
        p + "attention.head_count_kv": ("uint32", TINY["kv_heads"]), p + "rope.freq_base": ("float32", 5e5),
        p + "attention.layer_norm_rms_epsilon": ("float32", 1e-5), "tokenizer.ggml.model": ("string", "gpt2"),
        "tokenizer.ggml.bos_token_id": ("uint32", 1), "tokenizer.ggml.eos_token_id": ("uint32", 2),
        "tokenizer.ggml.padding_token_id": ("uint32", 0), "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.chat_template": ("string", "{% for m in messages %}{{ m['content'] }}{% endfor %}")}
  for key, (kind, value) in kv.items():
    if key not in drop_keys:
      getattr(w, f"add_{kind}")(key, value)
  w.add_array("tokenizer.ggml.tokens", tokens)
  w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (len(tokens) - 3))
  w.add_array("tokenizer.ggml.merges", ["Ġ t"])
  for hf_name, t in tensors.items():
    if hf_name.endswith("q_proj.weight"):
      t = llama_cpp_permute(t, TINY["heads"])
    elif hf_name.endswith("k_proj.weight"):
      t = llama_cpp_permute(t, TINY["kv_heads"])
    qtype = (raw_types or {}).get(hf_name)
    if qtype is None:
      w.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(t))
    else:
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      w.add_tensor(_gguf_name(hf_name), np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8),
                   raw_dtype=qtype)
  for gguf_name, t in (extra_tensors or {}).items():
    w.add_tensor(gguf_name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return pathlib.Path(path)


def _read_safetensors(directory) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(pathlib.Path(directory).glob("*.safetensors")):
    out.update(load_file(f))
  return out


def test_tiny_gguf_round_trip_undoes_llama_cpp_row_order(tmp_path):
  want = tiny_hf_tensors(tied=False)
  src = write_tiny_gguf(tmp_path / "tiny.gguf", want)
  out = rj_gguf.convert_gguf(src, tmp_path / "hf")
  got = _read_safetensors(out)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  cfg = json.loads((pathlib.Path(out) / "config.json").read_text())
  assert (cfg["architectures"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["tie_word_embeddings"]) == \
      (["LlamaForCausalLM"], 2, 8, False)
  assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
  assert json.loads((pathlib.Path(out) / "generation_config.json").read_text())["eos_token_id"] == 2
  prov = json.loads((pathlib.Path(out) / rj_gguf.PROVENANCE_FILE).read_text())
  assert prov["source"] == "tiny.gguf" and prov["size"] == src.stat().st_size and len(prov["sha256"]) == 64
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # built beside, then renamed


def test_tiny_gguf_sharded_mistral_tied(tmp_path):
  """Sharded above the limit with an index; 'mistral' in general.name gives MistralConfig; no output.weight ties."""
  want = tiny_hf_tensors(tied=True)
  src = write_tiny_gguf(tmp_path / "m.gguf", want, name="Mistral tiny")
  out = pathlib.Path(rj_gguf.convert_gguf(src, tmp_path / "hf", max_shard_bytes=40_000))
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(want)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["tie_word_embeddings"] is True
  model = load_hf_checkpoint(out)
  assert model.config.architecture == "mistral" and model.lm_head is None
  np.testing.assert_array_equal(np.asarray(model.embedder[...]), want["model.embed_tokens.weight"])


@pytest.mark.parametrize("case, expect", [
    ("architecture", r"general\.architecture 'gpt2' is not supported"),
    ("quantisation", r"tensor blk\.0\.attn_v\.weight has quantisation type Q8_1, which gguf\.quants"),
    ("metadata", r"metadata key llama\.context_length is missing"),
    ("missing", r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    ("unexpected", r"unexpected tensor\(s\) \['blk\.0\.attn_q\.bias'\]"),
])
def test_clear_errors_name_the_file_and_field(tmp_path, case, expect):
  src = tmp_path / f"{case}.gguf"
  tensors = tiny_hf_tensors()
  if case == "architecture":
    write_tiny_gguf(src, arch="gpt2")
  elif case == "quantisation":
    write_tiny_gguf(src, raw_types={"model.layers.0.self_attn.v_proj.weight": gguf.GGMLQuantizationType.Q8_1})
  elif case == "metadata":
    write_tiny_gguf(src, drop_keys=("llama.context_length",))
  elif case == "missing":
    write_tiny_gguf(src, {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
  else:
    write_tiny_gguf(src, extra_tensors={"blk.0.attn_q.bias": np.zeros(TINY["hidden"], np.float32)})
  with pytest.raises(rj_gguf.GGUFError, match=expect) as err:
    rj_gguf.convert_gguf(src, tmp_path / "hf")
  assert str(src) in str(err.value)
  assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_as_hf_dir_caches_once_and_refuses_what_is_not_a_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setenv(rj_gguf.CACHE_ENV, str(tmp_path / "cache"))
  src = write_tiny_gguf(tmp_path / "tiny.gguf")
  out = pathlib.Path(rj_gguf.as_hf_dir(src))
  assert out.parent == tmp_path / "cache" / "gguf" and out.name.startswith("tiny-") and len(out.name) == 5 + 16
  stamp = (out / "config.json").stat().st_mtime_ns
  assert rj_gguf.as_hf_dir(str(src)) == str(out) and (out / "config.json").stat().st_mtime_ns == stamp
  (out / rj_gguf.PROVENANCE_FILE).unlink()  # an incomplete entry is rebuilt
  assert rj_gguf.as_hf_dir(src) == str(out) and (out / rj_gguf.PROVENANCE_FILE).is_file()
  provenance = json.loads((out / rj_gguf.PROVENANCE_FILE).read_text())
  (out / rj_gguf.PROVENANCE_FILE).write_text(json.dumps(dict(provenance, format_version=0)))
  assert rj_gguf.as_hf_dir(src) == str(out)  # an entry another converter version wrote is rebuilt too
  assert json.loads((out / rj_gguf.PROVENANCE_FILE).read_text())["format_version"] == rj_gguf.FORMAT_VERSION
  assert rj_gguf.as_hf_dir(tmp_path) == str(tmp_path)  # a directory is returned as is
  with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
    rj_gguf.as_hf_dir(tmp_path / "nowhere.gguf")
  (tmp_path / "weights.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"weights\.bin: a file, but not a \.gguf file"):
    rj_gguf.as_hf_dir(tmp_path / "weights.bin")


def test_convert_command_from_gguf(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(rj_gguf.CACHE_ENV, str(tmp_path / "cache"))
  src = write_tiny_gguf(tmp_path / "tiny.gguf")
  assert convert.main(["--to", "hf", "--src", str(src), "--dst", str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / rj_gguf.PROVENANCE_FILE).is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
  assert convert.main(["--to", "jax", "--src", str(src), "--dst", str(tmp_path / "jax")]) == 0
  assert (tmp_path / "jax" / "model_config.json").is_file()
  with pytest.raises(SystemExit, match="brings its own tokenizer"):
    convert.main(["--to", "hf", "--src", str(src), "--dst", str(tmp_path / "x"), "--chat_template", "toy"])


# -- the real file: SmolLM2-135M-Instruct Q4_1 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  """transformers' own GGUF load, float32 (loaded once: it dequantises with torch, ~20 s on 2 cores)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def prompts(reference_tokenizer) -> list[np.ndarray]:
  """Token ids of the first real GSM8K test questions (../shared; fixed text when absent), cut short."""
  path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
  if path.is_file():
    texts = [json.loads(line)["question"] for line in path.read_text().splitlines()[:len(PROMPT_LENGTHS)]]
  else:
    texts = list(FALLBACK_PROMPTS)
  return [np.asarray(reference_tokenizer(t).input_ids[:n]) for t, n in zip(texts, PROMPT_LENGTHS)]


def _torch_logits(model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids)[None])).logits[0].float().numpy()


@nnx.jit
def _jit_forward(model, ids, attention_mask):
  return model(ids, attention_mask=attention_mask)


def _jax_logits(model, ids, attention_mask=None) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return np.asarray(_jit_forward(model, jnp.asarray(ids), mask))


def _check(name, out, ref) -> float:
  err = float(np.abs(out - ref).max() / np.abs(ref).max())
  print(f"\n[gguf] {name}: max |diff| / max |ref| = {err:.2e}")
  assert err <= LOGIT_TOL, f"{name}: {err:.3e} > {LOGIT_TOL}"
  assert (out.argmax(-1) == ref.argmax(-1)).all(), f"{name}: argmax differs"
  return err


def test_smollm2_logits_match_transformers_gguf_alone_and_left_padded(smollm2_gguf, smollm2_dir, reference,
                                                                     prompts):
  # A .gguf path: as_hf_dir finds the cached conversion. Scanned layers compile once per shape (49 s -> 9 s here).
  model = load_hf_checkpoint(smollm2_gguf, scan_layers=True)
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
  assert c.tie_word_embeddings and model.lm_head is None and c.rope_theta == 1e5
  refs = [_torch_logits(reference, row) for row in prompts]
  for row, ref in zip(prompts, refs):
    _check(f"alone, {len(row)} tokens", _jax_logits(model, row[None])[0], ref)
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, row in enumerate(prompts):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  out = _jax_logits(model, ids, mask)
  for i, (row, ref) in enumerate(zip(prompts, refs)):
    _check(f"left-padded row {i}", out[i, width - len(row):], ref)


def test_smollm2_converted_directory_loads_in_transformers_identically(smollm2_dir, reference, prompts):
  """transformers reading our directory = transformers reading the GGUF: the conversion itself, tie included."""
  torch = pytest.importorskip("torch")
  import transformers
  ours = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
  assert ours.config.tie_word_embeddings and ours.lm_head.weight.data_ptr() == \
      ours.model.embed_tokens.weight.data_ptr()
  mine, theirs = ours.state_dict(), reference.state_dict()
  assert sorted(mine) == sorted(theirs)
  for name in mine:
    assert torch.equal(mine[name], theirs[name]), name
  row = prompts[0]
  np.testing.assert_array_equal(_torch_logits(ours, row), _torch_logits(reference, row))


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir, reference_tokenizer):
  import transformers
  ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  ref = reference_tokenizer
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
      (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token) == \
      ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
  texts = ["Janet’s ducks lay 16 eggs per day.", "  two spaces, tabs\tand\nnewlines  ",
           "<|im_start|>user\nWhat is 12*7?<|im_end|>\n<|im_start|>assistant\n", "naïve café 日本語 🙂 <|endoftext|>"]
  for text in texts:
    assert ours(text).input_ids == ref(text).input_ids, text
  assert ours(texts[0]).input_ids[0] != ours.bos_token_id  # add_bos_token False, as in the file
  messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}]
  for prompt in (False, True):
    a = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
    b = ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
    assert a == b
  assert ours.decode(ours(texts[3]).input_ids) == texts[3]


def test_smollm2_directory_is_the_cached_conversion(smollm2_gguf, smollm2_dir):
  assert rj_gguf.as_hf_dir(smollm2_gguf) == str(smollm2_dir)
  prov = json.loads((smollm2_dir / rj_gguf.PROVENANCE_FILE).read_text())
  assert prov["source"] == smollm2_gguf.name and prov["size"] == os.path.getsize(smollm2_gguf)
  assert smollm2_dir.name == f"{smollm2_gguf.stem}-{prov['sha256'][:16]}"
  assert (smollm2_dir / "model.safetensors").stat().st_size > 4 * 134_000_000  # float32, tied: no head copy


def test_conversion_needs_no_torch(tmp_path):
  """rise_jax never imports torch: the whole conversion (numpy dequantisation, tokenizer builder) runs without."""
  src = write_tiny_gguf(tmp_path / "tiny.gguf")
  script = ("import sys; sys.modules['torch'] = None\n"
            "from rise_jax.gguf import convert_gguf\n"
            "convert_gguf(sys.argv[1], sys.argv[2])\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
  result = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "hf")], capture_output=True,
                          text=True, timeout=240, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
