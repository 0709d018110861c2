"""The body of each stage of a RISE run (`pipeline.loop` decides which stage runs when and marks it done).

Every stage reads its inputs from earlier stages' directories and writes only into its own, so a stage can be
re-run from scratch or resumed: collection and evaluation resume from their rollout logs (the runner skips
finished problems), training from its last checkpoint. A model passes between stages as the HF export of the
train stage that made it (`<stage>/hf`); the base model is the config's `model` section.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

from rise_jax import config as config_lib
from rise_jax import train as train_lib
from rise_jax.pipeline import evaluation
from rise_jax.pipeline import plan as plan_lib
from rise_jax.pipeline.plan import Stage
from rise_jax.pipeline.resources import HF_DIGESTS, Resources, hf_digests
from rise_jax.rise import algorithm
from rise_jax.rise import conversion as conversion_lib
from rise_jax.rise import dataset as dataset_lib
from rise_jax.rise import metrics
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.policies import RepairPolicy
from rise_jax.rollout.policies import RepairPromptPolicy
from rise_jax.rollout.policies import TurnRequest
from rise_jax.train import data as train_data

log = logging.getLogger(__name__)


def run_stage(res: Resources, stage: Stage, run_dir, *, limit: int | None) -> dict[str, Any]:
  """Run one stage; returns what its DONE marker records. `limit`: stop after that many units."""
  body = {"boost_data": boost_data, "collect": collect, "train": train, "eval": evaluate_stage}[stage.kind]
  out_dir = run_dir.stage_dir(stage.name)
  out_dir.mkdir(parents=True, exist_ok=True)
  return body(res, stage, out_dir, limit=limit)


def missing_output(root: pathlib.Path, stage: Stage, config) -> pathlib.Path | None:
  """The first file a later stage or the summary reads from a finished stage that is not there (None: all are)."""
  out = root / stage.name
  if stage.kind == "eval":
    wanted = [out / "metrics.json"]
  elif stage.kind == "train":
    if not list((out / "hf").glob("*.safetensors")):
      return out / "hf" / "model.safetensors"
    wanted = [out / "hf" / "config.json"]
  else:  # collect / boost_data: the dataset directories the trainer reads
    subs = ["data"] + (["control/data"] if stage.kind == "collect" and config.rise.single_turn_control else [])
    wanted = [out / sub / name for sub in subs for name in (dataset_lib.DATA_FILE, "manifest.json")]
  return next((p for p in wanted if not p.is_file()), None)


def _log_accounting(log_path: pathlib.Path, problems) -> dict[str, Any]:
  """The log's records in problem order, whatever order episodes finished in (a resumed run's chunks differ
  from an uninterrupted run's, its dataset must not), and the log's token accounting."""
  _, records, torn = rollout_log.read_rollouts(log_path)
  order = {p.id: i for i, p in enumerate(problems)}
  missing = [r["problem_id"] for r in records if r["problem_id"] not in order]
  if missing or len(records) != len(order):
    raise ValueError(f"{log_path}: holds {len(records)} episodes for {len(order)} problems "
                     f"(e.g. unexpected {missing[:3]}); was the log written by another config?")
  records.sort(key=lambda r: order[r["problem_id"]])
  return {"records": records, "torn": torn, "accounting": metrics.compute_accounting(records)}


def collect(res: Resources, stage: Stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Iteration T's Algorithm 1 rollouts with the newest model, then D_T (and its history-stripped twin)."""
  t = stage.iteration
  c = config_lib.for_iteration(res.config, t)
  source = plan_lib.model_stage(c, t - 1)
  model = res.model(source)
  name = f"learner@iter_{t - 1}"
  learner = res.learner(model, name)
  problems = res.train_problems(t)
  improver = res.teacher(c, problems) if c.collect.improvement == "teacher" else learner
  policies = [learner] * (c.collect.turns - 1) + [improver]
  t0 = time.perf_counter()
  run = res.episodes(problems, policies, algorithm.collection_protocol(c), out_dir / "rollouts.jsonl",
                     res.header(name, stage), limit=limit, what=stage.name, desc=f"collect iter {t}")
  seconds = time.perf_counter() - t0
  info = _repair_counts(improver, stage.name)
  rollouts = _log_accounting(out_dir / "rollouts.jsonl", problems)
  info.update(_build(res, c, rollouts["records"], out_dir, t))
  return {"episodes": len(rollouts["records"]), "torn_lines": rollouts["torn"], "tokens": rollouts["accounting"],
          "decode_tokens": rollouts["accounting"]["decode_tokens"], "decode_tokens_this_run": run.decode_tokens,
          "sampling_seconds_this_run": seconds, "tokens_per_s": run.tokens_per_s, **info}


