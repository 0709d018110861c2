"""The config tree (docs/contracts.md §1): locked against typos, validated with errors that name the field."""

import pytest

from rise_jax import config as config_lib


def _fresh():
  return config_lib.base_config()


def test_base_config_validates_and_has_every_contract_section():
  c = config_lib.finalize(_fresh())
  config_lib.validate(c)
  for section in ("model", "tokenizer", "mesh", "task", "sampling", "collect", "train", "eval", "rise"):
    assert section in c, section
  for field in ("name", "output_dir", "seed"):
    assert field in c


def test_locked_config_rejects_a_typo():
  c = config_lib.finalize(_fresh())
  with pytest.raises(AttributeError):
    c.train.lrr = 1e-4  # the typo a locked config exists to catch
  c.train.lr = 2e-5  # an existing field is still writable


@pytest.mark.parametrize("field,value,needle", [
    ("sampling.top_p", 0.0, "sampling.top_p"),
    ("tokenizer.chat_template", "llama9", "tokenizer.chat_template"),
    ("tokenizer.chat_template", "/nowhere/chatml.jinja", "tokenizer.chat_template"),
    ("collect.criteria", "bestest", "collect.criteria"),
    ("train.estimator", "mean", "train.estimator"),
    ("eval.window", 1, "eval.window"),
    ("mesh.train", (2, -1, -1), "mesh.train"),
    ("train.micro_batch", 7, "train.micro_batch"),
    ("collect.tau", 0.0, "collect.tau"),
    ("sampling.block_size", 12, "sampling.block_size: must be a power of two"),
    ("sampling.block_size", 0, "sampling.block_size: must be a power of two"),
    ("sampling.slots", 0, "sampling.slots"),
    ("sampling.chunk_steps", 0, "sampling.chunk_steps"),
    ("train.lr", float("inf"), "train.lr: must be finite"),
    ("train.lr", float("nan"), "train.lr: must be finite"),
    ("train.lr", 0.0, "train.lr: must be finite and > 0"),
    ("sampling.temperature", float("inf"), "sampling.temperature: must be finite"),
    ("sampling.temperature", -0.5, "sampling.temperature: must be finite and >= 0"),
    ("rise.boost_lr", float("inf"), "rise.boost_lr: must be None or finite"),
    ("collect.tau", float("inf"), "collect.tau"),
    ("sampling.block_size", 8192, "sampling.block_size: 8192 exceeds sampling.max_cache_length"),
])
def test_validate_names_the_bad_field(field, value, needle):
  c = _fresh()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    config_lib.validate(c)


def test_training_requires_epochs_and_refuses_bf16_params_unless_allowed():
  c = _fresh()
  with pytest.raises(ValueError, match=r"train\.epochs"):
    config_lib.validate(c, require_training=True)
  c.train.epochs = 1
  c.model.param_dtype = "bfloat16"
  with pytest.raises(ValueError, match="allow_bf16_params"):
    config_lib.validate(c, require_training=True)
  c.train.allow_bf16_params = True
  config_lib.validate(c, require_training=True)


def test_config_hash_ignores_debug_and_diff_names_changed_fields():
  a, b = _fresh(), _fresh()
  b.debug.stop_after = "collect:3"
  assert config_lib.config_hash(a) == config_lib.config_hash(b)
  b.train.lr = 3e-5
  b.collect.tau = 1.0
  assert config_lib.config_hash(a) != config_lib.config_hash(b)
  assert config_lib.diff_fields(config_lib.to_dict(a), config_lib.to_dict(b)) == [
      "collect.tau", "debug.stop_after", "train.lr"]


def test_iteration_overrides_apply_to_their_iteration_only_and_are_validated():
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.rise.iterations = 2
  c.rise.iteration_overrides = ("1:collect.improvement=teacher", "1:collect.teacher.kind='reference'",
                                "1:collect.window=1", "2:train.lr=3e-4")
  c.lock()
  config_lib.validate(c, require_training=True)
  one, two = config_lib.for_iteration(c, 1), config_lib.for_iteration(c, 2)
  assert (one.collect.improvement, one.collect.teacher.kind, one.collect.window, one.train.lr) == (
      "teacher", "reference", 1, c.train.lr)
  assert (two.collect.improvement, two.collect.window, two.train.lr) == ("self", None, 3e-4)
  assert c.collect.improvement == "self" and c.collect.window is None  # the config itself is untouched
  for bad, needle in [(("1:collect.windw=1",), "windw"), (("3:collect.window=1",), r"iteration 3 is not in 1\.\.rise\.iterations \(2\)"),
                      (("1:eval.turns=2",), "only collect/train"), (("collect.window=1",), "T:section.field"),
                      (("1:collect.window=0",), "collect.window: must be None"),
                      (("1:train.lr=abc",), "train.lr")]:
    c.unlock()
    c.rise.iteration_overrides = bad
    c.lock()
    with pytest.raises(ValueError, match=needle):
      config_lib.validate(c)


