"""The body of each stage of a RISE run (`rise_jax.run` decides which stage runs when and marks it done).

Every stage reads its inputs from earlier stages' directories and writes only into its own, so a stage can be
re-run from scratch or resumed: collection and evaluation resume from their rollout logs (the runner skips
finished problems), training from its last checkpoint. A model passes between stages as the HF export of the
train stage that made it (`<stage>/hf`); the base model is the config's `model` section.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from rise_jax import config as config_lib
from rise_jax import rundir
from rise_jax.rise import collect as collect_lib
from rise_jax.rise import dataset as dataset_lib


class Context:
  """What every stage of one run shares: config, task, prompt set, tokenizer, meshes, and the last model."""

  def __init__(self, config, root: pathlib.Path):
    from rise_jax.rise.prompts import get_prompt_set
    from rise_jax.rise.tasks import task_from_config
    self.config = config
    self.root = pathlib.Path(root)
    self.task = task_from_config(config.task)
    self.prompts = get_prompt_set(config.task.prompt_set)
    self.config_hash = config_lib.config_hash(config)
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
      needed[c.eval.split] = {"test": "task.test_source", "dev": "task.dev_size"}[c.eval.split]
    for split, field in needed.items():
      if not self.task.load(split):
        raise ValueError(f"config field {field}: the task's {split} split has no problems to run")
    if c.rise.fresh_problems:
      for t in range(1, c.rise.iterations + 1):
        self.train_problems(t)
    if c.rise.boost and c.rise.boost_data not in (None, "reference"):
      from rise_jax.train import data as train_data
      train_data.read_records(c.rise.boost_data)  # errors name file, line and field

  # -- shared resources --------------------------------------------------------------------------------------

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from rise_jax import chat
      c = self.config
      path = c.tokenizer.path
      if path is None and c.task.name == "toy" and c.model.source == "preset":
        from rise_jax.rise.tasks import build_toy_tokenizer
        path = build_toy_tokenizer(self.root / "tokenizer")  # a pure function of the code: rebuilt identically
      path = path or c.model.hf_path
      if path is None:
        raise ValueError("config field tokenizer.path: required (no model.hf_path to take it from)")
      self._tokenizer = chat.load_tokenizer(path, c.tokenizer.chat_template)
    return self._tokenizer

  def mesh(self, kind: str):
    """The training or sampling mesh over all devices (the trainer builds the same training mesh)."""
    from rise_jax import sharding
    return sharding.make_mesh(tuple(self.config.mesh[kind]))

  def model(self, train_stage: str | None):
    """The model exported by `train_stage` (None: the config's base model), on the training mesh.

    The last model is kept: consecutive stages on one model (train -> eval) load it once. Callers that train it
    get a fresh copy (`fresh=True` through `load_model`).
    """
    if self._model_key != train_stage:
      self._model, self._model_key = None, ()
      self._model = self.load_model(train_stage)
      self._model_key = train_stage
    return self._model

  def load_model(self, train_stage: str | None):
    from rise_jax import models
    c = self.config
    mesh = self.mesh("train")
    if train_stage is None:
      return models.load_model(c.model, mesh=mesh, on_indivisible=c.mesh.on_indivisible, seed=c.seed)
    path = self.root / train_stage / "hf"
    if not path.is_dir():
      raise FileNotFoundError(f"{path}: the model of stage {train_stage} is missing (was its directory edited?)")
    return models.load_hf_checkpoint(path, dtype=c.model.param_dtype, mesh=mesh, compute_dtype=c.model.dtype,
                                     attention=c.model.attention, scan_layers=c.model.scan_layers,
                                     remat=c.model.remat, on_indivisible=c.mesh.on_indivisible)

  def forget_model(self):
    self._model, self._model_key = None, ()

  def learner(self, model, name: str):
    """The model as a runner policy, through the sampler on the sampling mesh."""
    from rise_jax.rise.policies import sampler_policy
    return sampler_policy(self.config, model, self.tokenizer, self.mesh("sample"), name=name)

  def teacher(self, config, problems):
    """The improvement policy of distillation (config: the iteration's): the task's reference solutions, a
    checkpoint through the sampler, or an OpenAI-compatible API."""
    t = config.collect.teacher
    if t.kind == "reference":
      from rise_jax.rise.policies import ReferencePolicy
      return ReferencePolicy({p.id: p.reference for p in problems})
    if t.kind == "model":
      from rise_jax import models
      model = models.load_hf_checkpoint(t.path, dtype=config.model.dtype, mesh=self.mesh("train"))
      return self.learner(model, name=f"teacher:{pathlib.Path(t.path).name}")
    from rise_jax.rise.teacher import OpenAIChatPolicy
    return OpenAIChatPolicy(base_url=t.base_url, model=t.model, cache_dir=self.root / "teacher_cache")

  def turn_sampling(self, teacher: bool = False):
    return turn_sampling(self.config, teacher)

  def header(self, model_name: str) -> dict[str, Any]:
    from rise_jax.rise import rollout_log
    return rollout_log.make_header(self.config_hash, model_name)

  def boost_problems(self):
    """The boost stage's problems: the first rise.boost_size training problems (dev excluded), all by default,
    whatever task.train_size (the RISE collection cap) says."""
    problems = self.all_train_problems()
    size = self.config.rise.boost_size
    return problems if size is None else problems[:size]

  def all_train_problems(self):
    """Every training problem (dev excluded), whatever task.train_size says."""
    import ml_collections

    from rise_jax.rise.tasks import task_from_config
    uncapped = ml_collections.ConfigDict(config_lib.to_dict(self.config)["task"])
    uncapped.train_size = None
    return task_from_config(uncapped).load("train")

  def train_problems(self, iteration: int):
    """The problems RISE iteration T collects on: the first task.train_size training problems, or with
    rise.fresh_problems the T-th disjoint slice of that many (iterative vs one-shot at equal data, Fig. 6c)."""
    c = self.config
    if not c.rise.fresh_problems:
      return self.task.load("train")
    full = self.all_train_problems()
    size, lo = c.task.train_size, (iteration - 1) * c.task.train_size
    if lo + size > len(full):
      raise ValueError(f"config field task.train_size: {size} fresh problems for iteration {iteration} exceed "
                       f"the {len(full)} training problems")
    return full[lo:lo + size]


# -- stages -----------------------------------------------------------------------------------------------------

def run_stage(ctx: Context, stage, run_dir, *, limit: int | None) -> dict[str, Any]:
  """Run one stage; returns what its DONE marker records. `limit`: stop after that many units."""
  body = {"boost_data": boost_data, "collect": collect, "train": train, "eval": evaluate}[stage.kind]
  out_dir = run_dir.stage_dir(stage.name)
  out_dir.mkdir(parents=True, exist_ok=True)
  return body(ctx, stage, out_dir, limit=limit)


def _stop(limit: int | None, done: int, total: int, stage) -> None:
  if limit is not None and done >= limit and limit < total:
    from rise_jax.rise.loop import StopRequested
    raise StopRequested(f"debug.stop_after: stopped {stage.name} after {limit} of {total} units")


def _episodes(ctx: Context, problems, policies, protocol, log_path: pathlib.Path, header, limit, stage, desc):
  """run_episodes over `problems` (the first `limit` of them when the stop hook asks), then stop if it did."""
  from rise_jax.rise import rollout
  todo = problems if limit is None else problems[:limit]
  summary = rollout.run_episodes(todo, policies, protocol, log_path, task=ctx.task, prompts=ctx.prompts,
                                 batch_size=ctx.config.sampling.batch_size, header=header, desc=desc)
  _stop(limit, len(todo), len(problems), stage)
  return summary


def _log_accounting(log_path: pathlib.Path, problems) -> dict[str, Any]:
  """The log's records in problem order, whatever order episodes finished in (a resumed run's chunks differ
  from an uninterrupted run's, its dataset must not), and the log's token accounting."""
  from rise_jax.rise import metrics, rollout_log
  _, records, torn = rollout_log.read_rollouts(log_path)
  order = {p.id: i for i, p in enumerate(problems)}
  missing = [r["problem_id"] for r in records if r["problem_id"] not in order]
  if missing or len(records) != len(order):
    raise ValueError(f"{log_path}: holds {len(records)} episodes for {len(order)} problems "
                     f"(e.g. unexpected {missing[:3]}); was the log written by another config?")
  records.sort(key=lambda r: order[r["problem_id"]])
  return {"records": records, "torn": torn, "accounting": metrics.compute_accounting(records)}


def turn_sampling(config, teacher: bool = False):
  """Sampling parameters of a learner turn, or of the teacher's turn (its own temperature and token limit)."""
  from rise_jax.rise.policies import TurnSampling
  s, t = config.sampling, config.collect.teacher
  if teacher:
    return TurnSampling(temperature=t.temperature, top_p=1.0, top_k=0, max_new_tokens=t.max_tokens)
  return TurnSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)


def collection_protocol(config):
  """Algorithm 1: turns 1..K-1 from the learner, turn K the improvement turn; best reward continues; stop at
  the first success (an oracle, as the reference's collection does), or with `collect.oracle=False` run all K
  turns with the failure message after every one, the condition the model meets at test time without an oracle."""
  from rise_jax.rise.rollout import Protocol
  co = config.collect
  learner = turn_sampling(config)
  last = turn_sampling(config, teacher=co.improvement == "teacher")
  samples = (co.samples_per_turn,) * (co.turns - 1) + (co.improvement_samples,)
  return Protocol.sequential(co.turns, samples=samples, select="best_reward", oracle=co.oracle, window=co.window,
                             sampling=(learner,) * (co.turns - 1) + (last,), grader=config.task.grader,
                             prompt_set=config.task.prompt_set, seed=config.seed,
                             max_resample_rounds=co.max_resample_rounds)


def collect(ctx: Context, stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Iteration T's Algorithm 1 rollouts with the newest model, then D_T (and its history-stripped twin)."""
  from rise_jax.rise.loop import model_stage
  t = stage.iteration
  c = config_lib.for_iteration(ctx.config, t)
  source = model_stage(c, t - 1)
  model = ctx.model(source)
  name = f"learner@iter_{t - 1}"
  learner = ctx.learner(model, name)
  problems = ctx.train_problems(t)
  improver = ctx.teacher(c, problems) if c.collect.improvement == "teacher" else learner
  policies = [learner] * (c.collect.turns - 1) + [improver]
  t0 = time.perf_counter()
  run = _episodes(ctx, problems, policies, collection_protocol(c), out_dir / "rollouts.jsonl",
                  ctx.header(name), limit, stage, f"collect iter {t}")
  seconds = time.perf_counter() - t0
  log = _log_accounting(out_dir / "rollouts.jsonl", problems)
  info = _build(ctx, c, log["records"], out_dir, t)
  return {"episodes": len(log["records"]), "torn_lines": log["torn"], "tokens": log["accounting"],
          "decode_tokens": log["accounting"]["decode_tokens"], "decode_tokens_this_run": run.decode_tokens,
          "sampling_seconds_this_run": seconds, "tokens_per_s": run.tokens_per_s, **info}


def _build(ctx: Context, c, records, out_dir: pathlib.Path, iteration: int) -> dict[str, Any]:
  """Write D_T under out_dir/ and, for the single-turn control, its history-stripped twin under control/
  (c: the iteration's config)."""
  questions = {r["problem_id"]: r["question"] for r in records}
  initial = lambda pid: ctx.prompts.initial_messages(questions[pid])  # noqa: E731
  reward_values = collect_lib.reward_range(c.task.name, c.task.grader)
  out = {}
  variants = [("", False)] + ([("control", True)] if c.rise.single_turn_control else [])
  for sub, single in variants:
    options = collect_lib.ConversionOptions.from_config(c, iteration=iteration, single_turn=single or None)
    conversion = collect_lib.convert_rollouts(records, initial, options, source=str(out_dir / "rollouts.jsonl"))
    summary = dataset_lib.write_dataset(conversion, out_dir / sub if sub else out_dir, options=options,
                                        reward_values=reward_values, tokenizer=ctx.tokenizer)
    out[f"{sub or 'rise'}_records"] = summary["num_records"]
    out[f"{sub or 'rise'}_token_drift"] = (summary["token_drift"] or {}).get("fraction")
  return out


def boost_data(ctx: Context, stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """The boost stage's SFT data: given records, the task's reference solutions, or correct samples."""
  c = ctx.config
  source = c.rise.boost_data
  options = collect_lib.ConversionOptions(criteria="success", weighting="uniform", dedupe=True, iteration=0)
  reward_values = collect_lib.reward_range(c.task.name, c.task.grader)
  if source is None:  # correct samples of the improvement policy, first turn only
    from rise_jax.rise.rollout import Protocol
    teacher = c.collect.improvement == "teacher"
    problems = ctx.boost_problems()
    policy = ctx.teacher(c, problems) if teacher else ctx.learner(ctx.model(None), "learner@base")
    protocol = Protocol.sequential(1, samples=c.collect.improvement_samples, select="best_reward", oracle=True,
                                   sampling=ctx.turn_sampling(teacher), grader=c.task.grader,
                                   prompt_set=c.task.prompt_set, seed=c.seed,
                                   max_resample_rounds=c.collect.max_resample_rounds)
    _episodes(ctx, problems, policy, protocol, out_dir / "rollouts.jsonl", ctx.header(policy.name), limit, stage,
              "boost samples")
    records = _log_accounting(out_dir / "rollouts.jsonl", problems)["records"]
    questions = {r["problem_id"]: r["question"] for r in records}
    conversion = collect_lib.convert_rollouts(records, lambda pid: ctx.prompts.initial_messages(questions[pid]),
                                              options, source=str(out_dir / "rollouts.jsonl"))
  elif source == "reference":  # the task's own worked answers (the toy task's scratchpads)
    conversion = collect_lib.Conversion(records=[], sampled_ids=[], stats=collect_lib.ConversionStats())
    for p in ctx.boost_problems():
      conversion.records.append({
          "id": f"{p.id}#boost", "weight": 1.0,
          "messages": ctx.prompts.initial_messages(p.question) + [
              {"role": "assistant", "content": p.reference, "train": True}],
          "meta": {"problem_id": p.id, "iteration": 0, "turn": 1, "position": 1, "reward": 1.0,
                   "source": "reference", "criteria": "success", "grader": c.task.grader, "single_turn": True}})
      conversion.sampled_ids.append(None)
    conversion.stats.episodes = conversion.stats.examples = len(conversion.records)
  else:  # a file or directory of rise_jax.sft/1 records
    from rise_jax.train import data as train_data
    records = [{"id": r.id, "weight": r.weight, "messages": [dict(m) for m in r.messages], "meta": {"reward": 1.0}}
               for r in train_data.read_records(source)]
    conversion = collect_lib.Conversion(records=records, sampled_ids=[None] * len(records),
                                        stats=collect_lib.ConversionStats(examples=len(records)))
  summary = dataset_lib.write_dataset(conversion, out_dir, options=options, reward_values=reward_values,
                                      extra={"boost_source": source or "correct_samples"})
  return {"records": summary["num_records"], "source": source or "correct_samples"}


def train(ctx: Context, stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Train the stage's initial model on its data; the trainer resumes from out_dir/ckpt and exports out_dir/hf."""
  from rise_jax.rise import loop as loop_lib
  from rise_jax import train as train_lib
  c, t = ctx.config, stage.iteration
  init = loop_lib.init_stage(c, t, stage.control)
  sub = "control/data" if stage.control else "data"
  from rise_jax.train import data as train_data
  records = []  # validated by the trainer's own sft/1 reader
  for collect_stage in loop_lib.data_stages(c, t):
    records += train_data.read_records(ctx.root / collect_stage / sub / dataset_lib.DATA_FILE)
  model = ctx.load_model(init)  # train() leaves it untouched and returns the trained model
  ctx.forget_model()
  train_config = _train_config(config_lib.for_iteration(c, t) if t else c, boost=(t == 0), limit=limit)
  validation = None
  if t == 0 and c.rise.boost_validate_every is not None:
    validation = train_lib.Validation(every=c.rise.boost_validate_every, score=_dev_accuracy(ctx),
                                      stop_at=c.rise.boost_stop_accuracy)
  t0 = time.perf_counter()
  # With a stop limit the trainer SIGKILLs this process right after step `limit`'s checkpoint commits.
  result = train_lib.train(train_config, records, out_dir, model=model, tokenizer=ctx.tokenizer,
                           validation=validation)
  seconds = time.perf_counter() - t0
  info = {"init": init or "base", "num_records": len(records), "train_seconds": seconds,
          "stopped_early_at": result.stopped_early_at}
  info.update(_train_result(result))
  return info


def _dev_accuracy(ctx: Context):
  """The boost's validation score: one first-turn sample per dev problem at the run's sampling settings (the
  m1@t1 of the dev split), from a fixed seed so a resumed run scores a checkpoint the same."""
  from rise_jax.rise.policies import Request
  c = ctx.config
  problems = ctx.task.load("dev")  # non-empty: validate() requires task.dev_size > 0 for boost validation
  requests = [Request(key=p.id, messages=tuple(ctx.prompts.initial_messages(p.question)), n=1, turn=1,
                      stream="boost_validation") for p in problems]
  holder: dict[str, Any] = {}

  def score(model) -> float:
    if "policy" not in holder:  # one sampler: later validations swap weights into the compiled programs
      holder["policy"] = ctx.learner(model, "boost@validation")
    else:
      holder["policy"].sampler.update_params(model)
    policy = holder["policy"]
    completions = policy.sample(requests, ctx.turn_sampling(), c.seed)
    policy.release([r.key for r in requests])
    return sum(ctx.task.grade(done.samples[0].text, p.reference, c.task.grader)
               for done, p in zip(completions, problems)) / len(problems)
  return score


def _train_config(config, *, boost: bool, limit: int | None):
  """The config the trainer sees: boost overrides applied, the stop hook turned into a step limit."""
  c = config_lib.to_dict(config)
  import ml_collections
  out = ml_collections.ConfigDict(c)
  if boost:
    if config.rise.boost_lr is not None:
      out.train.lr = config.rise.boost_lr
    if config.rise.boost_epochs is not None:
      out.train.epochs = config.rise.boost_epochs
  out.debug.stop_after = None if limit is None else f"train:{limit}"
  return out


def _train_result(result) -> dict[str, Any]:
  """The trainer's numbers for the DONE marker: steps, tokens of the whole run and of this call, the last logged
  loss."""
  history = result.metrics
  tokens = sum(int(m.get("tokens", 0)) for m in history)
  return {"steps": result.steps, "resumed_from": result.resumed_from, "tokens": result.total_tokens,
          "tokens_this_run": tokens,
          "final_loss": history[-1]["loss"] if history else None,
          "examples_kept": result.encode_report.kept, "examples_total": result.encode_report.total}


def evaluate(ctx: Context, stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Sequential (eval.turns, no oracle: p1@tk is read from the same log) and parallel (k first-turn samples)."""
  from rise_jax.rise import loop as loop_lib
  from rise_jax.rise import metrics as metrics_lib
  from rise_jax.rise.rollout import Protocol
  c, t = ctx.config, stage.iteration
  source = loop_lib.model_stage(c, t, stage.control)
  model = ctx.model(source)
  name = ("control" if stage.control else ("boost" if source else "base")) + f"@iter_{t}"
  if t > 0 and not stage.control:
    name = f"rise@iter_{t}"
  learner = ctx.learner(model, name)
  problems = ctx.task.load(c.eval.split)
  common = dict(sampling=ctx.turn_sampling(), grader=c.task.grader, prompt_set=c.task.prompt_set,
                max_resample_rounds=c.collect.max_resample_rounds)
  # Distinct seeds: with one seed the parallel run's first sample would replay the sequential run's first turn
  # (random streams are named by seed, problem and turn), and "a fresh sample" would not be fresh.
  seq = Protocol.sequential(c.eval.turns, select="first", oracle=c.eval.oracle, window=c.eval.window,
                            seed=c.seed + 1, **common)
  par = Protocol.parallel(c.eval.parallel_k, seed=c.seed + 2, **common)
  t0 = time.perf_counter()
  runs = []
  for protocol, file, desc in ((seq, "rollouts.jsonl", "sequential"), (par, "rollouts_parallel.jsonl", "parallel")):
    runs.append(_episodes(ctx, problems, learner, protocol, out_dir / file, ctx.header(name), limit, stage,
                          f"eval {stage.name} {desc}"))
  seconds = time.perf_counter() - t0
  metrics = metrics_lib.metrics_from_logs(out_dir / "rollouts.jsonl", out_dir / "rollouts_parallel.jsonl",
                                          task=ctx.task, tie_break=c.eval.tie_break, seed=c.seed)
  metrics["model"] = name
  _write_metrics(metrics, out_dir)
  decode = sum(r.decode_tokens for r in runs)
  logged = sum(c["decode_tokens"] for c in metrics.get("compute", {}).values())  # earlier invocations' too
  return {"model": name, "num_problems": metrics.get("num_problems"), "eval_seconds_this_run": seconds,
          "decode_tokens": logged, "decode_tokens_this_run": decode,
          "tokens_per_s": decode / seconds if seconds > 0 else 0.0,
          **{k: metrics.get(k) for k in ("m1@t1", f"m{c.eval.parallel_k}@t1", f"m1@t{c.eval.turns}",
                                          f"p1@t{c.eval.turns}", f"p{c.eval.parallel_k}@t1")}}


def _write_metrics(metrics: dict[str, Any], out_dir: pathlib.Path) -> None:
  """metrics.json, and report.md + plots through the metrics helper's report writer when it is available."""
  rundir.atomic_write_json(out_dir / "metrics.json", metrics)
  try:
    from rise_jax.rise import report
  except ImportError:
    return
  report.write_report(metrics, out_dir)
