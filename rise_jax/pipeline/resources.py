"""Config -> objects: the one place that turns a config into what stages work with (task, prompt set, tokenizer,
meshes, models, learner and teacher policies, problem slices, log headers). The RISE loop and `rise_jax.evaluate`
both build their objects here, so an option cannot be honoured by one command and ignored by the other.

Everything is built lazily and once; the last model is kept so consecutive stages on one model (train -> eval) load
it once. A model passes between stages as the HF export of the train stage that made it (`<stage>/hf`); the base
model is the config's `model` section.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from rise_jax import chat
from rise_jax import config as config_lib
from rise_jax import files
from rise_jax import models
from rise_jax import sharding
from rise_jax.pipeline import plan as plan_lib
from rise_jax.pipeline import rundir
from rise_jax.pipeline.plan import StopRequested
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout import runner
from rise_jax.rollout.policies import EnginePolicy
from rise_jax.rollout.policies import ReferencePolicy
from rise_jax.rollout.policies import RepairPolicy
from rise_jax.rollout.policies import RepairPromptPolicy
from rise_jax.rollout.teacher import ChatCompletionsClient
from rise_jax.rollout.teacher import OpenAIChatPolicy
from rise_jax.sampling import requests
from rise_jax.sampling.engine import Engine
from rise_jax.tasks import task_from_config
from rise_jax.tasks.prompts import get_prompt_set
from rise_jax.train import data as train_data


class Resources:
  """What every stage of one run shares: config, task, prompt set, tokenizer, meshes, and the last model."""

  def __init__(self, config, root: str | pathlib.Path):
    self.config = config
    self.root = pathlib.Path(root)
    self.task = task_from_config(config.task)
    self._uncapped_task = None  # the task without task.train_size's cap (all_train_problems)
    self.prompts = get_prompt_set(config.task.prompt_set)
    self.config_hash, *self._legacy_hashes = config_lib.config_hashes(config)
    self._tokenizer = None
    self._model_key: Any = ()
    self._model = None

  def preflight(self, stages) -> None:
    """Load every problem split and data file `stages` will read, so that a bad source fails before the run
    directory is written, not at the first stage that reads it (hours in, after the base model's evaluation)."""
    c = self.config
    kinds = {s.kind for s in stages}
    needed = {}
    if kinds & {"collect", "boost_data"}:
      needed["train"] = "task.train_source"
    if "eval" in kinds:
      needed[c.eval.split] = eval_split_field(c)
    for split, field in needed.items():
      if not self.task.load(split):
        raise ValueError(f"config field {field}: the task's {split} split has no problems to run")
    if "collect" in kinds:
      for t in range(1, c.rise.iterations + 1):
        self.train_problems(t)  # a slice or a count past the training problems fails here, before any stage
    if c.rise.boost and c.rise.boost_data not in (None, "reference"):
      train_data.read_records(c.rise.boost_data)  # errors name file, line and field

  # -- tokenizer, meshes, models, policies -----------------------------------------------------------------------

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = chat.resolve_tokenizer(**config_lib.tokenizer_args(self.config, self.root))
    return self._tokenizer

  def mesh(self, kind: str):
    """The training or sampling mesh over all devices (the trainer builds the same training mesh)."""
    return sharding.make_mesh(tuple(self.config.mesh[kind]))

  def model(self, train_stage: str | None, mesh: str = "train"):
    """The model exported by `train_stage` (None: the config's base model) on the `mesh` mesh, kept for the next
    stage that asks for the same one. Callers that train it get a fresh copy (`load_model`)."""
    key = (train_stage, mesh)
    if self._model_key != key:
      self._model, self._model_key = None, ()
      self._model = self.load_model(train_stage, mesh)
      self._model_key = key
    return self._model

  def load_model(self, train_stage: str | None, mesh: str = "train"):
    c = self.config
    on = self.mesh(mesh)
    if train_stage is None:
      return models.load_model(c.model, mesh=on, on_indivisible=c.mesh.on_indivisible, seed=c.seed)
    path = self.root / train_stage / "hf"
    if not path.is_dir():
      raise FileNotFoundError(f"{path}: the model of stage {train_stage} is missing (was its directory edited?)")
    self._verify_export(train_stage, path)
    return models.load_model(c.model, mesh=on, on_indivisible=c.mesh.on_indivisible, path=path)

  def _verify_export(self, train_stage: str, path: pathlib.Path) -> None:
    """The export's weights against the digests its stage's DONE recorded (markers older than them: unchecked)."""
    done = self.root / train_stage / rundir.DONE_FILE
    if not done.is_file():
      return
    hint = f"delete {path} and re-run the same command to export it again from the last checkpoint"
    for name, digest in (rundir.read_done(done).get(HF_DIGESTS) or {}).items():
      if not (path / name).is_file():
        raise files.IntegrityError(f"{path / name}: missing though {done} records it; {hint}")
      files.verify_sha256(path / name, digest, done, hint)

  def forget_model(self):
    self._model, self._model_key = None, ()

  def learner(self, model, name: str):
    """`model` as a runner policy: the continuous-batching engine on the sampling mesh, set up by `sampling`
    (cache length, overflow policy, slots, block_size, chunk_steps, num_blocks; ids past the tokenizer's
    vocabulary never sampled). Every learner of every command is built here."""
    s = self.config.sampling
    chat.check_vocab(self.tokenizer, model.config)
    engine = Engine(model, slots=s.slots, max_seq_len=s.max_cache_length, block_size=s.block_size,
                    chunk_steps=s.chunk_steps, num_blocks=s.num_blocks or None, on_overflow=s.on_overflow,
                    vocab_limit=requests.vocab_limit(self.tokenizer, model.config), mesh=self.mesh("sample"))
    return EnginePolicy(engine, self.tokenizer, name=name)

  def teacher(self, config, problems):
    """The improvement policy of distillation (config: the iteration's): the task's reference solutions, its
    corrections of the failed attempts (the reference where it has none), a checkpoint through the engine, or an
    OpenAI-compatible API; the last two asked to repair the latest failed attempt under
    `collect.teacher.prompt = "repair"`."""
    policy = self._teacher(config, problems)
    if config.collect.teacher.prompt != "repair":
      return policy
    prompts = get_prompt_set(config.task.prompt_set)
    return RepairPromptPolicy(policy, prompts.repair, {p.id: p.question for p in problems})

  def _teacher(self, config, problems):
    t = config.collect.teacher
    if t.kind in ("reference", "repair"):
      references = {p.id: self.task.solution(p) for p in problems}
      if t.kind == "reference":
        return ReferencePolicy(references)
      by_id = {p.id: p for p in problems}
      return RepairPolicy(references, lambda key, attempt: self.task.repair(by_id[key].question, attempt,
                                                                            by_id[key].reference))
    if t.kind == "model":
      model = models.load_model(config.model, mesh=self.mesh("train"), on_indivisible=config.mesh.on_indivisible,
                                path=t.path)
      return self.learner(model, name=f"teacher:{pathlib.Path(t.path).name}")
    return OpenAIChatPolicy(ChatCompletionsClient(t.base_url, t.model, cache_dir=self.root / "teacher_cache"))

  def header(self, model: Any, stage=None) -> dict[str, Any]:
    """A rollout log's header: how it names the model, and the config hash of the fields `stage` depends on
    (`plan.stage_fields`: a change to other fields resumes the log; no stage: the whole config's)."""
    digest = self.config_hash if stage is None else config_lib.dict_hash(plan_lib.stage_fields(self.config, stage))
    return rollout_log.make_header(digest, model)

  def episodes(self, problems, policies, protocol, log_path: pathlib.Path, header, *, limit: int | None = None,
               what: str = "", desc: str | None = None, progress: bool = True):
    """`run_episodes` over `problems` (the first `limit` of them when the `debug.stop_after` hook asks, then
    StopRequested)."""
    todo = problems if limit is None else problems[:limit]
    logged = _logged_hash(log_path)
    # Begun before logs carried their stage's hash, or before a RETIRED field went: resume it under its own.
    if logged is not None and logged in (self.config_hash, *self._legacy_hashes):
      header = {**header, "config_hash": logged}
    summary = runner.run_episodes(todo, policies, protocol, log_path, task=self.task,
                                  prompts=self.prompts_for(protocol),
                                  batch_size=self.config.sampling.batch_size, header=header, desc=desc,
                                  progress=progress)
    if limit is not None and len(todo) < len(problems):
      raise StopRequested(f"debug.stop_after: stopped {what} after {limit} of {len(problems)} units")
    return summary

  def prompts_for(self, protocol):
    """The protocol's prompt set: it names its own (the Self-Refine baseline's), so the log says what was run."""
    return self.prompts if protocol.prompt_set == self.config.task.prompt_set else get_prompt_set(protocol.prompt_set)

  # -- problem slices --------------------------------------------------------------------------------------------

  def eval_problems(self):
    """The problems evaluation runs on: the `eval.split` split ("test", capped by task.test_size; "dev" for
    tuning)."""
    problems = self.task.load(self.config.eval.split)
    if not problems:
      raise ValueError(f"config field {eval_split_field(self.config)}: the task's {self.config.eval.split} split "
                       "has no problems to evaluate")
    return problems

  def boost_problems(self):
    """The boost stage's problems: the first rise.boost_size training problems (dev excluded), all by default,
    whatever task.train_size (the RISE collection cap) says."""
    problems = self.all_train_problems()
    size = self.config.rise.boost_size
    return problems if size is None else problems[:size]

  def all_train_problems(self):
    """Every training problem (dev excluded), whatever task.train_size says (the task is built and loaded once)."""
    if self._uncapped_task is None:
      uncapped = ml_collections.ConfigDict(config_lib.to_dict(self.config)["task"])
      uncapped.train_size = None
      self._uncapped_task = task_from_config(uncapped)
    return self._uncapped_task.load("train")

  def train_problems(self, iteration: int):
    """The problems RISE iteration T collects on: the first task.train_size training problems, or that
    iteration's collect.num_problems, or with rise.fresh_problems the T-th disjoint slice of task.train_size
    problems (iterative vs one-shot at equal data, Fig. 6c)."""
    c = self.config
    count = config_lib.for_iteration(c, iteration).collect.num_problems
    if count is not None:
      full = self.all_train_problems()
      if count > len(full):
        raise ValueError(f"config field collect.num_problems: {count} problems for iteration {iteration} exceed "
                         f"the {len(full)} training problems")
      return full[:count]
    if not c.rise.fresh_problems:
      return self.task.load("train")
    full = self.all_train_problems()
    size, lo = c.task.train_size, (iteration - 1) * c.task.train_size
    if lo + size > len(full):
      raise ValueError(f"config field task.train_size: {size} fresh problems for iteration {iteration} exceed "
                       f"the {len(full)} training problems")
    return full[lo:lo + size]


def _logged_hash(path: pathlib.Path) -> str | None:
  """The config hash in a rollout log's header line, if the file has a readable one."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.readline()).get("config_hash")
  except (OSError, ValueError, AttributeError):
    return None


HF_DIGESTS = "hf_sha256"  # the train stage's DONE: {weights file: sha256}, checked before a later stage loads it


def hf_digests(hf_dir: pathlib.Path) -> dict[str, str]:
  """sha256 of each weights file of an HF export (off the step path: once per stage, after training)."""
  return {p.name: files.sha256_file(p) for p in sorted(hf_dir.glob("*.safetensors"))}


def eval_split_field(config) -> str:
  """The config field that decides how many problems the `eval.split` split has."""
  return {"test": "task.test_source", "dev": "task.dev_size"}[config.eval.split]
