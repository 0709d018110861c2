"""rise_jax.models beyond parity: KV cache, scan vs loop, remat, dtypes, attention backends, configs, errors, export."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from flax import nnx

from rise_jax.models import (PRESETS, ModelConfig, abstract_model, build_model, init_cache, load_hf_checkpoint,
                             load_model, save_hf_checkpoint)
from rise_jax.models import attention as attention_lib
from rise_jax.models import convert, hf_io
from rise_jax.sharding import single_device_mesh
from tests.fixtures_models import torch_logits

HIGHEST = jax.default_matmul_precision("highest")


def rel_err(a, b, mask=None):
  a, b = np.asarray(a), np.asarray(b)
  if mask is not None:
    a, b = a[np.asarray(mask, bool)], b[np.asarray(mask, bool)]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, attention_mask=mask)


@pytest.fixture(scope="module")
def mistral(tiny_mistral_path):
  return load_hf_checkpoint(tiny_mistral_path)


# -- KV cache ------------------------------------------------------------------------------------------------

@nnx.jit
def _cached(model, ids, mask, cache):
  return model(ids, attention_mask=mask, cache=cache)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_incremental_equals_full_forward(tiny_mistral_path, scan_layers):
  """Prefill a left-padded ragged batch, then decode one token at a time (past the window): same logits."""
  model = load_hf_checkpoint(tiny_mistral_path, scan_layers=scan_layers)
  rng = np.random.RandomState(0)
  b, prompt, total = 3, 12, 28  # window 16: decoding runs well past it
  ids = jnp.asarray(rng.randint(3, 256, (b, total)))
  mask = np.ones((b, total), np.int32)
  mask[1, :5] = 0
  mask[2, :11] = 0
  mask = jnp.asarray(mask)
  with HIGHEST:
    full = _forward(model, ids, mask)
    cache = init_cache(model.config, b, 32)
    logits, cache = _cached(model, ids[:, :prompt], mask[:, :prompt], cache)
    steps = [logits]
    for t in range(prompt, total):
      logits, cache = _cached(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
      steps.append(logits)
  incremental = jnp.concatenate(steps, axis=1)
  err = rel_err(incremental, full, mask)
  assert err < 1e-5, err
  np.testing.assert_array_equal(cache.end_index, [total] * b)
  pos = np.asarray(cache.positions)
  assert (pos[:, total:] == -1).all() and (pos[2, :11] == -1).all() and pos[2, total - 1] == total - 12
  if scan_layers:
    return  # the mutation below checks the test, not the layer iteration: once is enough
  # Mutation: a decode step whose positions restart at 0 instead of continuing from the cache must disagree.
  with HIGHEST:
    cache = init_cache(model.config, b, 32)
    _, cache = _cached(model, ids[:, :prompt], mask[:, :prompt], cache)
    wrong, _ = nnx.jit(lambda m, i, c: m(i, positions=jnp.zeros_like(i), cache=c))(model, ids[:, prompt:prompt + 1],
                                                                                    cache)
  assert rel_err(wrong, full[:, prompt:prompt + 1]) > 1e-2



def test_decode_layers_equal_the_full_forward_and_skip_inactive_rows(tiny_mistral_path):
  """`models.decode.decode_layers` (the engine's one-token layer stack) over a plain contiguous cache written
  here, against the full-sequence forward, decoding past the sliding window; a row marked inactive for a step
  is fed nothing and resumes where it was."""
  from rise_jax.models import attention, decode
  model = load_hf_checkpoint(tiny_mistral_path)
  c = model.config
  rng = np.random.RandomState(1)
  b, prompt, total, slots = 3, 6, 24, 32  # window 16
  ids = jnp.asarray(rng.randint(3, 256, (b, total)))
  with HIGHEST:
    full = _forward(model, ids, jnp.ones((b, total), jnp.int32))
    _, kv = _cached(model, ids[:, :prompt], jnp.ones((b, prompt), jnp.int32), init_cache(c, b, slots))
    layers = decode.layer_weights(model)
    per_layer = [(jnp.transpose(kv.k[i], (0, 2, 1, 3)), jnp.transpose(kv.v[i], (0, 2, 1, 3)))
                 for i in range(c.num_layers)]  # [b, kv_heads, slots, d]

    @jax.jit
    def step(per_layer, tokens, fed, active):
      rows = jnp.arange(b)
      slot = jnp.where(active, fed, slots - 1)  # an inactive row writes a slot nobody attends
      keys = jnp.arange(slots)[None, :]
      visible = (keys <= fed[:, None]) & (fed[:, None] - keys < c.sliding_window)

      def attend(q, k, v, layer):
        k_cache = layer[0].at[rows, :, slot].set(k)
        v_cache = layer[1].at[rows, :, slot].set(v)
        return attention.decode_attention(q, k_cache, v_cache, visible), (k_cache, v_cache)

      return decode.decode_layers(model, tokens, fed, layers, per_layer, attend)

    fed = np.full(b, prompt)
    for t in range(2 * (total - prompt)):
      active = np.ones(b, bool) if t % 3 else np.array([True, False, True])  # row 1 sits out every third step
      active &= fed < total
      if not active.any():
        continue
      hidden, per_layer = step(per_layer, jnp.asarray(ids[np.arange(b), np.minimum(fed, total - 1)]),
                               jnp.asarray(fed), jnp.asarray(active))
      logits = np.asarray(model.unembed(hidden))
      for r in np.flatnonzero(active):
        got, want = logits[r], np.asarray(full[r, fed[r]])
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, (t, r)
      fed += active
  assert (fed == total).all()


# -- scan / remat / dtypes ---------------------------------------------------------------------------------

def test_scan_layers_equals_loop_and_remat_policies(tiny_llama_gqa_path):
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 16)))
  loop = load_hf_checkpoint(tiny_llama_gqa_path, scan_layers=False)
  scan = load_hf_checkpoint(tiny_llama_gqa_path, scan_layers=True, remat="dots")
  assert jax.tree.structure(nnx.state(loop)) == jax.tree.structure(nnx.state(scan))  # same checkpoint layout
  with HIGHEST:
    np.testing.assert_allclose(_forward(scan, ids, None), _forward(loop, ids, None), rtol=1e-5, atol=1e-5)

  def loss(model):
    return model(ids).std()

  # The configured policy is the one in the program: a layer policy appears only when asked (the xla
  # attention blocks are always checkpointed, with the default policy, printed `policy=None`).
  expected = {"none": set(), "full": {"<function nothing_saveable"},
              "dots_with_no_batch_dims": {"DotsSaveable(only_if_no_batch_dims=True)"}}
  for remat, want in expected.items():
    model = load_hf_checkpoint(tiny_llama_gqa_path, remat=remat)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state))
    assert set(re.findall(r"policy=(<function \w+|\w+\([^)]*\))", jaxpr)) == want, remat
  with pytest.raises(ValueError, match="model.remat"):
    build_model(PRESETS["toy-llama"].config, remat="everything")


def test_param_and_compute_dtypes(tiny_llama_gqa_path):
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 256, (2, 16)))
  f32 = load_hf_checkpoint(tiny_llama_gqa_path)
  bf16 = load_hf_checkpoint(tiny_llama_gqa_path, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype("bfloat16")}
  mixed = load_hf_checkpoint(tiny_llama_gqa_path, compute_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(mixed))} == {jnp.dtype("float32")}
  with HIGHEST:
    ref = _forward(f32, ids, None)
    for model in (bf16, mixed):
      out = _forward(model, ids, None)
      assert out.dtype == jnp.float32 and jax.eval_shape(model.hidden, ids).dtype == jnp.float32
      assert 1e-5 < rel_err(out, ref) < 5e-2  # bfloat16 really ran, and is still the same model


# -- custom backward passes --------------------------------------------------------------------------------

def _plain_rms_norm(x, w, eps, dtype):
  x = x.astype(jnp.float32)
  return (x / jnp.sqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + eps) * w).astype(dtype)


def _plain_swiglu_down(gate, up, w):
  g = gate.astype(jnp.float32)
  product = (g / (1 + jnp.exp(-g)) * up.astype(jnp.float32)).astype(gate.dtype)
  return jnp.einsum("blf,fd->bld", product, w)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_rms_norm_and_swiglu_backward_equal_autodiff_of_the_plain_formulas(dtype, tol):
  """The hand-written backwards (rms_norm keeps x and the inverse rms, swiglu_down keeps gate, up and the weight)
  against jax.vjp of the textbook formulas, with a random cotangent; rows of different scales and a nonzero mean,
  so the normaliser's own gradient (the projection term) is large."""
  from rise_jax.models.transformer import rms_norm, swiglu_down
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 5, 64) * rng.uniform(0.1, 10, (3, 5, 1)) + 0.5, dtype)
  w = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
  for ours, plain, args in ((lambda x, w: rms_norm(x, w, 1e-5, dtype), lambda x, w: _plain_rms_norm(x, w, 1e-5, dtype),
                             (x, w)),
                            (swiglu_down, _plain_swiglu_down, (jnp.asarray(rng.randn(2, 3, 96) * 3, dtype),
                                                               jnp.asarray(rng.randn(2, 3, 96), dtype),
                                                               jnp.asarray(rng.randn(96, 32) / 10, dtype)))):
    cot = jnp.asarray(rng.randn(*ours(*args).shape), dtype)
    with HIGHEST:
      (y, vjp), (y_ref, vjp_ref) = jax.vjp(ours, *args), jax.vjp(plain, *args)
      np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
      for got, want in zip(vjp(cot), vjp_ref(cot)):
        assert got.dtype == want.dtype
        assert rel_err(np.float32(got), np.float32(want)) < tol


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("spec, x_shape, w_shape", [("bld,dhk->blhk", (2, 5, 16), (16, 4, 8)),
                                                    ("blhk,hkd->bld", (2, 5, 4, 8), (4, 8, 16))])
