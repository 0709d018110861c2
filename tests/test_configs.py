"""Every experiment config validates without running; real-scale ones fit their documented mesh and chip.

Divisibility is checked on the real module built abstractly (`nnx.eval_shape`) against a
`jax.sharding.AbstractMesh` of the documented shape, for every parameter under the training and sampling rules
and for the engine's KV pool; the memory estimate is re-derived here by hand for one config.
"""

import importlib.util
import pathlib

import pytest

from rise_jax import config as config_lib
from rise_jax.pipeline import capacity, recipes

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
REAL_SCALE = ["gsm8k_llama2_distill", "gsm8k_mistral_distill", "math_mistral_distill", "math_mistral_self",
              "gsm8k_llama3_self"]


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


OTHER_OWNERS = ("eval_", "train_tiny")  # the runner's and trainer's configs are tested with their commands


def _all_configs():
  for path in sorted(CONFIGS.glob("*.py")):
    if path.stem.startswith(OTHER_OWNERS):
      continue
    module = load(path.stem)
    if path.stem.startswith("ablation_"):
      for variant in recipes.ABLATIONS[path.stem[len("ablation_"):]]:
        yield path.stem, variant, module
    else:
      yield path.stem, None, module


_CASES = list(_all_configs())


@pytest.mark.parametrize("name, variant, module", _CASES, ids=[f"{n}:{v}" if v else n for n, v, _ in _CASES])
def test_every_config_validates(name, variant, module):
  c = module.get_config() if variant is None else module.get_config(variant)
  training = c.train.epochs is not None
  config_lib.validate(c, require_training=training)
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.train.lrr = 1.0  # locked: a typo is an error
  if hasattr(module, "HARDWARE") and c.model.source == "preset":
    capacity.check(c, module.HARDWARE)


def test_ablation_variants_change_exactly_their_fields():
  base = config_lib.to_dict(recipes.toy())
  for ablation, variants in recipes.ABLATIONS.items():
    assert len(variants) >= 2, ablation
    for variant, modifier in variants.items():
      c = recipes.toy_ablation(ablation, variant)
      changed = set(config_lib.diff_fields(base, config_lib.to_dict(c))) - {"name", "output_dir"}
      named = {f for f, v in modifier.fields.items() if config_lib.to_dict(recipes.toy()) != _with(f, v)}
      if c.rise.iterations < recipes.toy().rise.iterations:  # fewer iterations drop the later ones' settings
        named.add("rise.iteration_overrides")
        assert all(int(o.split(":")[0]) <= c.rise.iterations for o in c.rise.iteration_overrides)
      assert changed == named, (ablation, variant, changed, named)
      assert c.output_dir == f"runs/toy_{ablation}_{variant}"


def _with(field, value):
  c = recipes.toy()
  recipes._set(**{field: value})(c)
  return config_lib.to_dict(c)


@pytest.mark.parametrize("name", REAL_SCALE)
def test_real_scale_config_fits_documented_mesh_and_chip(name):
  module = load(name)
  c = module.get_config()
  assert c.model.source == "hf" and c.model.hf_path and c.tokenizer.chat_template
  assert " ".join(module.HARDWARE.name.split()[:2]) in module.__doc__  # the docstring names the hardware it was sized for
  est = capacity.check(c, module.HARDWARE)
  assert 6e9 < est.num_params < 9e9
  assert est.peak < module.HARDWARE.hbm_gib * capacity.GiB * module.HARDWARE.headroom


def test_memory_estimate_by_hand_llama2_on_v4_32():
  c = load("gsm8k_llama2_distill").get_config()
  est = capacity.check(c, capacity.TPU_V4_32)
  # Llama-2-7B: 32 layers x (4 * 4096^2 attention + 3 * 4096 * 11008 MLP + 2 * 4096 norms) + 2 * 32000 * 4096
  # + 4096 final norm parameters; float32 over 16 fsdp shards.
  n = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
  assert est.num_params == n
  assert est.params == pytest.approx(4 * n / 16, rel=1e-3)  # norms (4096) divide 16: no replication
  assert est.optimizer == pytest.approx(2 * est.params)
  # KV pool: k and v, 32 layers, the config's 8,192 blocks of 16 tokens, 32 kv heads x 128 over 4 tensor shards,
  # bfloat16; whole on every data replica (any slot reads any block).
  kv = 2 * 32 * 8192 * 16 * (32 / 4) * 128 * 2
  assert est.kv_cache == pytest.approx(kv)
  assert est.sample_params == pytest.approx(2 * (n - 4096 * 65) / 4 + 2 * 4096 * 65, rel=1e-3)


