"""Run a toy experiment (default: the embedded one, configs/toy.py) over several seeds and write its results table.

    python experiments/toy_seeds.py                      # seeds 0 1 2 -> runs/toy_seed<S>/, table into docs/toy.md
    python experiments/toy_seeds.py --seeds 0 --no-docs  # one seed, table printed only
    python experiments/toy_seeds.py --config configs/toy_two_products.py:mix --seeds 0 1 2 3 4 --final-only
                                       # -> runs/toy_two_products_mix_seed<S>/, its own table in docs/toy.md

Each seed is one `python -m rise_jax.run` (so a seed that was interrupted resumes). The run evaluates the boost and
the last iteration (`rise.evaluate="final"`, inside the time budget); this script then evaluates the intermediate
iterations and controls through the run's own eval stage. Then, per seed, the boosted model is evaluated once more sequentially with all history dropped (every turn sees only the opening messages):
such a run is parallel sampling in disguise and must reproduce the parallel numbers (the sanity check). The
table reports mean +- sd over seeds of m1@t1, m5@t1, m1@t5, p1@t5, p5@t1, the conditional accuracies and SCoRe's
turn-1 -> turn-2 metrics (no oracle), the uniform guesser's chance p1@t5, and the sanity check; then per-seed paired
differences (RISE - control, RISE - boost, m1@t5 - m5@t1 within RISE) with their mean and a 95% t-interval over
seeds (Student's t, n - 1 degrees of freedom); within each RISE iteration also the retry against a fresh sample after a
wrong first turn, and RISE's m1@t5 against its control's m5@t1 (which is the better use of 5 samples).
`--final-only` skips the intermediate evaluations (the last iteration and the boost are evaluated by the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/toy.py"
MODELS = [("iter_0/eval", "boost"),
          ("iter_1/eval", "RISE iteration 1 (distillation: reference solutions)"),
          ("iter_1/control/eval", "single-turn control 1"),
          ("iter_2/eval", "RISE iteration 2 (self-distillation, best-of-4, no oracle)"),
          ("iter_2/control/eval", "single-turn control 2"),
          ("iter_3/eval", "RISE iteration 3 (self-distillation, best-of-4, no oracle)"),
          ("iter_3/control/eval", "single-turn control 3")]
METRICS = ["m1@t1", "m5@t1", "m1@t5", "p1@t5", "p5@t1"]
# SCoRe's metrics of turn pair 1 -> 2 (metrics.json "score", no oracle), by key and column name.
SCORE = {"acc_t1": "acc t1", "acc_t2": "acc t2", "delta_t1_t2": "Δ(t1, t2)", "delta_i_to_c": "Δi→c(t1, t2)",
         "delta_c_to_i": "Δc→i(t1, t2)"}
SCORE_DIFFERENCES = ["acc_t2", "delta_t1_t2", "delta_i_to_c", "delta_c_to_i"]  # acc_t1 is m1@t1, in METRICS
# Within RISE T: the retry after a wrong turn 1 against a fresh first-turn sample on the same problems; and, paired
# with its control, RISE's five sequential turns against the control's five parallel samples.
RETRY = "t2 right given t1 wrong − fresh sample"
FIVE_SAMPLES = "m1@t5 (RISE) − m5@t1 (control)"


def run_name(config: str) -> str:
  """The runs' name: the config file's stem, with its variant (`configs/toy_two_products.py:mix` ->
  toy_two_products_mix); the seeds run in <out>/<name>_seed<S>."""
  path, _, variant = config.partition(":")
  return pathlib.Path(path).stem + (f"_{variant}" if variant else "")


def markers(config: str) -> tuple[str, str]:
  """The docs/toy.md markers around a config's table (the default experiment's are the plain ones)."""
  tag = "toy_seeds" if config == DEFAULT_CONFIG else f"toy_seeds:{run_name(config)}"
  return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def run_seed(seed: int, out: pathlib.Path, extra: list[str], config: str = DEFAULT_CONFIG) -> float:
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "rise_jax.run", f"--config={config}", f"--config.seed={seed}",
         f"--config.output_dir={out}", *extra]
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  return time.perf_counter() - start


class _DropHistory:
  """A policy wrapper that shows the inner policy only the opening messages (instruction, example, problem)."""

  def __init__(self, inner):
    self.inner, self.name = inner, inner.name + "+no_history"

  def sample(self, requests, sampling, seed):
    return self.inner.sample([dataclasses.replace(r, messages=tuple(r.messages[:3])) for r in requests], sampling,
                             seed)

  def release(self, keys):
    self.inner.release(keys)

  def open_stream(self, seed):
    return _DropHistoryStream(self.inner.open_stream(seed))


class _DropHistoryStream:
  """The inner policy's stream, submitted the opening messages only (the runner drives every policy by stream)."""

  def __init__(self, inner):
    self.inner = inner

  def submit(self, request, sampling, tag):
    self.inner.submit(dataclasses.replace(request, messages=tuple(request.messages[:3])), sampling, tag)

  def step(self):
    return self.inner.step()

  @property
  def busy(self):
    return self.inner.busy


