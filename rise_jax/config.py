"""The config tree every rise_jax command reads (docs/contracts.md §1).

`base_config()` returns the full tree with the reference recipe's defaults; experiment files under `configs/`
start from it and override fields. `validate(config)` checks enums and ranges and is called by every command
before any work starts, so a bad field fails in a second, not after an hour of sampling.

Configs are locked: assigning a field that does not exist (a typo in `--config.trian.lr=...`) is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from rise_jax.tasks import TASKS
from rise_jax.tasks import base as task_base
from rise_jax.tasks.graders import MODES as GRADERS
from rise_jax.tasks.toy import FORMS as TOY_FORMS

placeholder = config_dict.placeholder

# Each enum is defined once: here when config is the lowest module that needs it (the modules above import it
# from here), else where it is owned below (graders' modes; attention backends and remat policies, read in
# validate() from rise_jax.models so that importing config imports no JAX).
MODEL_SOURCES = ("preset", "hf")
DTYPES = ("float32", "bfloat16")
IMPROVEMENTS = ("self", "teacher")
TEACHER_KINDS = ("model", "openai", "reference", "repair")
TEACHER_PROMPTS = ("conversation", "repair")
CRITERIA = ("all", "better", "best", "success")
WEIGHTINGS = ("exp", "uniform")
ESTIMATORS = ("sample_mean", "token_mean", "self_normalised")
TIE_BREAKS = ("earliest", "latest", "random")
INIT_FROM = ("base", "previous")
RISE_DATA = ("current", "accumulated")
RISE_EVALUATE = ("all", "final")
ON_OVERFLOW = ("raise", "report")
ON_INDIVISIBLE = ("replicate", "raise")
MOMENTS_DTYPES = ("float32", "bfloat16")
# The largest example weight training accepts: Adam's second moment grows like weight**2, and float32 overflows
# at 3.4e38, so weights beyond this end a run in inf/nan instead of training.
MAX_EXAMPLE_WEIGHT = 1e12


def base_config() -> ml_collections.ConfigDict:
  """The whole tree with defaults; unlocked so experiment files can edit it, then locked by `finalize`."""
  c = ml_collections.ConfigDict()
  c.name = "rise"
  c.output_dir = "runs/rise"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.source = "preset"              # preset | hf
  c.model.preset = "tiny-llama"          # a name in rise_jax.models.configs.PRESETS
  c.model.hf_path = placeholder(str)     # local directory or hub id (source == "hf")
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"              # compute dtype; norms, softmax and logits stay float32
  c.model.scan_layers = False
  c.model.remat = "none"
  c.model.attention = "auto"             # auto (cudnn on GPUs, splash on TPUs, else xla) | xla | cudnn | splash

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = placeholder(str)    # defaults to model.hf_path when None
  c.tokenizer.chat_template = "auto"     # auto (the checkpoint's own) | llama2 | mistral | llama3 | toy | a .jinja path

  c.mesh = ml_collections.ConfigDict()
  c.mesh.train = (1, -1, 1)              # (data, fsdp, tensor); -1 = all remaining devices
  c.mesh.sample = (-1, 1, 1)
  c.mesh.on_indivisible = "replicate"    # a dimension the mesh axis does not divide: replicate + warn, or raise

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False       # call jax.distributed.initialize() (multi-host)
  c.distributed.coordinator_address = placeholder(str)
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)

  c.task = ml_collections.ConfigDict()
  c.task.name = "toy"                    # gsm8k | math | toy
  c.task.train_source = placeholder(str)  # hub name or local jsonl; None = the task's default
  c.task.test_source = placeholder(str)
  c.task.train_size = placeholder(int)   # cap on training problems used for collection (None = all)
  c.task.test_size = placeholder(int)    # cap on test problems used for evaluation (None = all)
  c.task.dev_size = 200                  # carved from train with a fixed seed, for tuning
  c.task.prompt_set = "paper"
  c.task.grader = "paper"                # paper | robust
  c.task.toy_form = "a+b*c"              # the toy task's problems: a+b*c | a*b+c*d | a*b+c*d/columns
  c.task.toy_max_factor = 9              # the toy task's factors are 1..toy_max_factor

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0                   # 0 = no top-k filter
  c.sampling.max_new_tokens = 1000
  c.sampling.max_cache_length = 4096
  c.sampling.batch_size = 32             # episodes in flight (the engine's queue holds their requests)
  c.sampling.on_overflow = "raise"
  c.sampling.slots = 64                  # decode rows run together in every chunk
  c.sampling.block_size = 16             # tokens per KV pool block (a power of two)
  c.sampling.chunk_steps = 8             # decode steps per jitted chunk (a finished row waits <= this)
  c.sampling.num_blocks = 0              # KV pool blocks; 0 = every slot at full length (a smaller pool waits)

  c.collect = ml_collections.ConfigDict()
  c.collect.turns = 2                    # K: the last turn is the improvement turn
  c.collect.samples_per_turn = 1         # N_t for turns 1..K-1
  c.collect.improvement = "self"         # self (best-of-N from the learner) | teacher
  c.collect.improvement_samples = 16     # N at the improvement turn (self-distillation best-of-N)
  c.collect.teacher = ml_collections.ConfigDict()
  c.collect.teacher.kind = "model"       # model (through the engine) | openai (chat-completions endpoint) |
                                         # reference (the task's reference solutions: distillation from ground truth) |
                                         # repair (the task's correction of the failed attempt: its right steps kept)
  c.collect.teacher.path = placeholder(str)
  c.collect.teacher.base_url = placeholder(str)
  c.collect.teacher.model = placeholder(str)
  c.collect.teacher.max_tokens = 1000
  c.collect.teacher.temperature = 1.0
  c.collect.teacher.prompt = "conversation"  # conversation (the learner's, as is) | repair (the prompt set's
                                             # repair template: the problem and the latest failed attempt)
  c.collect.criteria = "all"
  c.collect.weighting = "exp"            # exp: w = exp(r / tau); uniform: w = 1 (plain SFT)
  c.collect.tau = 0.4
  c.collect.only_success = False
  c.collect.dedupe = True
  c.collect.single_turn = False          # strip history: the paper's single-turn SFT control
  c.collect.max_resample_rounds = 3
  c.collect.oracle = True                # True: an episode stops at its first success (Algorithm 1); False: the
                                         # failure message follows right answers too, as at test time without an
                                         # oracle, so the data shows a right answer kept after it (all K turns run)
  c.collect.num_problems = placeholder(int)  # problems this iteration collects on: the first this many training
                                         # problems (dev excluded); None = task.train_size's (per iteration)
  c.collect.window = placeholder(int)    # history the policies see: None = all (Algorithm 1); 1 = the problem only,
                                         # so attempts are independent first-turn samples (a model that cannot read
                                         # a history yet); the training records keep the whole history either way

  c.train = ml_collections.ConfigDict()
  c.train.data_path = placeholder(str)   # rise_jax.sft/1 records (standalone `rise_jax.train`)
  c.train.demo_data = False              # write a small weighted toy dataset (+ toy tokenizer) there when absent
  c.train.estimator = "sample_mean"
  c.train.lr = 1e-5
  c.train.warmup_ratio = 0.04
  c.train.weight_decay = 0.0
  c.train.max_grad_norm = placeholder(float)  # None: the reference's DeepSpeed run did not clip (uncertain)
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.global_batch = 64
  c.train.micro_batch = 8
  c.train.epochs = placeholder(int)      # required: validate() refuses None when training runs
  c.train.max_length = 2048
  c.train.packing = False
  c.train.buckets_per_octave = 1         # padded step lengths per octave (1: powers of two); more = less padding, more compiles
  c.train.on_truncation = "report"       # report (count and skip) | raise
  c.train.allow_bf16_params = False
  c.train.moments_dtype = "float32"      # Adam mu/nu storage; bfloat16 halves it (stochastic rounding)
  c.train.ckpt_every = 500
  c.train.keep = 2
  c.train.log_every = 10
  c.train.steps_per_call = placeholder(int)  # optimiser steps per device call (a lax.scan); None = auto by model size
  c.train.profile_steps = placeholder(tuple)

  c.eval = ml_collections.ConfigDict()
  c.eval.turns = 5
  c.eval.parallel_k = 5
  c.eval.oracle = False                  # p1@tk is read from the no-oracle log anyway
  c.eval.window = placeholder(int)       # None = full history; W >= 2
  c.eval.tie_break = "earliest"
  c.eval.draws = 1
  c.eval.split = "test"                  # "dev" for tuning (docs/toy.md): never tune on test
  c.eval.self_refine = False             # also run the Self-Refine prompting baseline

  c.rise = ml_collections.ConfigDict()
  c.rise.iterations = 1
  c.rise.boost = False
  c.rise.boost_data = placeholder(str)   # SFT records for the boost stage; None = correct samples
  c.rise.init_from = "base"              # base | previous
  c.rise.data = "current"                # current | accumulated
  c.rise.single_turn_control = False     # also train the history-stripped control on the same data
  c.rise.mix_single_turn = False         # RISE also trains the control's history-stripped records of its episodes
  c.rise.evaluate = "all"                # all: every iteration's model (and control) | final: the base/boost and the
                                         # last iteration's only (intermediate models can be evaluated later)
  c.rise.boost_lr = placeholder(float)   # boost stage learning rate; None = train.lr (RISE loop)
  c.rise.boost_epochs = placeholder(int)  # boost stage epochs; None = train.epochs (RISE loop)
  c.rise.boost_size = placeholder(int)   # boost stage problems: the first this many training problems; None = all
  c.rise.boost_validate_every = placeholder(int)  # boost: dev-split m1@t1 every N steps (validation.jsonl); None = off
  c.rise.boost_stop_accuracy = placeholder(float)  # boost: stop at the first validation >= this; None = all epochs
  c.rise.fresh_problems = False          # iteration T collects on its own slice of task.train_size problems (RISE loop)
  # Per-iteration settings, "T:section.field=value" for a collect.* or train.* field, e.g. distillation in
  # iteration 1 and self-distillation after it: ("1:collect.improvement='teacher'",). See for_iteration().
  c.rise.iteration_overrides = ()

  c.debug = ml_collections.ConfigDict()
  c.debug.stop_after = placeholder(str)  # "<stage>:<n>": stop the run there (resume tests)
  return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Lock the tree (typos in overrides become errors) and return it."""
  config.lock()
  return config


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond: bool, field: str, msg: str):
  if not cond:
    raise ValueError(f"config field {field}: {msg}")


