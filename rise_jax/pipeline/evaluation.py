"""The one evaluation stage (Algorithm 2), for the RISE loop's `iter_T/eval` and for `rise_jax.evaluate` alike.

Runs every protocol of `rise.algorithm.evaluation_protocols` through the episode runner, each into its own log
(every log resumes: a rerun skips the problems already logged), then writes `metrics.json`, `report.md` and plots
(`rise_jax.rise.report`), the runner's speed (`throughput.json`) and a sampling section in the report:

  rollouts.jsonl (sequential, draw 0)  [rollouts_draw<d>.jsonl]  rollouts_parallel.jsonl  throughput.json
  metrics.json  report.md  *.png  [self_refine/{rollouts.jsonl, metrics.json, report.md, *.png}]
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any, Sequence

import jax

from rise_jax import config as config_lib
from rise_jax import files
from rise_jax.pipeline import rundir
from rise_jax.pipeline.resources import Resources
from rise_jax.rise import algorithm
from rise_jax.rise import metrics as metrics_lib
from rise_jax.rise import report as report_lib
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout import runner

log = logging.getLogger(__name__)

SEQUENTIAL_LOG = "rollouts.jsonl"
PARALLEL_LOG = "rollouts_parallel.jsonl"
SELF_REFINE_DIR = "self_refine"


@dataclasses.dataclass
class Evaluation:
  metrics: dict[str, Any]    # as written to metrics.json
  seconds: float             # this call's sampling time
  decode_tokens: int         # this call's decoded tokens (earlier invocations' are in metrics["compute"])


def log_path(out_dir: pathlib.Path, label: str) -> pathlib.Path:
  """Where the run `label` of `evaluation_protocols` logs its episodes."""
  if label == "parallel":
    return out_dir / PARALLEL_LOG
  if label == "self_refine":
    return out_dir / SELF_REFINE_DIR / SEQUENTIAL_LOG
  draw = 0 if label == "sequential" else int(label.removeprefix("sequential_draw"))
  return out_dir / (SEQUENTIAL_LOG if draw == 0 else f"rollouts_draw{draw}.jsonl")


def evaluate_config(cfg, *, out_dir=None, policy=None, problems: Sequence[Any] | None = None, model: Any = None,
                    progress: bool = True, on_open=None) -> dict[str, Any]:
  """`rise_jax.evaluate`: check the config and the output directory, then `evaluate` into it; returns the metrics.

  policy: the learner (default: `cfg.model` behind the engine, built by `Resources`); model: how the log header
  names it (default `cfg.model`'s description); problems: default the `eval.split` split.
  """
  num_devices = None
  if policy is None:  # the meshes must fit the devices the model will be loaded on
    num_devices = jax.device_count()
  config_lib.validate(cfg, num_devices=num_devices)
  config_lib.check_command(cfg, "evaluate")
  out = pathlib.Path(out_dir or cfg.output_dir)
  res = Resources(cfg, out)
  problems = list(res.eval_problems() if problems is None else problems)
  rundir.check_config(out, cfg)  # a changed config is refused before anything is written
  with files.RunLock(out):
    rundir.check_config(out, cfg)  # again, now that no other writer can be between the check and the write
    if on_open is not None:
      on_open(out)  # the command line's run.log starts here: the directory is this config's
    files.atomic_write_json(out / rundir.CONFIG_FILE, config_lib.to_dict(cfg))
    if policy is None:  # loaded on the sampling mesh: an evaluation never trains it
      policy = res.learner(res.model(None, mesh="sample"), "learner")
    return evaluate_policy(res, policy, out, problems, model=model or model_description(cfg),
                           progress=progress).metrics


def model_description(cfg) -> dict[str, Any]:
  m = cfg.model
  return {"source": m.source, "preset": m.preset if m.source == "preset" else None,
          "hf_path": m.hf_path, "dtype": m.dtype}


def evaluate_policy(resources: Resources, policy, out_dir: pathlib.Path, problems: Sequence[Any], *, model: Any,
                    name: str | None = None, limit: int | None = None, what: str = "evaluation",
                    progress: bool = True, stage=None) -> Evaluation:
  """Run Algorithm 2 with `policy` on `problems` into `out_dir`; the metrics are also written.

  model: how the log headers name the model; name: the metrics' and report's model name (Table 1 row), if any;
  limit: the `debug.stop_after` hook (stop after that many problems of the first protocol); stage: the RISE loop's
  stage, whose fields' hash the logs carry (None: the whole config's).
  """
  c = resources.config
  header = resources.header(model, stage)
  protocols = algorithm.evaluation_protocols(c)
  _check_capacity(resources, policy, problems, protocols, what)
  throughput: dict[str, dict[str, float]] = {}
  t0 = time.perf_counter()
  decode = 0
  for label, protocol in protocols.items():
    path = log_path(out_dir, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = resources.episodes(problems, policy, protocol, path, header, limit=limit, what=what,
                                 desc=f"{what} {label}", progress=progress)
    throughput[label] = _throughput(summary)
    decode += summary.decode_tokens
    log.info("%s: %d episodes (%d already logged) in %.1fs: %.3f problems/s, %.1f tokens/s", label,
             summary.episodes, summary.skipped, summary.seconds, summary.problems_per_s, summary.tokens_per_s)
  seconds = time.perf_counter() - t0
  files.atomic_write_json(out_dir / "throughput.json", throughput)

  sequential = [log_path(out_dir, algorithm.sequential_label(d)) for d in range(c.eval.draws)]
  metrics = _metrics(resources, sequential, out_dir / PARALLEL_LOG, name)
  metrics["throughput"] = throughput
  _write(metrics, out_dir, throughput)
  if c.eval.self_refine:
    refine = _metrics(resources, [log_path(out_dir, "self_refine")], None, None)
    _write(refine, out_dir / SELF_REFINE_DIR, {}, title="Self-Refine prompting baseline")
  return Evaluation(metrics=metrics, seconds=seconds, decode_tokens=decode)


def _check_capacity(resources: Resources, policy, problems: Sequence[Any], protocols, what: str) -> None:
  """Every protocol's longest conversation against the policy's capacity, before any episode runs."""
  c = resources.config
  capacity = getattr(policy, "capacity", None)  # scripted and HTTP policies hold no cache
  fix = (f"raise sampling.max_cache_length ({c.sampling.max_cache_length}; the model's positions cap it too), "
         "lower sampling.max_new_tokens or eval.turns, set eval.window, or set sampling.on_overflow='report'")
  for label, protocol in protocols.items():
    runner.check_capacity(problems, protocol, resources.prompts_for(protocol), resources.tokenizer, capacity,
                          what=f"{what} ({label}, config field sampling.max_cache_length)", fix=fix)


def _metrics(resources, sequential: list[pathlib.Path], parallel: pathlib.Path | None, name: str | None):
  c = resources.config
  metrics = metrics_lib.metrics_from_logs(sequential, parallel, task=resources.task, tie_break=c.eval.tie_break,
                                          seed=c.seed)
  if name is not None:
    metrics["model"] = name
  metrics["sampling"] = {"sequential": sampling_stats(sequential)}
  if parallel is not None:
    metrics["sampling"]["parallel"] = sampling_stats([parallel])
  return metrics


def _write(metrics: dict[str, Any], out_dir: pathlib.Path, throughput: dict[str, dict[str, float]],
           title: str | None = None) -> None:
  report_lib.write_report(metrics, out_dir, **({"title": title} if title else {}))
  _append_sampling_section(out_dir / "report.md", metrics["sampling"], throughput)


def sampling_stats(paths: Sequence[pathlib.Path]) -> dict[str, int]:
  """Counts over every logged candidate: finish reasons, degenerate resamples, degenerate samples kept."""

  stats = {"candidates": 0, "stop": 0, "length": 0, "cache_full": 0, "resamples": 0, "flagged_degenerate": 0}
  for path in paths:
    _, records, _ = rollout_log.read_rollouts(path, validate=False)
    for record in records:
      for turn in record["turns"]:
        for c in turn["candidates"]:
          stats["candidates"] += 1
          stats[c["finish_reason"]] += 1
          stats["resamples"] += c["resamples"]
          stats["flagged_degenerate"] += bool(c.get("flagged_degenerate"))
  return stats


def _append_sampling_section(report: pathlib.Path, sampling: dict[str, dict[str, int]],
                             throughput: dict[str, dict[str, float]]):
  """Add the runner's numbers (finish reasons, degenerate resampling, speed of this process) to report.md."""
  lines = ["", "## Sampling", "",
           "| protocol | candidates | stop | length | cache_full | degenerate resamples | degenerate kept (flagged) |",
           "|---|---|---|---|---|---|---|"]
  for name, st in sampling.items():
    lines.append(f"| {name} | {st['candidates']} | {st['stop']} | {st['length']} | {st['cache_full']} | "
                 f"{st['resamples']} | {st['flagged_degenerate']} |")
  if throughput:
    lines += ["", "Speed of the process that finished the run (episodes it ran itself; compilation included):", "",
              "| run | episodes | already logged | seconds | problems/s | decode tokens/s |",
              "|---|---|---|---|---|---|"]
    for name, t in throughput.items():
      lines.append(f"| {name} | {t['episodes']} | {t['skipped']} | {t['seconds']:.1f} | {t['problems_per_s']:.3f} | "
                   f"{t['tokens_per_s']:.1f} |")
  files.atomic_write_text(report, report.read_text() + "\n".join(lines) + "\n")


def _throughput(summary) -> dict[str, float]:
  return {"episodes": summary.episodes, "skipped": summary.skipped, "seconds": round(summary.seconds, 3),
          "problems_per_s": round(summary.problems_per_s, 4), "decode_tokens": summary.decode_tokens,
          "prefill_tokens": summary.prefill_tokens, "tokens_per_s": round(summary.tokens_per_s, 2),
          "resamples": summary.resamples, "degenerate_kept": summary.degenerate_kept}