def _resources(run_dir: pathlib.Path):
  """The run's config (from its config.json) and the pipeline's resources over its directory."""
  import ml_collections

  from rise_jax.pipeline.resources import Resources
  config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
  config.mesh.train, config.mesh.sample = tuple(config.mesh.train), tuple(config.mesh.sample)
  return config, Resources(config, run_dir)


def intermediate_evals(run_dir: pathlib.Path) -> None:
  """Evaluate the models a `rise.evaluate="final"` run left unevaluated, through the run's own eval stage (same
  seeds, same directories as `rise.evaluate="all"` would use), after the timed run."""
  from rise_jax.pipeline import plan, stages
  config, res = _resources(run_dir)
  for t in range(1, config.rise.iterations + 1):
    for control in (False, True) if config.rise.single_turn_control else (False,):
      stage = plan.Stage(f"iter_{t}/control/eval" if control else f"iter_{t}/eval", "eval", t, control=control)
      out = run_dir / stage.name
      if (out / "metrics.json").exists():
        continue
      print(f"[toy_seeds] {run_dir.name}: evaluating {stage.name} after the run", flush=True)
      out.mkdir(parents=True, exist_ok=True)
      stages.evaluate_stage(res, stage, out, limit=None)


def history_dropped_eval(run_dir: pathlib.Path) -> dict:
  """Sequential evaluation of the boosted model with every turn's history dropped (metrics dict)."""
  out = run_dir / "iter_0" / "eval_no_history"
  if (out / "metrics.json").exists():
    return json.loads((out / "metrics.json").read_text())
  from rise_jax.pipeline import plan
  from rise_jax.rise import algorithm, metrics
  from rise_jax.rollout import runner
  from rise_jax.rollout.protocol import Protocol
  config, res = _resources(run_dir)
  model = res.model(plan.model_stage(config, 0))
  policy = _DropHistory(res.learner(model, "boost@iter_0"))
  protocol = Protocol.sequential(config.eval.turns, select="first", sampling=algorithm.turn_sampling(config),
                                 grader=config.task.grader, prompt_set=config.task.prompt_set,
                                 seed=config.seed + 3)
  out.mkdir(parents=True, exist_ok=True)
  runner.run_episodes(res.task.load("test"), policy, protocol, out / "rollouts.jsonl", task=res.task,
                      prompts=res.prompts, header=res.header(policy.name),
                      batch_size=config.sampling.batch_size, desc="eval boost, history dropped")
  m = metrics.metrics_from_logs(out / "rollouts.jsonl", None, task=res.task, seed=config.seed)
  (out / "metrics.json").write_text(json.dumps(m, indent=2, sort_keys=True))
  return m


def chance_row(run_dir: pathlib.Path) -> str:
  """The uniform guesser over the run's task's N answers (exact): 1/N per attempt; over 5 turns with an oracle
  and no repeated guess 5/N; 5 independent parallel guesses 1 - (1 - 1/N)^5."""
  import ml_collections

  from rise_jax.tasks import task_from_config
  config = json.loads((run_dir / "config.json").read_text())
  n = task_from_config(ml_collections.ConfigDict(config["task"])).answer_space_size()
  one, five, parallel = 1 / n, 5 / n, 1 - (1 - 1 / n) ** 5
  cells = [one, one, one, five, parallel, five - one, 0.0]
  return f"| uniform guesser over the {n} answers (exact) | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |"


def _stage_seconds(run_dir: pathlib.Path) -> float:
  return sum(json.loads(p.read_text()).get("seconds", 0.0) for p in run_dir.rglob("DONE"))


def _ms(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  mean = 100 * statistics.mean(values)
  sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.1f} ± {sd:.1f}"