def test_dense_backward_equals_einsum_autodiff(spec, x_shape, w_shape, dtype, tol):
  """`dense` only reorders when its weight gradient reads x: both gradients equal autodiff of the einsum."""
  from rise_jax.models.transformer import dense
  rng = np.random.RandomState(1)
  x, w = jnp.asarray(rng.randn(*x_shape), dtype), jnp.asarray(rng.randn(*w_shape), dtype)
  cot = jnp.asarray(rng.randn(*jnp.einsum(spec, x, w).shape), dtype)
  with HIGHEST:
    got = jax.vjp(lambda x, w: dense(x, w, spec), x, w)[1](cot)
    want = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)[1](cot)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    assert rel_err(np.float32(g), np.float32(r)) < tol


# -- attention backends ------------------------------------------------------------------------------------

def _qkv(b=2, l=40, h=4, kv=2, d=16, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(b, l, n, d), jnp.float32) for n in (h, kv, kv))
  return q, k, v


def _naive_attention(q, k, v, mask, window):
  """Independent numpy reference: repeat K/V per head, index-causal over the non-pad tokens of each row."""
  q, k, v, mask = map(np.asarray, (q, k, v, mask))
  b, l, h, d = q.shape
  g = h // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  out = np.zeros_like(q)
  for r in range(b):
    idx = np.flatnonzero(mask[r])
    for i, qi in enumerate(idx):
      keys = idx[max(0, i - window + 1) if window else 0:i + 1]
      s = np.einsum("hd,thd->ht", q[r, qi], k[r, keys]) / np.sqrt(d)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[r, qi] = np.einsum("ht,thd->hd", p, v[r, keys])
  return out