@pytest.mark.parametrize("field,value,needle", [
    ("model.preset", "llama-9b", r"model\.preset: 'llama-9b' is not one of"),
    ("task.name", "gsm8", r"task\.name: 'gsm8' is not one of"),
    ("collect.tau", 0.03, r"collect\.tau: 0\.03: exp\(1 / tau\) exceeds"),
])
def test_validate_checks_registry_names_and_weight_range(field, value, needle):
  c = _fresh()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=needle):
    config_lib.validate(c)


def test_validate_checks_local_task_files_and_the_mesh_against_the_devices(tmp_path):
  c = _fresh()
  c.task.name, c.task.test_source = "gsm8k", str(tmp_path / "test.jsonl")
  with pytest.raises(ValueError, match=r"task\.test_source: '.*test\.jsonl' is not a file"):
    config_lib.validate(c)
  (tmp_path / "test.jsonl").write_text("{}\n")
  c.task.train_source = "openai/gsm8k:main"  # a hub id is not checked here
  config_lib.validate(c)
  c.mesh.sample = (2, 1, 1)
  config_lib.validate(c, num_devices=2)
  with pytest.raises(ValueError, match=r"mesh\.sample: mesh shape \(2, 1, 1\) needs 2 devices, have 8"):
    config_lib.validate(c, num_devices=8)
  c.mesh.sample = (3, -1, 1)
  with pytest.raises(ValueError, match=r"mesh\.sample: .*8 devices are not divisible by 3"):
    config_lib.validate(c, num_devices=8)


def test_config_hash_ignores_where_the_run_directory_is():
  a, b = _fresh(), _fresh()
  a.output_dir, b.output_dir = "/abs/runs/x", "./x/"
  assert config_lib.config_hash(a) == config_lib.config_hash(b)
  assert config_lib.diff_fields(config_lib.identity(config_lib.to_dict(a)),
                                config_lib.identity(config_lib.to_dict(b))) == []


def test_boost_validation_needs_a_dev_split_before_any_work():
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.task.dev_size = 0
  c.lock()
  with pytest.raises(ValueError, match=r"rise\.boost_validate_every: validates on the dev split"):
    config_lib.validate(c)


def test_the_pool_must_hold_one_request_at_the_cache_length():
  c = _fresh()
  c.sampling.max_cache_length, c.sampling.block_size = 64, 16
  c.sampling.max_new_tokens = 16
  for ok in (0, 4, 100):
    c.sampling.num_blocks = ok
    config_lib.validate(c)
  c.sampling.num_blocks = 3  # was refused only mid-run, by the engine, at the first long request
  with pytest.raises(ValueError, match=r"sampling\.num_blocks: 3 blocks cannot hold one request .* use >= 4"):
    config_lib.validate(c)


@pytest.mark.parametrize("override, needle", [
    ("1:collect.window=two", r"'1:collect\.window=two': field collect\.window expects int or None, got 'two'"),
    ("1:collect.window=1.5", r"field collect\.window expects int or None, got 1\.5"),
    ("1:train.max_grad_norm=big", r"field train\.max_grad_norm expects float or None, got 'big'"),
    ("1:collect.turns=True", r"field collect\.turns expects int, got True"),
    ("1:train.lr=inf", r"train\.lr: must be finite and > 0, got inf \(iteration 1, from rise\.iteration_overrides"),
    ("1:collect.window=0", r"collect\.window: must be None .*\(iteration 1"),
])
def test_override_values_are_typed_and_ranged_like_the_base_field(override, needle):
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.rise.iterations = 1
  c.rise.iteration_overrides = (override,)
  c.lock()
  with pytest.raises(ValueError, match=needle):
    config_lib.validate(c)


def test_override_values_keep_their_type():
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.rise.iterations = 1
  c.rise.iteration_overrides = ("1:train.lr=1", "1:train.max_grad_norm=None", "1:collect.window=2")
  c.lock()
  config_lib.validate(c)
  one = config_lib.for_iteration(c, 1)
  assert (one.train.lr, type(one.train.lr), one.train.max_grad_norm, one.collect.window) == (1.0, float, None, 2)