def _one_of(config, field: str, choices):
  value = _get(config, field)
  _check(value in choices, field, f"{value!r} is not one of {list(choices)}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _check_names(config) -> None:
  """Names that must exist in a registry (preset, task) and local task files that must exist."""
  if config.model.source == "preset":
    from rise_jax.models.configs import PRESETS
    _one_of(config, "model.preset", sorted(PRESETS))
  _one_of(config, "task.name", sorted(TASKS))
  _one_of(config, "task.toy_form", TOY_FORMS)
  for field in ("task.toy_form", "task.toy_max_factor"):
    _check(config.task.name == "toy" or _get(config, field) == ADDED[field], field,
           f"is an option of the toy task; task {config.task.name!r} has none")
  _check(isinstance(config.task.toy_max_factor, int) and config.task.toy_max_factor >= 1, "task.toy_max_factor",
         f"must be an integer >= 1, got {config.task.toy_max_factor!r}")
  from rise_jax.chat.templates import shipped_templates
  template = config.tokenizer.chat_template
  _check(template in ("auto", *shipped_templates()) or (str(template).endswith(".jinja") and os.path.isfile(
      os.path.expanduser(template))), "tokenizer.chat_template",
         f"{template!r} is not 'auto' (the checkpoint's own), one of {list(shipped_templates())} or an existing "
         ".jinja file")
  if config.task.name != "toy":  # the toy task enumerates its problems and reads no source
    for field in ("train_source", "test_source"):
      source = config.task[field]
      _check(source is None or not task_base.is_local(source) or os.path.isfile(source), f"task.{field}",
             f"{source!r} is not a file (a local .jsonl, or a hub id 'owner/name[:config]')")


def looks_local(path: str) -> bool:
  """Whether a model or tokenizer path names a local directory, which must then exist: absolute, starting with
  ~, ./ or ../, more than one '/', or a first component that exists here. Anything else ('owner/name',
  'gpt2') may be a hub id and is left to the loader."""
  if path.startswith(("/", "~", "./", "../")) or path in (".", "..") or path.count("/") > 1:
    return True
  return "/" in path and os.path.isdir(path.split("/", 1)[0])


def _check_local_paths(config) -> None:
  # train.demo_data writes the toy tokenizer where tokenizer.path points on first use
  fields = ([] if config.train.demo_data else ["tokenizer.path"]) + (
      ["model.hf_path"] if config.model.source == "hf" else [])
  for field in fields:
    path = _get(config, field)
    if path is not None and looks_local(path):
      _check(os.path.exists(os.path.expanduser(path)), field, f"{path!r} is a local path that does not exist "
             "(a hub id is 'owner/name')")


def _check_mesh(config, num_devices: int) -> None:
  from rise_jax.sharding import resolve_mesh_shape  # local: imports jax
  for name in ("train", "sample"):
    try:
      resolve_mesh_shape(tuple(config.mesh[name]), num_devices)
    except ValueError as e:
      _check(False, f"mesh.{name}", str(e))


def _check_teacher_prompt(config) -> None:
  """A repair-prompted teacher: a model or HTTP one (the other kinds read no prompt), and a prompt set with a
  repair template."""
  _one_of(config, "collect.teacher.prompt", TEACHER_PROMPTS)
  t = config.collect.teacher
  if t.prompt != "repair":
    return
  _check(t.kind in ("model", "openai"), "collect.teacher.prompt",
         f"'repair' prompts a 'model' or 'openai' teacher; kind {t.kind!r} reads no prompt ('repair' is the task's "
         "own correction, 'reference' its worked answer)")
  from rise_jax.tasks.prompts import get_prompt_set
  try:
    prompts = get_prompt_set(config.task.prompt_set)
  except (OSError, ValueError) as e:
    _check(False, "task.prompt_set", str(e))
  _check(prompts.repair_template is not None, "collect.teacher.prompt",
         f"'repair' needs a repair template, and task.prompt_set {config.task.prompt_set!r} has none")


def validate(config: ml_collections.ConfigDict, *, require_training: bool = False,
             num_devices: int | None = None, _per_iteration: bool = True) -> ml_collections.ConfigDict:
  """Check every enum, range, registry name and local task file; raise ValueError naming the field. With
  `num_devices` (the commands pass jax.device_count()) the meshes must fit that many devices. Returns the config
  for chaining."""
  _one_of(config, "model.source", MODEL_SOURCES)
  if config.model.source == "hf":
    _check(config.model.hf_path is not None, "model.hf_path", "required when model.source == 'hf'")
  else:
    _check(bool(config.model.preset), "model.preset", "required when model.source == 'preset'")
  _check_names(config)
  _check_local_paths(config)
  _one_of(config, "model.param_dtype", DTYPES)
  _one_of(config, "model.dtype", DTYPES)
  from rise_jax.models.attention import BACKENDS  # local: imports jax
  from rise_jax.models.transformer import REMAT_POLICIES
  _one_of(config, "model.attention", BACKENDS)
  _one_of(config, "model.remat", ("none", *REMAT_POLICIES))
  for name in ("train", "sample"):
    shape = tuple(config.mesh[name])
    _check(len(shape) == 3, f"mesh.{name}", f"{shape} must be (data, fsdp, tensor)")
    _check(all(isinstance(d, int) and (d >= 1 or d == -1) for d in shape), f"mesh.{name}",
           f"{shape}: each axis is a positive int or -1")
    _check(sum(d == -1 for d in shape) <= 1, f"mesh.{name}", f"{shape}: at most one -1 wildcard")
  _one_of(config, "mesh.on_indivisible", ON_INDIVISIBLE)
  if num_devices is not None:
    _check_mesh(config, num_devices)
  _check(config.task.dev_size >= 0, "task.dev_size", "must be >= 0")
  _one_of(config, "task.grader", GRADERS)
  s = config.sampling
  _check(_finite(s.temperature) and s.temperature >= 0, "sampling.temperature",
         f"must be finite and >= 0 (0 = greedy), got {s.temperature}")
  _check(0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
  _check(s.top_k >= 0, "sampling.top_k", "must be >= 0 (0 disables)")
  _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")
  _check(s.max_cache_length > s.max_new_tokens, "sampling.max_cache_length", "must exceed max_new_tokens")
  _check(s.batch_size >= 1, "sampling.batch_size", "must be >= 1")
  _one_of(config, "sampling.on_overflow", ON_OVERFLOW)
  _check(s.slots >= 1, "sampling.slots", "must be >= 1")
  _check(s.block_size >= 1 and not s.block_size & (s.block_size - 1), "sampling.block_size",
         f"must be a power of two >= 1, got {s.block_size}")
  _check(s.chunk_steps >= 1, "sampling.chunk_steps", "must be >= 1")
  _check(s.num_blocks >= 0, "sampling.num_blocks", f"must be >= 0 (0 = sized for every slot), got {s.num_blocks}")
  _check(s.block_size <= s.max_cache_length, "sampling.block_size",
         f"{s.block_size} exceeds sampling.max_cache_length ({s.max_cache_length}): every request pads to a block")
  # A request may grow to the cache length (on_overflow keeps it there), so the pool must hold one that long.
  full = -(-s.max_cache_length // s.block_size)
  _check(s.num_blocks == 0 or s.num_blocks >= full, "sampling.num_blocks",
         f"{s.num_blocks} blocks cannot hold one request of sampling.max_cache_length ({s.max_cache_length} tokens "
         f"= {full} blocks of {s.block_size}); use >= {full}, or 0 (sized for every slot)")
  co = config.collect
  _check(co.turns >= 1, "collect.turns", "must be >= 1")
  _check(co.samples_per_turn >= 1, "collect.samples_per_turn", "must be >= 1")
  _check(co.improvement_samples >= 1, "collect.improvement_samples", "must be >= 1")
  _one_of(config, "collect.improvement", IMPROVEMENTS)
  _one_of(config, "collect.teacher.kind", TEACHER_KINDS)
  if co.teacher.kind == "repair":
    _check(TASKS[config.task.name].repair is not task_base.Task.repair, "collect.teacher.kind",
           f"'repair' needs a task that corrects an attempt (Task.repair); task {config.task.name!r} has none "
           "(use 'reference')")
  _check(_finite(co.teacher.temperature) and co.teacher.temperature >= 0, "collect.teacher.temperature",
         f"must be finite and >= 0 (0 = greedy), got {co.teacher.temperature}")
  _check_teacher_prompt(config)
  if co.improvement == "teacher":
    if co.teacher.kind == "model":
      _check(co.teacher.path is not None, "collect.teacher.path", "required for a model teacher")
    elif co.teacher.kind == "openai":
      _check(co.teacher.base_url is not None, "collect.teacher.base_url", "required for an openai teacher")
      _check(co.teacher.model is not None, "collect.teacher.model", "required for an openai teacher")
  _one_of(config, "collect.criteria", CRITERIA)
  _one_of(config, "collect.weighting", WEIGHTINGS)
  _check(_finite(co.tau) and co.tau > 0, "collect.tau", "must be > 0 (use collect.only_success for filtering)")
  _check(co.weighting != "exp" or 1.0 / co.tau <= math.log(MAX_EXAMPLE_WEIGHT), "collect.tau",
         f"{co.tau}: exp(1 / tau) exceeds the largest training weight, {MAX_EXAMPLE_WEIGHT:g}")
  _check(co.max_resample_rounds >= 0, "collect.max_resample_rounds", "must be >= 0")
  _check(co.window is None or co.window >= 1, "collect.window", "must be None (full history) or >= 1")
  t = config.train
  _one_of(config, "train.estimator", ESTIMATORS)
  _check(_finite(t.lr) and t.lr > 0, "train.lr", f"must be finite and > 0, got {t.lr}")
  _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
  _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
  _check(t.max_grad_norm is None or (_finite(t.max_grad_norm) and t.max_grad_norm > 0), "train.max_grad_norm",
         "must be None or finite and > 0")
  _check(t.global_batch >= 1 and t.micro_batch >= 1, "train.global_batch", "batches must be >= 1")
  _check(t.global_batch % t.micro_batch == 0, "train.micro_batch",
         f"must divide train.global_batch ({t.micro_batch} vs {t.global_batch})")
  _check(t.max_length >= 8, "train.max_length", "must be >= 8")
  _check(t.buckets_per_octave in (1, 2, 4, 8), "train.buckets_per_octave", "must be 1, 2, 4 or 8")
  _check(t.keep >= 2, "train.keep", "keep at least 2 checkpoints (a torn latest one falls back)")
  _check(t.ckpt_every >= 1 and t.log_every >= 1, "train.ckpt_every", "intervals must be >= 1")
  _check(t.steps_per_call is None or t.steps_per_call >= 1, "train.steps_per_call", "must be None (auto) or >= 1")
  _one_of(config, "train.on_truncation", ("report", "raise"))
  _one_of(config, "train.moments_dtype", MOMENTS_DTYPES)
  if require_training:
    _check(t.epochs is not None and t.epochs >= 1, "train.epochs", "is required (>= 1)")
    if config.model.param_dtype == "bfloat16":
      _check(t.allow_bf16_params, "model.param_dtype",
             "bfloat16 parameters lose most updates at lr 1e-5; set train.allow_bf16_params=True to insist")
  if t.profile_steps is not None:
    _check(len(t.profile_steps) == 2 and t.profile_steps[0] < t.profile_steps[1], "train.profile_steps",
           "must be (start, stop) with start < stop")
  e = config.eval
  _check(e.turns >= 1 and e.parallel_k >= 1, "eval.turns", "turns and parallel_k must be >= 1")
  _check(e.split in ("test", "dev"), "eval.split", f"must be 'test' or 'dev', got {e.split!r}")
  _check(e.window is None or e.window >= 2, "eval.window",
         "must be None (full history) or >= 2 (W = 1 would drop every attempt)")
  _one_of(config, "eval.tie_break", TIE_BREAKS)
  _check(e.draws >= 1, "eval.draws", "must be >= 1")
  r = config.rise
  _check(r.iterations >= 0, "rise.iterations", "must be >= 0")
  _one_of(config, "rise.init_from", INIT_FROM)
  _one_of(config, "rise.data", RISE_DATA)
  _one_of(config, "rise.evaluate", RISE_EVALUATE)
  _check(not (r.mix_single_turn and co.single_turn), "rise.mix_single_turn",
         "collect.single_turn already strips RISE's records: mixing would add each one twice")
  _check(r.boost_lr is None or (_finite(r.boost_lr) and r.boost_lr > 0), "rise.boost_lr",
         f"must be None or finite and > 0, got {r.boost_lr}")
  _check(r.boost_epochs is None or r.boost_epochs >= 1, "rise.boost_epochs", "must be None or >= 1")
  _check(r.boost_size is None or r.boost_size >= 1, "rise.boost_size", "must be None or >= 1")
  _check(r.boost_validate_every is None or r.boost_validate_every >= 1, "rise.boost_validate_every",
         "must be None or >= 1")
  _check(r.boost_stop_accuracy is None or (r.boost_validate_every is not None and 0 < r.boost_stop_accuracy <= 1),
         "rise.boost_stop_accuracy", "must be None, or in (0, 1] with rise.boost_validate_every set")
  _check(r.boost_validate_every is None or config.task.dev_size > 0, "rise.boost_validate_every",
         "validates on the dev split: needs task.dev_size > 0")
  _check(not r.fresh_problems or config.task.train_size is not None, "rise.fresh_problems",
         "needs task.train_size (the number of fresh problems per iteration)")
  n = config.collect.num_problems
  _check(n is None or (isinstance(n, int) and n >= 1), "collect.num_problems", f"must be None or >= 1, got {n!r}")
  _check(n is None or not r.fresh_problems, "collect.num_problems",
         "takes the first training problems; rise.fresh_problems gives each iteration its own slice instead")
  overrides = parse_overrides(r.iteration_overrides, r.iterations)
  for t in sorted(overrides) if _per_iteration else ():  # each iteration's own settings must be valid too
    try:
      validate(for_iteration(config, t), require_training=require_training, num_devices=num_devices,
               _per_iteration=False)
    except ValueError as e:
      entries = ", ".join(repr(x) for x in r.iteration_overrides if str(x).partition(":")[0].strip() == str(t))
      raise ValueError(f"{e} (iteration {t}, from rise.iteration_overrides {entries})") from None
  return config


# Fields a command does not use but a user could expect it to follow: setting one is an error naming the field,
# never silently ignored (tests/test_config_fields.py checks every command's reads against the source).
NOT_HONOURED = {
    "run": {"train.data_path": "the RISE loop trains on the data it collects; it is `rise_jax.train`'s input",
            "train.demo_data": "the RISE loop trains on the data it collects; it is `rise_jax.train`'s option"},
    "evaluate": {"distributed.initialize": "rise_jax.evaluate runs on one host; multi-host runs go through "
                                           "rise_jax.run"},
}


def tokenizer_args(config: ml_collections.ConfigDict, build_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """The tokenizer a config means, as `chat.resolve_tokenizer`'s arguments: tokenizer.path; else the checkpoint's
  own (model.source = "hf"); else, for the toy task with a build_dir, the toy tokenizer built there. Anything else
  has no tokenizer: an error naming the field."""
  checkpoint = config.model.hf_path if config.model.source == "hf" else None
  toy_dir = build_dir if config.task.name == "toy" else None
  _check(config.tokenizer.path is not None or checkpoint is not None or toy_dir is not None, "tokenizer.path",
         "required (a preset model on a non-toy task has no tokenizer)")
  return {"path": config.tokenizer.path, "checkpoint": checkpoint, "toy_dir": toy_dir,
          "chat_template": config.tokenizer.chat_template}


def check_command(config: ml_collections.ConfigDict, command: str) -> ml_collections.ConfigDict:
  """Refuse a field `command` would silently ignore (`NOT_HONOURED`): a value other than the default is an
  error naming the field. Returns the config for chaining."""
  defaults = base_config()
  for field, why in NOT_HONOURED.get(command, {}).items():
    _check(_get(config, field) == _get(defaults, field), field, f"rise_jax.{command} does not read it ({why})")
  return config


OVERRIDABLE = ("collect", "train")


def parse_overrides(overrides, iterations: int) -> dict[int, list[tuple[str, Any]]]:
  """rise.iteration_overrides -> {T: [(dotted field, value)]}; values are Python literals (bare words: strings).
  Errors name the entry: a bad form, an iteration outside 1..iterations, or a field outside collect/train."""
  import ast
  out: dict[int, list[tuple[str, Any]]] = {}
  for entry in overrides:
    where = f"config field rise.iteration_overrides: {entry!r}"
    head, sep, value_text = str(entry).partition("=")
    t_text, colon, field = head.partition(":")
    if not (sep and colon and t_text.strip().isdigit() and field.strip()):
      raise ValueError(f"{where} is not 'T:section.field=value'")
    t, field = int(t_text), field.strip()
    if not 1 <= t <= iterations:
      raise ValueError(f"{where}: iteration {t} is not in 1..rise.iterations ({iterations})")
    if field.split(".")[0] not in OVERRIDABLE:
      raise ValueError(f"{where}: only {'/'.join(OVERRIDABLE)}.* fields vary per iteration")
    try:
      value = ast.literal_eval(value_text.strip())
    except (ValueError, SyntaxError):
      value = value_text.strip()
    out.setdefault(t, []).append((field, _typed_override(field, value, where)))
  return out


def _field_type(field: str) -> tuple[type | None, bool]:
  """(the base field's value type, whether None is allowed) from base_config(); (None, True) when unknown."""
  node = base_config()
  *parents, leaf = field.split(".")
  try:
    for p in parents:
      node = node[p]
    ref = node.get_ref(leaf)
  except (KeyError, AttributeError):
    return None, True  # a misspelt field: for_iteration's locked tree names it
  value = ref.get()
  return ref.get_type(), value is None


def _typed_override(field: str, value: Any, where: str) -> Any:
  """An override value of the base field's type (int, float, bool, str, tuple; None where the default is None),
  so a bad one is refused here, by type, and then ranged by validate() like the base field."""
  kind, nullable = _field_type(field)
  if value is None or kind is None:
    if value is None and not nullable:
      raise ValueError(f"{where}: field {field} may not be None")
    return value
  if kind is float and isinstance(value, str):
    try:
      value = float(value)  # "inf" / "nan" are not Python literals; validate() refuses them by range
    except ValueError:
      pass
  ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, (tuple, list))}.get(kind, lambda v: True)
  if not ok(value):
    allowed = f"{kind.__name__}{' or None' if nullable else ''}"
    raise ValueError(f"{where}: field {field} expects {allowed}, got {value!r} ({type(value).__name__})")
  return float(value) if kind is float else (tuple(value) if kind is tuple else value)


def for_iteration(config: ml_collections.ConfigDict, iteration: int) -> ml_collections.ConfigDict:
  """The config iteration T runs with (a copy when anything changes; the tree stays locked, so a misspelt field
  is an error naming it): for T >= 1 `config` with its rise.iteration_overrides for T applied; for T = 0, the
  boost, train.lr and train.epochs replaced by rise.boost_lr and rise.boost_epochs where those are set."""
  if iteration == 0:
    boost = (("train.lr", config.rise.boost_lr), ("train.epochs", config.rise.boost_epochs))
    overrides = [(field, value) for field, value in boost if value is not None]
  else:
    overrides = parse_overrides(config.rise.iteration_overrides, config.rise.iterations).get(iteration)
  if not overrides:
    return config
  out = config.copy_and_resolve_references()
  out.lock()
  for field, value in overrides:
    *parents, leaf = field.split(".")
    node = out
    try:
      for p in parents:
        node = node[p]
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise ValueError(f"config field rise.iteration_overrides: {iteration}:{field}: {e}") from None
  return out


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Fields that are not part of a run's identity: debug hooks, and where the run directory is (the same directory
# spelled `/abs/x`, `./x` or `x/`, or moved, must resume).
NOT_IDENTITY = ("debug", "output_dir")
# Removed fields, with the value that meant what the code does now: a saved config holding that value resumes; any
# other value is a differing field (the results were made by a path the code no longer has).
RETIRED = {"sampling.engine": "paged"}
# Fields added later, with the value that means what the code did before them: at that value a field is not part
# of the identity, so a run saved before it existed resumes, and its stages' hashes stay the same.
ADDED = {"task.toy_form": "a+b*c", "task.toy_max_factor": 9, "collect.teacher.prompt": "conversation",
         "collect.num_problems": None}


def identity(d: dict[str, Any]) -> dict[str, Any]:
  """A config dict without the fields that do not change results (`NOT_IDENTITY`, `RETIRED` and `ADDED` at their
  value)."""
  out = {k: v for k, v in d.items() if k not in NOT_IDENTITY}
  for dotted, value in {**RETIRED, **ADDED}.items():
    *parents, name = dotted.split(".")
    out = _without(out, parents, name, value)
  return out


def _without(d: dict[str, Any], parents: list[str], name: str, value: Any) -> dict[str, Any]:
  """d with d[parents...][name] removed where it equals value (copies along the path only)."""
  if not parents:
    return {k: v for k, v in d.items() if k != name} if name in d and d[name] == value else d
  head, *rest = parents
  if not isinstance(d.get(head), dict):
    return d
  return {**d, head: _without(d[head], rest, name, value)}


def _with(d: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
  """d with d[path...] set to value where its parent section exists and the field does not (else d itself)."""
  head, *rest = path
  if not rest:
    return d if head in d else {**d, head: value}
  if not isinstance(d.get(head), dict):
    return d
  inner = _with(d[head], rest, value)
  return d if inner is d[head] else {**d, head: inner}


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Stable hash of the fields that change results (`identity`)."""
  return dict_hash(identity(to_dict(config)))


def config_hashes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config_hash`, then the hashes the same config had while each `RETIRED` field was still a field (written
  into logs begun then, which therefore resume)."""
  d = identity(to_dict(config))
  legacy = [_with(d, dotted.split("."), value) for dotted, value in RETIRED.items()]
  return (dict_hash(d), *(dict_hash(x) for x in legacy if x is not d))


def dict_hash(d: dict[str, Any]) -> str:
  """The 16-hex-digit config hash of a (part of a) config dict: a run's, or one stage's fields'."""
  return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted field: value} of a config dict."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two config dicts (for refusing a resume)."""
  out = []
  for key in sorted(set(a) | set(b)):
    name = f"{prefix}{key}"
    va, vb = a.get(key, math.nan), b.get(key, math.nan)
    if isinstance(va, dict) and isinstance(vb, dict):
      out.extend(diff_fields(va, vb, name + "."))
    elif va != vb:
      out.append(name)
  return out