@pytest.mark.parametrize("window", [None, 5])
def test_xla_attention_blockwise_matches_naive_reference(window):
  q, k, v = _qkv(l=45)
  mask = jnp.asarray(np.arange(45)[None] >= np.array([[0], [9]]))
  pos = jnp.where(mask, jnp.cumsum(mask, 1) - 1, -1)
  ref = _naive_attention(q, k, v, mask, window)
  attend = jax.jit(attention_lib.xla_attention, static_argnames=("window", "block"))
  with HIGHEST:
    one_block = attend(q, k, v, pos, pos, window=window)
    blocks = attend(q, k, v, pos, pos, window=window, block=16)  # 3 query blocks
  np.testing.assert_allclose(one_block, ref, atol=2e-5)
  np.testing.assert_allclose(blocks, ref, atol=2e-5)
  assert float(jnp.abs(one_block[1, :9]).max()) == 0.0  # pad queries give zeros


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_argument_mapping_on_xla(monkeypatch, window):
  """The cudnn path's call (is_causal, lengths, local_window_size=(W-1, 0)) run by jax's xla implementation.

  On a GPU the same call runs cuDNN (test_cudnn_backend_equals_xla); here it checks the argument mapping and
  the left-padding fallback against the naive reference.
  """
  monkeypatch.setattr(attention_lib, "CUDNN_IMPLEMENTATION", "xla")
  q, k, v = _qkv(l=24)
  for mask in (np.arange(24)[None] < np.array([[24], [15]]),     # right-padded: the fast path
               np.arange(24)[None] >= np.array([[0], [9]])):     # left-padded: the exact fallback
    mask = jnp.asarray(mask)
    pos = jnp.where(mask, jnp.cumsum(mask, 1) - 1, -1)
    with HIGHEST:
      out = jax.jit(attention_lib.cudnn_attention, static_argnums=6)(q, k, v, pos, pos, mask, window)
    np.testing.assert_allclose(out, _naive_attention(q, k, v, mask, window), atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_backend_equals_xla(tiny_mistral_path):
  ids = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 64)))
  mask = jnp.asarray(np.arange(64)[None] < np.array([[64], [50]]))
  ref = load_hf_checkpoint(tiny_mistral_path, dtype="bfloat16")(ids, attention_mask=mask)
  out = load_hf_checkpoint(tiny_mistral_path, dtype="bfloat16", attention="cudnn")(ids, attention_mask=mask)
  assert rel_err(out, ref, mask) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash attention needs a TPU")
