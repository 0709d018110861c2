"""Training memory: the compiled step's breakdown, the auto attention backend, bf16 Adam moments, the capacity check
calibrated against `memory_analysis()`. Everything is compile-only except the short bf16-moments run."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rise_jax import config as config_lib
from rise_jax.models import attention as attention_lib
from rise_jax.models import configs as model_configs
from rise_jax.models.transformer import Transformer
from rise_jax.pipeline import capacity
from rise_jax.train import memory, optim

TOY = model_configs.PRESETS["toy-llama"].config
# A third size for the calibration: Llama 2's vocabulary, 4 layers of width 384 (~30M parameters).
MID = model_configs.ModelConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_layers=4,
                                num_heads=6, num_kv_heads=2, head_dim=64)


def recipe(**kw):
  fields = dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, b1=0.9, b2=0.999, eps=1e-8,
                moments_dtype="float32")
  fields.update(kw)
  return types.SimpleNamespace(**fields)


# -- attention="auto" ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, dtype, head_dim, want", [
    (("gpu", "NVIDIA H200"), "bfloat16", 128, "cudnn"),
    (("gpu", "NVIDIA A100-SXM4-80GB"), "float16", 64, "cudnn"),
    (("gpu", "NVIDIA H200"), "float32", 128, "xla"),      # cuDNN flash attention has no float32 path
    (("gpu", "NVIDIA H200"), "bfloat16", 256, "xla"),     # head_dim beyond what cuDNN takes everywhere
    (("gpu", "NVIDIA H200"), "bfloat16", 60, "xla"),      # not a multiple of 8
    (("gpu", "AMD Instinct MI300X"), "bfloat16", 128, "xla"),  # no cuDNN on ROCm
    (("tpu", "TPU v5p"), "bfloat16", 128, "splash"),
    (("tpu", "TPU v4"), "float32", 64, "splash"),
    (("cpu", "cpu"), "bfloat16", 128, "xla"),
])
def test_auto_attention_resolves_by_mocked_device(monkeypatch, device, dtype, head_dim, want):
  fake = types.SimpleNamespace(platform=device[0], device_kind=device[1])
  monkeypatch.setattr(attention_lib.jax, "devices", lambda *a: [fake])
  c = model_configs.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=head_dim)
  model = nnx.eval_shape(lambda: Transformer(c, dtype=dtype, attention="auto", rngs=nnx.Rngs(0)))
  assert model.attention == want
  assert attention_lib.resolve("xla", dtype, head_dim) == "xla"  # an explicit choice is kept


def test_auto_is_the_default_and_every_paper_config_uses_it():
  import test_configs
  assert config_lib.base_config().model.attention == "auto"
  for name in test_configs.REAL_SCALE:
    c = test_configs.load(name).get_config()
    assert c.model.attention == "auto", name
    config_lib.validate(c, require_training=True)


def test_auto_on_this_cpu_computes_like_xla():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, TOY.vocab_size, (2, 12)), jnp.int32)
  out = {a: Transformer(TOY, attention=a, rngs=nnx.Rngs(0))(ids) for a in ("auto", "xla")}
  np.testing.assert_array_equal(out["auto"], out["xla"])


# -- the compiled step's breakdown --------------------------------------------------------------------------

def _trainer(config, remat="none", moments="float32", scan=True, **model_kw):
  tx, lr = optim.optimizer(recipe(moments_dtype=moments), 10)
  return memory.abstract_trainer(config, tx, lr, dtype="bfloat16", remat=remat, scan_layers=scan, **model_kw)


def test_breakdown_adds_up_state_is_donated_and_scores_are_not_saved():
  rows, length = 2, 256
  m = memory.step_memory(_trainer(TOY), rows, length)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_trainer(TOY).abstract_state.params))
  assert m.params == {"float32": 4 * n}
  assert m.opt_state["float32"] == 8 * n                    # Adam mu and nu
  assert m.grads == {"float32": 4 * n}
  assert m.donated                                          # no second copy of params + moments
  assert m.peak == m.arguments + m.outputs - m.aliased + m.temp > m.expected - sum(m.saved.values())
  # Attention scores are recomputed in the backward: no residual comes from inside the attention block, and all
  # float32 residuals together are less than one layer's [rows, heads, length, length] scores.
  assert not any(k.endswith(":_xla_block") for k in m.saved_by_source), m.saved_by_source
  assert m.saved["float32"] < rows * TOY.num_heads * length * length * 4


def test_remat_policies_save_in_order():
  saved = {r: sum(memory.step_memory(_trainer(TOY, remat=r), 4, 128).saved.values())
           for r in ("none", "dots_with_no_batch_dims", "full")}
  assert saved["none"] > saved["dots_with_no_batch_dims"] > saved["full"], saved


# -- bf16 Adam moments --------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_where_nearest_rounding_stalls():
  """Adam's nu as an EMA (b2 = 0.999) of a constant 2.0 from 1.0: float32 reaches 1 + (1 - 0.999^n); bf16 with
  round-to-nearest never moves (each increment is under half a bf16 step); stochastic rounding tracks float32."""
  n, b2 = 600, 0.999
  exact = 2.0 - 0.999 ** n
  x32 = jnp.ones((4096,), jnp.float32)
  nearest = jnp.ones((4096,), jnp.bfloat16)
  stochastic = jnp.ones((4096,), jnp.bfloat16)
  step = jax.jit(lambda s, k: optim.stochastic_round_bf16(b2 * s.astype(jnp.float32) + (1 - b2) * 2.0, k))
  for i in range(n):
    nearest = (b2 * nearest.astype(jnp.float32) + (1 - b2) * 2.0).astype(jnp.bfloat16)
    stochastic = step(stochastic, jnp.uint32(i))
  assert float(nearest.astype(jnp.float32).mean()) == 1.0
  assert abs(float(stochastic.astype(jnp.float32).mean()) - exact) < 0.01 * (exact - 1)
  x = jnp.linspace(-3, 3, 4096, dtype=jnp.float32) * 1.001
  r = jax.vmap(lambda k: optim.stochastic_round_bf16(x, k).astype(jnp.float32))(jnp.arange(256, dtype=jnp.uint32))
  assert float(jnp.max(jnp.abs(r.mean(0) - x))) < 0.2 * float(jnp.max(jnp.abs(r[0] - x)))  # unbiased per value


def test_bf16_moments_halve_the_state_and_train_like_fp32():
  from rise_jax import sharding as sharding_lib
  from rise_jax.models.build import build_model
  from rise_jax.train import trainer as trainer_lib
  rng = np.random.default_rng(0)
  ids = rng.integers(3, TOY.vocab_size, (1, 8, 33)).astype(np.int32)
  batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (1, 8, 32)).copy(),
           "segment_ids": np.ones((1, 8, 32), np.int32), "weights": np.full((1, 8, 32), 1 / 32, np.float32)}
  mesh = sharding_lib.single_device_mesh()
  losses, state_bytes = {}, {}
  for moments in ("float32", "bfloat16"):
    tx, lr = optim.optimizer(recipe(moments_dtype=moments), 1000)
    model = build_model(TOY, mesh=mesh, seed=0)
    trainer = trainer_lib.Trainer(model, mesh, tx, lr)
    state = trainer.initial_state(model, 0)
    state_bytes[moments] = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    losses[moments] = []
    with jax.set_mesh(mesh):
      for _ in range(25):
        state, metrics = trainer.step(state, batch, jnp.float32(8))
        losses[moments].append(float(metrics["loss"]))
  assert state_bytes["bfloat16"] < 0.51 * state_bytes["float32"]
  a, b = np.array(losses["float32"]), np.array(losses["bfloat16"])
  assert a[-1] < 0.8 * a[0]                                 # it learns (memorises the batch)
  np.testing.assert_allclose(b, a, rtol=0.02)


# -- the capacity check against memory_analysis() -----------------------------------------------------------

@pytest.mark.parametrize("model_config, remat, rows, length", [
    (TOY, "none", 8, 512), (model_configs.PRESETS["tiny-llama"].config, "none", 4, 256), (MID, "full", 4, 256)],
    ids=["toy-0.4m", "tiny-llama-4m", "mid-30m"])
def test_capacity_estimate_matches_compiled_peak(model_config, remat, rows, length):
  c = config_lib.base_config()
  c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", remat, True
  c.train.global_batch = c.train.micro_batch = rows  # one micro-batch per step, as compiled below
  c.train.max_length = length
  est = capacity.train_estimate(c, model_config, (1, 1, 1), platform="cpu")
  peak = memory.step_memory(_trainer(model_config, remat=remat), rows, length).peak
  assert est.train_total == pytest.approx(peak, rel=0.15), (est.table(), peak / 2 ** 20)