@pytest.mark.parametrize("path, local", [
    ("meta-llama/Llama-2-7b-chat-hf", False), ("gpt2", False), ("/no/such/dir", True), ("./ckpt", True),
    ("../ckpt", True), ("~/ckpt", True), ("runs/a/hf", True)])
def test_local_looking_model_paths_must_exist(path, local):
  assert config_lib.looks_local(path) == local
  c = _fresh()
  c.model.source, c.model.hf_path = "hf", path
  if local:
    with pytest.raises(ValueError, match=r"model\.hf_path: .* is a local path that does not exist"):
      config_lib.validate(c)
    c.model.hf_path, c.tokenizer.path = "meta-llama/Llama-2-7b-chat-hf", path
    with pytest.raises(ValueError, match=r"tokenizer\.path: .* is a local path that does not exist"):
      config_lib.validate(c)
  else:
    config_lib.validate(c)


def test_a_local_path_whose_first_component_exists_is_checked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "models").mkdir()
  c = _fresh()
  c.model.source, c.model.hf_path = "hf", "models/llama"
  with pytest.raises(ValueError, match=r"model\.hf_path: 'models/llama' is a local path"):
    config_lib.validate(c)
  (tmp_path / "models" / "llama").mkdir()
  config_lib.validate(c)


def test_a_retired_field_at_the_value_the_code_now_means_resumes_any_other_is_refused(tmp_path):
  """A directory written when `sampling.engine` existed: "paged" is what every run does now, so its results
  resume; "static" named a removed generator, so resuming would mix its samples with the engine's."""
  import json
  from rise_jax.pipeline import recipes, rundir
  config = config_lib.finalize(recipes.toy_smoke())
  saved = config_lib.to_dict(config)
  (tmp_path / "iter_0").mkdir()
  (tmp_path / "iter_0" / "rollouts.jsonl").write_text("{}\n")  # results exist: a differing config is refused
  for engine, resumes in (("paged", True), ("static", False)):
    saved["sampling"]["engine"] = engine
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    if resumes:
      assert rundir.check_config(tmp_path, config) is not None
    else:
      with pytest.raises(rundir.ConfigMismatch, match="sampling.engine"):
        rundir.check_config(tmp_path, config)


def test_a_field_added_later_resumes_a_directory_saved_before_it_at_the_value_that_meant_the_old_code(tmp_path):
  """`task.toy_form` did not exist before the a*b+c*d form: a directory saved then holds a+b*c problems, so it
  resumes under the default, keeps its stages' hashes, and is refused under the other form."""
  import json
  from rise_jax.pipeline import plan, recipes, rundir
  config = config_lib.finalize(recipes.toy_smoke())
  saved = config_lib.to_dict(config)
  del saved["task"]["toy_form"]
  (tmp_path / "iter_0").mkdir()
  (tmp_path / "iter_0" / "rollouts.jsonl").write_text("{}\n")
  (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
  assert rundir.check_config(tmp_path, config) is not None
  del saved["collect"]["teacher"]["prompt"]  # added later too, one level deeper
  (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
  assert rundir.check_config(tmp_path, config) is not None
  stage = plan.stage_named("iter_1/collect")
  assert not {"task.toy_form", "collect.teacher.prompt"} & set(plan.stage_fields(config, stage))
  harder = recipes.toy_smoke()
  harder.task.toy_form = "a*b+c*d"
  harder = config_lib.finalize(harder)
  assert plan.stage_fields(harder, stage)["task.toy_form"] == "a*b+c*d"
  with pytest.raises(rundir.ConfigMismatch, match="task.toy_form"):
    rundir.check_config(tmp_path, harder)


def test_toy_form_is_refused_unless_known_and_for_the_toy_task():
  c = config_lib.base_config()
  c.task.toy_form = "a*b*c"
  with pytest.raises(ValueError, match=r"task\.toy_form: 'a\*b\*c' is not one of"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.task.name, c.task.toy_form = "gsm8k", "a*b+c*d"
  with pytest.raises(ValueError, match=r"task\.toy_form: is an option of the toy task"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.task.name, c.task.toy_max_factor = "gsm8k", 12
  with pytest.raises(ValueError, match=r"task\.toy_max_factor: is an option of the toy task"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.task.toy_max_factor = 0
  with pytest.raises(ValueError, match=r"task\.toy_max_factor: must be an integer >= 1"):
    config_lib.validate(c)