def test_splash_backend_equals_xla(tiny_mistral_path):
  ids = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 256)))
  mask = jnp.asarray(np.arange(256)[None] >= np.array([[0], [40]]))
  ref = load_hf_checkpoint(tiny_mistral_path)(ids, attention_mask=mask)
  out = load_hf_checkpoint(tiny_mistral_path, attention="splash")(ids, attention_mask=mask)
  assert rel_err(out, ref, mask) < 1e-3


@pytest.mark.slow
def test_splash_kernel_interpreted_on_cpu():
  """The Pallas splash kernel in interpret mode (no TPU needed): GQA, left padding, sliding window."""
  q, k, v = _qkv(l=40, d=128)
  mask = jnp.asarray(np.arange(40)[None] >= np.array([[0], [7]]))
  ref = _naive_attention(q, k, v, mask, 8)
  with HIGHEST:
    out = attention_lib.splash_attention(q, k, v, mask, window=8, interpret=True)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  from rise_jax import sharding
  with HIGHEST, sharding.use_mesh(sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])):
    out = jax.jit(lambda *a: attention_lib.sharded_splash_attention(*a, window=8, interpret=True))(q, k, v, mask)
  np.testing.assert_allclose(out, ref, atol=2e-5)


# -- configs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_hf_config(name):
  config = PRESETS[name].config
  assert ModelConfig.from_hf(config.to_hf()) == config
  assert PRESETS[name].chat_template in ("auto", "llama2", "mistral", "llama3", "toy")  # auto: the checkpoint's own


# config.json of the paper's checkpoints as published on the hub (legacy keys included: transformers normalises
# rope_theta / rope_scaling into rope_parameters), and a Llama 3.1 one with llama3 rope scaling.
_HUB_CONFIGS = {
    "llama-2-7b-chat": dict(
        architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2, hidden_act="silu", hidden_size=4096,
        initializer_range=0.02, intermediate_size=11008, max_position_embeddings=4096, model_type="llama",
        num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32, pretraining_tp=1, rms_norm_eps=1e-05,
        rope_scaling=None, tie_word_embeddings=False, torch_dtype="float16", use_cache=True, vocab_size=32000),
    "mistral-7b-instruct-v0.2": dict(
        architectures=["MistralForCausalLM"], attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=14336,
        max_position_embeddings=32768, model_type="mistral", num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, vocab_size=32000),
    "llama-3-8b-instruct": dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=128000,
        eos_token_id=128009, hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=14336,
        max_position_embeddings=8192, model_type="llama", num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=500000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, vocab_size=128256),
}


def test_hub_config_json_files_agree_with_presets(tmp_path):
  for name, fields in _HUB_CONFIGS.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(fields))
    assert ModelConfig.from_hf(tmp_path / name) == PRESETS[name].config, name
  llama31 = dict(_HUB_CONFIGS["llama-3-8b-instruct"], max_position_embeddings=131072, rope_scaling={
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
      "rope_type": "llama3"})
  (tmp_path / "llama31").mkdir()
  (tmp_path / "llama31" / "config.json").write_text(json.dumps(llama31))
  scaling = ModelConfig.from_hf(tmp_path / "llama31").rope_scaling
  assert (scaling.factor, scaling.original_max_position_embeddings) == (8.0, 8192)
  legacy = dict(_HUB_CONFIGS["llama-2-7b-chat"], rope_scaling={"type": "linear", "factor": 2.0})
  (tmp_path / "linear").mkdir()
  (tmp_path / "linear" / "config.json").write_text(json.dumps(legacy))
  with pytest.raises(ValueError, match="rope_type 'linear'"):
    ModelConfig.from_hf(tmp_path / "linear")