def metric_value(m: dict, name: str) -> float | None:
  """A top-level metric, or a conditional or SCoRe metric of turn pair 1 -> 2; None where the metrics have none
  (an oracle log, or a metrics.json written before SCoRe's metrics were reported)."""
  if name not in SCORE:
    value = m.get(name)
    return value[0] if isinstance(value, list) else value
  score = m.get("score") or {}
  return score[name][0] if score.get("available") else None


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, list[float] | None]:
  """Mean and Student's t interval over seeds (n - 1 degrees of freedom; no interval from one seed)."""
  from scipy import stats  # local: only the aggregation needs it

  mean = statistics.mean(values)
  if len(values) < 2:
    return mean, None
  half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
  return mean, [mean - half, mean + half]


def paired_over_seeds(load: dict, seeds: list[int], stages: list[str]) -> list[dict]:
  """Per-seed paired differences and their mean with a 95% t-interval over seeds: for each RISE iteration T,
  RISE T - control T and RISE T - boost (the headline metrics and SCoRe's), and m1@t5 - m5@t1 within RISE T.
  load: (seed, stage) -> metrics dict; stages: the eval stages present for every seed."""
  def row(comparison, metric, per_seed):
    values = [v for v in per_seed.values() if v is not None]
    mean, ci = t_interval(values) if values else (None, None)
    return {"comparison": comparison, "metric": metric, "per_seed": per_seed, "mean": mean, "ci95": ci,
            "num_seeds": len(values)}

  def diff(a, b, seed, name_a, name_b):
    va, vb = metric_value(load[seed, a], name_a), metric_value(load[seed, b], name_b)
    return None if va is None or vb is None else va - vb

  rows = []
  for stage in stages:
    if stage == "iter_0/eval" or "/control/" in stage:
      continue
    t = stage.split("/")[0].removeprefix("iter_")
    others = [(stage.replace("/eval", "/control/eval"), f"RISE {t} − control {t}"),
              ("iter_0/eval", f"RISE {t} − boost")]
    for other, label in others:
      if other in stages:
        rows += [row(label, name, {s: diff(stage, other, s, name, name) for s in seeds})
                 for name in METRICS + SCORE_DIFFERENCES]
    rows.append(row(f"RISE {t}", "m1@t5 − m5@t1", {s: diff(stage, stage, s, "m1@t5", "m5@t1") for s in seeds}))
    rows.append(row(f"RISE {t}", RETRY, {s: diff(stage, stage, s, "acc_given_wrong", "fresh_acc_given_wrong")
                                         for s in seeds}))
    if others[0][0] in stages:
      rows.append(row(f"RISE {t} − control {t}", FIVE_SAMPLES,
                      {s: diff(stage, others[0][0], s, "m1@t5", "m5@t1") for s in seeds}))
  return rows


def _pp(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:+.1f}"


def paired_lines(rows: list[dict], seeds: list[int]) -> list[str]:
  """The paired differences as a markdown table, in percentage points."""
  lines = ["Paired differences per seed (percentage points; each seed's two models are evaluated on the same test "
           "problems); mean and 95% t-interval over the seeds (Student's t, n - 1 degrees of freedom):", "",
           "| comparison | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [95% t-interval] |",
           "|---|---|" + "---|" * (len(seeds) + 1)]
  for r in rows:
    summary = "-" if r["mean"] is None else _pp(r["mean"]) + (
        f" [{_pp(r['ci95'][0])}, {_pp(r['ci95'][1])}]" if r["ci95"] else " (one seed)")
    lines.append(f"| {r['comparison']} | {SCORE.get(r['metric'], r['metric'])} | " + " | ".join(_pp(r["per_seed"][s]) for s in seeds)
                 + f" | {summary} |")
  return lines


