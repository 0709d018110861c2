"""`python -m rise_jax.evaluate --config=configs/eval_toy.py`: RISE's evaluation (Algorithm 2) of one model.

Runs, through the one episode runner (`rise_jax.rise.rollout`):
- the sequential protocol: `eval.turns` turns, one sample each, the failure feedback after every turn (no oracle
  unless `eval.oracle`), the history window `eval.window`; `m1@t1`, `m1@tk` and `p1@tk` are all read from this log
  (before the first correct turn the feedback is the same with or without an oracle). With `eval.draws > 1` it runs
  that many independent draws (seeds `seed + d`), for `m1@t1` as a mean over draws;
- the parallel protocol: `eval.parallel_k` first-turn samples per problem (`mk@t1`, `pk@t1`);
- optionally (`eval.self_refine`) the Self-Refine prompting baseline: the sequential protocol with the
  `self_refine` prompt set.
Then writes `metrics.json`, `report.md` and plots with `rise_jax.rise.report`. Every log resumes: rerunning the
same command after a crash skips the problems already logged.

Output directory (`output_dir`):
  config.json  rollouts.jsonl (sequential)  [rollouts_draw<d>.jsonl]  rollouts_parallel.jsonl  throughput.json
  metrics.json  report.md  *.png  [self_refine/{rollouts.jsonl, metrics.json, report.md, *.png}]  run.log (the full log)
(`rollouts.jsonl` and `rollouts_parallel.jsonl` are the names the RISE loop uses in `iter_<T>/eval/`.)
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from typing import Any, Sequence

from rise_jax import config as config_lib
from rise_jax import rundir
from rise_jax.rise.policies import Policy, TurnSampling
from rise_jax.rise.rollout import Protocol, RunSummary, run_episodes

log = logging.getLogger(__name__)

SELF_REFINE_PROMPT_SET = "self_refine"
PARALLEL_LOG = "rollouts_parallel.jsonl"


def sequential_log_name(draw: int) -> str:
  return "rollouts.jsonl" if draw == 0 else f"rollouts_draw{draw}.jsonl"


def turn_sampling(cfg) -> TurnSampling:
  s = cfg.sampling
  return TurnSampling(temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k),
                      max_new_tokens=int(s.max_new_tokens))


def sequential_protocol(cfg, *, draw: int = 0, prompt_set: str | None = None) -> Protocol:
  e = cfg.eval
  return Protocol.sequential(e.turns, samples=1, select="first", oracle=bool(e.oracle), window=e.window,
                             sampling=turn_sampling(cfg), grader=cfg.task.grader,
                             prompt_set=prompt_set or cfg.task.prompt_set, seed=cfg.seed + draw,
                             max_resample_rounds=cfg.collect.max_resample_rounds)


def parallel_protocol(cfg) -> Protocol:
  return Protocol.parallel(cfg.eval.parallel_k, sampling=turn_sampling(cfg), grader=cfg.task.grader,
                           prompt_set=cfg.task.prompt_set, seed=cfg.seed,
                           max_resample_rounds=cfg.collect.max_resample_rounds)


def tokenizer_path(cfg, out_dir: pathlib.Path) -> str:
  """`tokenizer.path`, else the HF checkpoint's directory, else (toy task) the toy tokenizer built in out_dir."""
  if cfg.tokenizer.path is not None:
    return cfg.tokenizer.path
  if cfg.model.source == "hf":
    return cfg.model.hf_path
  if cfg.task.name == "toy":
    from rise_jax.rise.tasks import build_toy_tokenizer
    return build_toy_tokenizer(out_dir / "tokenizer")
  raise ValueError("config field tokenizer.path: required for a preset model on a non-toy task")


def load_learner(cfg, out_dir: pathlib.Path, *, name: str = "learner") -> Policy:
  """The model of `cfg.model` behind a sampler, as a runner policy."""
  from rise_jax import chat, models, sharding
  from rise_jax.rise.policies import sampler_policy

  tokenizer = chat.load_tokenizer(tokenizer_path(cfg, out_dir), chat_template=cfg.tokenizer.chat_template)
  mesh = sharding.make_mesh(tuple(cfg.mesh.sample))
  model = models.load_model(cfg.model, mesh=mesh, on_indivisible=cfg.mesh.on_indivisible, seed=cfg.seed)
  chat.check_vocab(tokenizer, model.config)
  return sampler_policy(cfg, model, tokenizer, mesh, name=name)


def model_description(cfg) -> dict[str, Any]:
  m = cfg.model
  return {"source": m.source, "preset": m.preset if m.source == "preset" else None,
          "hf_path": m.hf_path, "dtype": m.dtype}


def evaluate(cfg, *, out_dir=None, policy: Policy | None = None, problems: Sequence[Any] | None = None,
             model: Any = None, progress: bool = True, on_open=None) -> dict[str, Any]:
  """Run every protocol of `cfg.eval`, write logs, metrics and report under `out_dir`; return the metrics.

  policy: the learner (default: `cfg.model` behind a sampler); model: how the log header names it (default
  `cfg.model`'s description). problems: default the task's `eval.split` split ("test", capped by
  `task.test_size`, or "dev" for tuning).
  """
  from rise_jax.rise.tasks import task_from_config

  num_devices = None
  if policy is None:  # the meshes must fit the devices the model will be loaded on
    import jax
    num_devices = jax.device_count()
  config_lib.validate(cfg, num_devices=num_devices)
  out = pathlib.Path(out_dir or cfg.output_dir)
  task = task_from_config(cfg.task)
  problems = list(task.load(cfg.eval.split) if problems is None else problems)
  if not problems:
    field = "task.test_source" if cfg.eval.split == "test" else "task.dev_size"
    raise ValueError(f"config field {field}: the task's {cfg.eval.split} split has no problems to evaluate")
  rundir.check_config(out, cfg)  # a changed config is refused before anything is written
  with rundir.RunLock(out):
    rundir.check_config(out, cfg)  # again, now that no other writer can be between the check and the write
    if on_open is not None:
      on_open(out)  # the command line's run.log starts here: the directory is this config's
    rundir.atomic_write_json(out / rundir.CONFIG_FILE, config_lib.to_dict(cfg))
    if policy is None:
      policy = load_learner(cfg, out)
    return _evaluate(cfg, out, task, problems, policy, model or model_description(cfg), progress)