def test_paper_presets_name_their_repositories():
  assert PRESETS["llama-2-7b-chat"].hf_repo == "meta-llama/Llama-2-7b-chat-hf"
  assert PRESETS["mistral-7b-instruct-v0.2"].hf_repo == "mistralai/Mistral-7B-Instruct-v0.2"
  assert PRESETS["mistral-7b-instruct-v0.2"].config.sliding_window is None
  assert PRESETS["llama-3-8b-instruct"].config.rope_theta == 500_000.0


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_and_cache_bytes(tied):
  llama2 = PRESETS["llama-2-7b-chat"].config
  assert llama2.param_count() == 6_738_415_616  # the published size of Llama-2-7b-hf
  assert llama2.kv_bytes_per_token("bfloat16") == 512 * 1024  # 2 x 32 layers x 32 heads x 128 x 2 bytes
  assert llama2.kv_bytes_per_token(np.float32) == 1024 * 1024
  small = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=4, tie_word_embeddings=tied)
  _, state, _ = abstract_model(small, single_device_mesh())
  assert small.param_count() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def test_load_model_from_config_sections(tiny_llama_gqa_path):
  from rise_jax.config import base_config
  cfg = base_config()
  cfg.model.preset = "toy-llama"
  model = load_model(cfg.model)
  assert model.config == PRESETS["toy-llama"].config
  cfg.model.source, cfg.model.hf_path, cfg.model.param_dtype = "hf", str(tiny_llama_gqa_path), "bfloat16"
  model = load_model(cfg.model)
  assert model.config.num_kv_heads == 2 and model.embedder[...].dtype == jnp.bfloat16


# -- bad input -----------------------------------------------------------------------------------------------

def _edit_config(path, **fields):
  with open(path / "config.json") as f:
    d = json.load(f)
  d.update(fields)
  with open(path / "config.json", "w") as f:
    json.dump(d, f)


def _copy(src, tmp_path, name):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_weights_are_refused_at_load_naming_file_and_tensor(tiny_llama_gqa_path, tmp_path, bad):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(tiny_llama_gqa_path / "model.safetensors")
  d = _copy(tiny_llama_gqa_path, tmp_path, "nan")
  name = "model.layers.1.self_attn.o_proj.weight"
  w = tensors[name].copy()
  w.reshape(-1)[5] = bad
  save_file({**tensors, name: w}, d / "model.safetensors", metadata={"format": "pt"})
  # was loaded silently: the NaN surfaced later as NaN log-probs in the rollout log
  with pytest.raises(ValueError, match=rf"{d / 'model.safetensors'}: tensor {re.escape(name)} holds 1 non-finite "
                                       r"value\(s\) \(NaN or inf; first at flat index 5\)"):
    load_hf_checkpoint(d)