def test_the_engine_budgets_its_pool_not_the_batch():
  c = load("gsm8k_llama2_distill").get_config()
  with c.unlocked():
    c.sampling.num_blocks = 0
  # The default pool holds all 64 slots at 4096 tokens: 2 x 32 layers x (64 x 256 + 2) blocks x 8 kv heads a
  # tensor shard x 16 x 128 x bf16 = 32 GiB a chip, more than a v4 chip has.
  with pytest.raises(ValueError, match="exceeds 85% of 32.0 GiB"):
    capacity.check(c, capacity.TPU_V4_32)
  with c.unlocked():
    c.sampling.num_blocks = 4096  # 64k tokens: a quarter of the worst case; a fuller pool waits, never drops
  est = capacity.check(c, capacity.TPU_V4_32)
  # k and v, 32 layers, 32 kv heads x 128 over 4 tensor shards, 16 tokens a block, bfloat16; the pool is whole
  # on every data replica (any slot reads any block).
  assert est.kv_cache == pytest.approx(2 * 32 * 4096 * (32 / 4) * 16 * 128 * 2)
  with c.unlocked():
    c.sampling.batch_size *= 8  # more queued prompts, more samples each: the same pool
    c.collect.samples_per_turn = 16
  assert capacity.check(c, capacity.TPU_V4_32).kv_cache == est.kv_cache
  with c.unlocked():
    c.sampling.num_blocks, c.sampling.slots, c.sampling.max_cache_length = 0, 8, 2048
  # 0 sizes the pool for every slot at full length, plus the trash block and a spare.
  blocks = 8 * 128 + 2
  assert capacity.check(c, capacity.TPU_V4_32).kv_cache == pytest.approx(est.kv_cache * blocks / 4096)


def test_indivisible_mesh_is_refused_naming_the_array():
  c = load("gsm8k_llama2_distill").get_config()
  with c.unlocked():
    c.mesh.sample = (1, 1, 3)  # 32 heads do not split 3 ways
  hw = capacity.Hardware("3 chips", 3, 32.0)
  with c.unlocked():
    c.mesh.train = (1, 3, 1)
    c.train.micro_batch = 3
  with pytest.raises(ValueError, match="not divisible by mesh axes"):
    capacity.check(c, hw)


def test_memory_over_budget_is_refused():
  c = load("gsm8k_llama2_distill").get_config()
  small = capacity.Hardware("TPU v4-32 with 8 GiB", 16, 8.0)
  with pytest.raises(ValueError, match="exceeds 85% of 8.0 GiB"):
    capacity.check(c, small)


def test_micro_batch_must_split_over_data_and_fsdp():
  c = load("gsm8k_mistral_distill").get_config()
  with c.unlocked():
    c.train.micro_batch = 8
    c.train.global_batch = 64
  with pytest.raises(ValueError, match="train.micro_batch 8 is not divisible"):
    capacity.check(c, capacity.TPU_V4_32)


def test_two_products_variants_change_exactly_their_fields():
  base = config_lib.to_dict(recipes.toy_two_products())
  assert base["task"]["toy_form"] == "a*b+c*d" and base["task"]["toy_max_factor"] == 12
  for variant, modifier in recipes.TWO_PRODUCTS_VARIANTS.items():
    c = recipes.toy_two_products(variant)
    changed = set(config_lib.diff_fields(base, config_lib.to_dict(c))) - {"name", "output_dir"}
    assert changed == set(modifier.fields), (variant, changed)
    assert c.output_dir == "runs/toy_two_products" + ("" if variant == "recipe" else f"_{variant}")
  filtered = config_lib.for_iteration(config_lib.finalize(recipes.toy_two_products("success")), 2)
  assert filtered.collect.criteria == "success" and filtered.collect.oracle is False
  with pytest.raises(ValueError, match="unknown variant"):
    recipes.toy_two_products("nope")