def table(runs: dict[int, pathlib.Path], walls: dict[int, float], sanity_seeds=None) -> str:
  seeds = sorted(runs)
  models = [(stage, label) for stage, label in MODELS if all((runs[s] / stage / "metrics.json").exists() for s in seeds)]
  load = {(s, stage): json.loads((runs[s] / stage / "metrics.json").read_text()) for s in seeds
          for stage, _ in models}
  stopped = [json.loads((runs[s] / "iter_0/train/DONE").read_text()).get("stopped_early_at") for s in seeds]
  lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sd over seeds, in % of the 2,000 test problems. The boost "
           f"stopped at step {', '.join(map(str, stopped))} (first dev validation >= rise.boost_stop_accuracy).", "",
           "| model | " + " | ".join(METRICS) + " | p1@t5 − m1@t1 | m1@t5 − m5@t1 |", "|---|" + "---|" * 7]
  for stage, label in models:
    cells = [_ms([load[s, stage][k] for s in seeds]) for k in METRICS]
    cells.append(_ms([load[s, stage]["p1@t5"] - load[s, stage]["m1@t1"] for s in seeds]))
    cells.append(_ms([load[s, stage]["m1@t5"] - load[s, stage]["m5@t1"] for s in seeds]))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += [chance_row(runs[seeds[0]]), "",
            "Turn-to-turn behaviour without oracle (turn 1 -> turn 2; mean ± sd over seeds, %):", "",
            "| model | acc. at t2 given t1 wrong | fresh sample on the same problems | acc. at t2 given t1 right "
            "| answer repeats previous turn |", "|---|---|---|---|---|"]
  for stage, label in models:
    row = [_ms([load[s, stage][k][0] for s in seeds])
           for k in ("acc_given_wrong", "fresh_acc_given_wrong", "acc_given_right", "repeat_rate")]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  lines += ["", "SCoRe's turn-to-turn metrics without oracle (turn 1 -> turn 2; mean ± sd over seeds, %; "
            "Δi→c / Δc→i: fraction of problems wrong / right at t1 and right / wrong at t2):", "",
            "| model | " + " | ".join(SCORE.values()) + " |", "|---|" + "---|" * len(SCORE)]
  for stage, label in models:
    lines.append(f"| {label} | " + " | ".join(_ms([metric_value(load[s, stage], k) for s in seeds]) for k in SCORE)
                 + " |")
  lines += [""] + paired_lines(paired_over_seeds(load, seeds, [stage for stage, _ in models]), seeds)
  sanity_seeds = seeds if sanity_seeds is None else [s for s in seeds if s in sanity_seeds]
  sanity = {s: history_dropped_eval(runs[s]) for s in sanity_seeds}
  lines += ["", f"Sanity check, boosted model (seeds {', '.join(map(str, sanity_seeds))}): sequential with all "
            "history dropped vs parallel sampling (%):", "",
            "| | m1@t1 | m5 (seq: m1@t5) | p5 (seq: p1@t5) |", "|---|---|---|---|",
            "| parallel, 5 samples | " + " | ".join(_ms([load[s, "iter_0/eval"][k] for s in sanity_seeds])
                                            for k in ("m1@t1", "m5@t1", "p5@t1")) + " |",
            "| sequential, history dropped | " + " | ".join(_ms([sanity[s][k] for s in sanity_seeds])
                                                     for k in ("m1@t1", "m1@t5", "p1@t5")) + " |", "",
            "Time per seed, summed over its stages' DONE markers (s): "
            + ", ".join(f"seed {s}: {_stage_seconds(runs[s]):.0f}" for s in seeds)
            + "; this invocation's wall time (s): " + ", ".join(f"seed {s}: {walls[s]:.0f}" for s in seeds if s in walls)]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="the toy config (path[:variant]) every seed runs")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="runs", help="parent directory of the <name>_seed<S> run directories")
  parser.add_argument("--no-docs", action="store_true", help="print the table without editing docs/toy.md")
  parser.add_argument("--final-only", action="store_true",
                      help="skip the intermediate iterations' evaluations (the run evaluates the boost and the last)")
  parser.add_argument("--sanity-seeds", type=int, nargs="*", default=None,
                      help="seeds whose boosted model gets the history-dropped check (default: all)")
  parser.add_argument("overrides", nargs="*", help="extra --config.* overrides passed to every run")
  args = parser.parse_args()
  name = run_name(args.config)
  runs, walls = {}, {}
  for seed in args.seeds:
    runs[seed] = (REPO / args.out / f"{name}_seed{seed}").resolve()
    walls[seed] = run_seed(seed, runs[seed], args.overrides, args.config)
    if not args.final_only:
      intermediate_evals(runs[seed])
  text = table(runs, walls, args.sanity_seeds)
  print(text)
  (REPO / args.out / f"{name}_seeds.md").write_text(text + "\n")
  if not args.no_docs:
    begin, end = markers(args.config)
    doc = REPO / "docs" / "toy.md"
    body = doc.read_text()
    if begin in body:
      body = body[:body.index(begin)] + begin + "\n" + text + "\n" + end + body[body.index(end) + len(end):]
    else:
      body += f"\n{begin}\n{text}\n{end}\n"
    doc.write_text(body)


if __name__ == "__main__":
  main()