def test_errors_name_the_tensor_or_field(tiny_llama_gqa_path, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(tiny_llama_gqa_path / "model.safetensors")

  def with_tensors(name, edit):
    d = _copy(tiny_llama_gqa_path, tmp_path, name)
    t = dict(tensors)
    edit(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return d

  missing = with_tensors("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(missing)
  extra = with_tensors("extra", lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.2\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(extra)
  shape = with_tensors("shape", lambda t: t.update(
      {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\).*\(32, 64\)"):
    load_hf_checkpoint(shape)

  truncated = _copy(tiny_llama_gqa_path, tmp_path, "truncated")  # a copy or download cut short
  (truncated / "model.safetensors").write_bytes((tiny_llama_gqa_path / "model.safetensors").read_bytes()[:100])
  with pytest.raises(ValueError, match=rf"{truncated / 'model.safetensors'}: unreadable safetensors file"):
    load_hf_checkpoint(truncated)

  rope = _copy(tiny_llama_gqa_path, tmp_path, "rope")
  _edit_config(rope, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    load_hf_checkpoint(rope)
  arch = _copy(tiny_llama_gqa_path, tmp_path, "arch")
  _edit_config(arch, model_type="qwen2")
  with pytest.raises(ValueError, match="model_type 'qwen2'"):
    load_hf_checkpoint(arch)
  bias = _copy(tiny_llama_gqa_path, tmp_path, "bias")
  _edit_config(bias, attention_bias=True)
  with pytest.raises(ValueError, match="attention_bias"):
    load_hf_checkpoint(bias)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(tiny_llama_gqa_path / "config.json", empty / "config.json")
    load_hf_checkpoint(empty)
  sharded = _copy(tiny_llama_gqa_path, tmp_path, "sharded")
  (sharded / "model.safetensors").rename(sharded / "part-1.safetensors")
  (sharded / hf_io.INDEX_FILE).write_text(json.dumps(
      {"weight_map": {**{k: "part-1.safetensors" for k in tensors}, "lm_head.weight": "part-2.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="part-2.safetensors"):
    load_hf_checkpoint(sharded)


# -- export --------------------------------------------------------------------------------------------------

def test_export_round_trip_single_and_sharded(tiny_llama_gqa_path, tmp_path):
  """rise_jax -> save_hf_checkpoint -> transformers gives the same logits; also through a sharded index."""
  model = load_hf_checkpoint(tiny_llama_gqa_path)
  # Perturb the weights so the export cannot pass by copying files: logits must follow *this* model.
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x: x * 1.01, state))
  ids = np.random.RandomState(5).randint(0, 256, (2, 20))
  with HIGHEST:
    ours = np.asarray(_forward(model, jnp.asarray(ids), None))
  single = save_hf_checkpoint(model, tmp_path / "single")
  sharded = save_hf_checkpoint(model, tmp_path / "sharded", max_shard_bytes=100_000)
  files = sorted(os.listdir(sharded))
  assert hf_io.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  assert "generation_config.json" in files and "model.safetensors" in os.listdir(single)
  for path in (single, sharded):
    assert rel_err(torch_logits(path, ids), ours) < 1e-5
    with HIGHEST:
      again = np.asarray(_forward(load_hf_checkpoint(path), jnp.asarray(ids), None))
    np.testing.assert_array_equal(again, ours)
  original = torch_logits(tiny_llama_gqa_path, ids)
  assert rel_err(original, ours) > 1e-3  # the mutation the round trip must see (the perturbation)
  with pytest.raises(FileExistsError):
    save_hf_checkpoint(model, single)


def test_export_tied_with_chat_tokenizer(tiny_llama_tied_path, tmp_path):
  """A tied model exported with rise_jax's ChatTokenizer: transformers loads model, tokenizer and template."""
  import transformers
  from rise_jax.chat import load_tokenizer
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  model = load_hf_checkpoint(tiny_llama_tied_path)
  tok = load_tokenizer(build_toy_tokenizer(tmp_path / "toy_tok"), chat_template="toy")
  out = save_hf_checkpoint(model, tmp_path / "tied", tokenizer=tok)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["tie_word_embeddings"] is True and config["head_dim"] == 32 and "lm_head.weight" not in \
      hf_io._TensorReader(out).names()
  reloaded = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
  assert reloaded.apply_chat_template(messages, tokenize=False) == tok.hf.apply_chat_template(messages, tokenize=False)
  ids = np.random.RandomState(6).randint(0, 256, (1, 12))
  with HIGHEST:
    assert rel_err(torch_logits(out, ids), _forward(model, jnp.asarray(ids), None)) < 1e-5
  # A template given by name replaces the tokenizer's own.
  other = save_hf_checkpoint(model, tmp_path / "llama2_template", tokenizer=tok, chat_template="llama2")
  assert "[INST]" in transformers.AutoTokenizer.from_pretrained(other).chat_template


def test_convert_cli_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.parse_args(["--help"])
  assert exit_info.value.code == 0 and "--to" in capsys.readouterr().out


def test_convert_cli_both_ways(tiny_llama_mha_path, tmp_path):
  native = tmp_path / "native"
  assert convert.main(["--to", "jax", "--src", str(tiny_llama_mha_path), "--dst", str(native)]) == 0
  back = tmp_path / "hf"
  assert convert.main(["--to", "hf", "--src", str(native), "--dst", str(back)]) == 0
  from safetensors.numpy import load_file
  a, b = load_file(tiny_llama_mha_path / "model.safetensors"), load_file(back / "model.safetensors")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