def _repair_counts(improver, stage_name: str) -> dict[str, int]:
  """The collect DONE's count of a repairing teacher's requests and of those it answered without a repair."""
  if isinstance(improver, RepairPolicy):
    fallback = "gave the reference solution (no repairable attempt)"
  elif isinstance(improver, RepairPromptPolicy):
    fallback = "was shown the conversation (no attempt to repair)"
  else:
    return {}
  log.info("%s: the repair teacher %s for %d of %d requests", stage_name, fallback, improver.fallbacks,
           improver.requests)
  return {"repair_requests_this_run": improver.requests, "repair_fallbacks_this_run": improver.fallbacks}


def _build(res: Resources, c, records, out_dir: pathlib.Path, iteration: int) -> dict[str, Any]:
  """Write D_T under out_dir/ (with rise.mix_single_turn, followed by the control's records) and, for the
  single-turn control, its history-stripped twin under control/ (c: the iteration's config)."""
  questions = {r["problem_id"]: r["question"] for r in records}
  initial = lambda pid: res.prompts.initial_messages(questions[pid])  # noqa: E731
  convert = lambda options: conversion_lib.convert_rollouts(  # noqa: E731
      records, initial, options, source=str(out_dir / "rollouts.jsonl"))
  reward_values = algorithm.reward_range(c.task.name, c.task.grader)
  out = {}
  variants = [("", False)] + ([("control", True)] if c.rise.single_turn_control else [])
  for sub, single in variants:
    options = conversion_lib.ConversionOptions.from_config(c, iteration=iteration, single_turn=single or None)
    conversion = convert(options)
    if not sub and c.rise.mix_single_turn:
      stripped = conversion_lib.ConversionOptions.from_config(c, iteration=iteration, single_turn=True)
      conversion = conversion_lib.concatenate(conversion, convert(stripped))
    summary = dataset_lib.write_dataset(conversion, out_dir / sub if sub else out_dir, options=options,
                                        reward_values=reward_values, tokenizer=res.tokenizer,
                                        extra={"mix_single_turn": bool(not sub and c.rise.mix_single_turn)})
    out[f"{sub or 'rise'}_records"] = summary["num_records"]
    out[f"{sub or 'rise'}_token_drift"] = (summary["token_drift"] or {}).get("fraction")
  return out