def _evaluate(cfg, out: pathlib.Path, task, problems: Sequence[Any], policy: Policy, model: Any,
              progress: bool) -> dict[str, Any]:
  """The protocols, logs, metrics and reports of `evaluate`, in a directory it has locked."""
  from rise_jax.rise import get_prompt_set
  from rise_jax.rise import metrics as metrics_lib
  from rise_jax.rise import report as report_lib

  header = {"config_hash": config_lib.config_hash(cfg), "model": model}
  batch = cfg.sampling.batch_size
  throughput: dict[str, dict[str, float]] = {}

  def run(protocol: Protocol, prompts_name: str, path: pathlib.Path, label: str) -> RunSummary:
    summary = run_episodes(problems, policy, protocol, path, task=task, prompts=get_prompt_set(prompts_name),
                           header=header, batch_size=batch, progress=progress, desc=label)
    throughput[label] = _throughput(summary)
    log.info("%s: %d episodes (%d already logged) in %.1fs: %.3f problems/s, %.1f tokens/s", label,
             summary.episodes, summary.skipped, summary.seconds, summary.problems_per_s, summary.tokens_per_s)
    return summary

  sequential_paths = []
  for d in range(cfg.eval.draws):
    path = out / sequential_log_name(d)
    run(sequential_protocol(cfg, draw=d), cfg.task.prompt_set, path, "sequential" if d == 0 else f"sequential_draw{d}")
    sequential_paths.append(path)
  run(parallel_protocol(cfg), cfg.task.prompt_set, out / PARALLEL_LOG, "parallel")
  if cfg.eval.self_refine:
    refine_dir = out / "self_refine"
    refine_dir.mkdir(exist_ok=True)
    run(sequential_protocol(cfg, prompt_set=SELF_REFINE_PROMPT_SET), SELF_REFINE_PROMPT_SET,
        refine_dir / sequential_log_name(0), "self_refine")
  rundir.atomic_write_json(out / "throughput.json", throughput)

  metrics = metrics_lib.metrics_from_logs(sequential_paths, out / PARALLEL_LOG, task, None, cfg.eval.tie_break,
                                          seed=cfg.seed)
  metrics["throughput"] = throughput
  metrics["sampling"] = {"sequential": sampling_stats(sequential_paths),
                         "parallel": sampling_stats([out / PARALLEL_LOG])}
  report_lib.write_report(metrics, out)
  _append_sampling_section(out / "report.md", metrics["sampling"], throughput)
  if cfg.eval.self_refine:
    refine_log = out / "self_refine" / sequential_log_name(0)
    refine = metrics_lib.metrics_from_logs([refine_log], None, task, None, cfg.eval.tie_break, seed=cfg.seed)
    refine["sampling"] = {"sequential": sampling_stats([refine_log])}
    report_lib.write_report(refine, out / "self_refine", title="Self-Refine prompting baseline")
    _append_sampling_section(out / "self_refine" / "report.md", refine["sampling"], {})
  return metrics


def sampling_stats(paths: Sequence[pathlib.Path]) -> dict[str, int]:
  """Counts over every logged candidate: finish reasons, degenerate resamples, degenerate samples kept."""
  from rise_jax.rise import rollout_log

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
  rundir.atomic_write_text(report, report.read_text() + "\n".join(lines) + "\n")


def _throughput(summary: RunSummary) -> dict[str, float]:
  return {"episodes": summary.episodes, "skipped": summary.skipped, "seconds": round(summary.seconds, 3),
          "problems_per_s": round(summary.problems_per_s, 4), "decode_tokens": summary.decode_tokens,
          "prefill_tokens": summary.prefill_tokens, "tokens_per_s": round(summary.tokens_per_s, 2),
          "resamples": summary.resamples, "degenerate_kept": summary.degenerate_kept}


def main(cfg, on_open=None) -> dict[str, Any]:
  metrics = evaluate(cfg, on_open=on_open)
  print(json.dumps({k: v for k, v in metrics.items() if "@" in k and isinstance(v, float)}, indent=2))
  return metrics


_HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")


def cli(argv: Sequence[str] | None = None):
  """`python -m rise_jax.evaluate --config=configs/<name>.py [--config.<field>=<value> ...]`."""
  from absl import app, flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file; override fields "
                                           "with --config.<section>.<field>=<value>.", lock_config=True)
  if any(a in _HELP_FLAGS for a in argv[1:]):
    # absl exits 1 after --help; a help request is a success.
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  flags.mark_flag_as_required("config")

  def run(_):
    from rise_jax import logs
    logs.setup()  # the terminal: progress, warnings, errors (--verbosity for more); the full log in output_dir
    with rundir.cli_errors("rise_jax.evaluate", config.value.output_dir):
      main(config.value, on_open=logs.to_file)

  app.run(run, argv=argv)


if __name__ == "__main__":
  cli()