def boost_data(res: Resources, stage: Stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """The boost stage's SFT data: given records, the task's reference solutions, or correct samples."""
  c = res.config
  source = c.rise.boost_data
  options = conversion_lib.ConversionOptions(criteria="success", weighting="uniform", dedupe=True, iteration=0)
  reward_values = algorithm.reward_range(c.task.name, c.task.grader)
  if source is None:  # correct samples of the improvement policy, first turn only
    teacher = c.collect.improvement == "teacher"
    problems = res.boost_problems()
    policy = res.teacher(c, problems) if teacher else res.learner(res.model(None), "learner@base")
    res.episodes(problems, policy, algorithm.boost_protocol(c, teacher), out_dir / "rollouts.jsonl",
                 res.header(policy.name, stage), limit=limit, what=stage.name, desc="boost samples")
    records = _log_accounting(out_dir / "rollouts.jsonl", problems)["records"]
    questions = {r["problem_id"]: r["question"] for r in records}
    conversion = conversion_lib.convert_rollouts(records, lambda pid: res.prompts.initial_messages(questions[pid]),
                                                 options, source=str(out_dir / "rollouts.jsonl"))
  elif source == "reference":  # the task's worked answers in the prompts' format (the toy task's scratchpads)
    conversion = conversion_lib.Conversion(records=[], sampled_ids=[], stats=conversion_lib.ConversionStats())
    for p in res.boost_problems():
      conversion.records.append({
          "id": f"{p.id}#boost", "weight": 1.0,
          "messages": res.prompts.initial_messages(p.question) + [
              {"role": "assistant", "content": res.task.solution(p), "train": True}],
          "meta": {"problem_id": p.id, "iteration": 0, "turn": 1, "position": 1, "reward": 1.0,
                   "source": "reference", "criteria": "success", "grader": c.task.grader, "single_turn": True}})
      conversion.sampled_ids.append(None)
    conversion.stats.episodes = conversion.stats.examples = len(conversion.records)
  else:  # a file or directory of rise_jax.sft/1 records
    records = [{"id": r.id, "weight": r.weight, "messages": [dict(m) for m in r.messages], "meta": {"reward": 1.0}}
               for r in train_data.read_records(source)]
    conversion = conversion_lib.Conversion(records=records, sampled_ids=[None] * len(records),
                                           stats=conversion_lib.ConversionStats(examples=len(records)))
  summary = dataset_lib.write_dataset(conversion, out_dir, options=options, reward_values=reward_values,
                                      extra={"boost_source": source or "correct_samples"})
  return {"records": summary["num_records"], "source": source or "correct_samples"}


def train(res: Resources, stage: Stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Train the stage's initial model on its data; the trainer resumes from out_dir/ckpt and exports out_dir/hf."""
  c, t = res.config, stage.iteration
  init = plan_lib.init_stage(c, t, stage.control)
  sub = "control/data" if stage.control else "data"
  records = []  # validated by the trainer's own sft/1 reader
  for collect_stage in plan_lib.data_stages(c, t):
    data_dir = res.root / collect_stage / sub
    dataset_lib.verify_dataset(data_dir, f"restore it, or delete {res.root / collect_stage}/DONE to rebuild it")
    records += train_data.read_records(data_dir / dataset_lib.DATA_FILE)
  model = res.load_model(init)  # train() leaves it untouched and returns the trained model
  res.forget_model()
  train_config = config_lib.for_iteration(c, t)  # the boost's (t = 0) with its rise.boost_lr / boost_epochs
  validation = None
  if t == 0 and c.rise.boost_validate_every is not None:
    validation = train_lib.Validation(every=c.rise.boost_validate_every, score=_dev_accuracy(res),
                                      stop_at=c.rise.boost_stop_accuracy)
  t0 = time.perf_counter()
  # With a stop limit the trainer SIGKILLs this process right after step `limit`'s checkpoint commits.
  result = train_lib.train(train_config, records, out_dir, model=model, tokenizer=res.tokenizer,
                           validation=validation, stop_after_step=limit)
  seconds = time.perf_counter() - t0
  info = {"init": init or "base", "num_records": len(records), "train_seconds": seconds,
          "stopped_early_at": result.stopped_early_at, HF_DIGESTS: hf_digests(out_dir / "hf")}
  info.update(_train_result(result))
  return info


def _dev_accuracy(res: Resources):
  """The boost's validation score: one first-turn sample per dev problem at the run's sampling settings (the
  m1@t1 of the dev split), from a fixed seed so a resumed run scores a checkpoint the same."""
  c = res.config
  problems = res.task.load("dev")  # non-empty: validate() requires task.dev_size > 0 for boost validation
  requests = [TurnRequest(key=p.id, messages=tuple(res.prompts.initial_messages(p.question)), n=1, turn=1,
                          stream="boost_validation") for p in problems]
  holder: dict[str, Any] = {}

  def score(model) -> float:
    if "policy" in holder:
      holder["policy"].update_params(model)  # one generator: later validations reuse its compiled programs
    else:
      holder["policy"] = res.learner(model, "boost@validation")
    policy = holder["policy"]
    completions = policy.sample(requests, algorithm.turn_sampling(c), c.seed)
    policy.release([r.key for r in requests])
    return sum(res.task.grade(done.samples[0].text, p.reference, c.task.grader)
               for done, p in zip(completions, problems)) / len(problems)
  return score


def _train_result(result) -> dict[str, Any]:
  """The trainer's numbers for the DONE marker: steps, tokens of the whole run and of this call, the last logged
  loss."""
  history = result.metrics
  tokens = sum(int(m.get("tokens", 0)) for m in history)
  return {"steps": result.steps, "resumed_from": result.resumed_from, "tokens": result.total_tokens,
          "tokens_this_run": tokens,
          "final_loss": history[-1]["loss"] if history else None,
          "examples_kept": result.encode_report.kept, "examples_total": result.encode_report.total}


def evaluate_stage(res: Resources, stage: Stage, out_dir: pathlib.Path, *, limit: int | None) -> dict[str, Any]:
  """Algorithm 2 on the stage's model, through the one evaluation stage `rise_jax.evaluate` runs too."""
  c, t = res.config, stage.iteration
  source = plan_lib.model_stage(c, t, stage.control)
  name = ("control" if stage.control else ("boost" if source else "base")) + f"@iter_{t}"
  if t > 0 and not stage.control:
    name = f"rise@iter_{t}"
  learner = res.learner(res.model(source), name)
  run = evaluation.evaluate_policy(res, learner, out_dir, res.eval_problems(), model=name, name=name, limit=limit,
                                   what=stage.name, stage=stage)
  metrics = run.metrics
  logged = sum(c["decode_tokens"] for c in metrics.get("compute", {}).values())  # earlier invocations' too
  return {"model": name, "num_problems": metrics.get("num_problems"), "eval_seconds_this_run": run.seconds,
          "decode_tokens": logged, "decode_tokens_this_run": run.decode_tokens,
          "tokens_per_s": run.decode_tokens / run.seconds if run.seconds > 0 else 0.0,
          **{k: metrics.get(k) for k in ("m1@t1", f"m{c.eval.parallel_k}@t1", f"m1@t{c.eval.turns}",
                                          f"p1@t{c.eval.turns}", f"p{c.eval.parallel_k}@t1")}}
