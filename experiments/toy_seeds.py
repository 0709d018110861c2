"""Run the embedded default experiment (configs/toy.py) over several seeds and write its results table.

    python experiments/toy_seeds.py                      # seeds 0 1 2 -> runs/toy_seed<S>/, table into docs/toy.md
    python experiments/toy_seeds.py --seeds 0 --no-docs  # one seed, table printed only

Each seed is one `python -m rise_jax.run` (so a seed that was interrupted resumes). The run evaluates the boost and
the last iteration (`rise.evaluate="final"`, inside the time budget); this script then evaluates the intermediate
iterations and controls through the run's own eval stage. Then, per seed, the boosted model is evaluated once more sequentially with all history dropped (every turn sees only the opening messages):
such a run is parallel sampling in disguise and must reproduce the parallel numbers (the sanity check). The
table reports mean +- sd over seeds of m1@t1, m5@t1, m1@t5, p1@t5, p5@t1 and the conditional accuracies, the
uniform guesser's chance p1@t5, and the sanity check.
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
BEGIN, END = "<!-- toy_seeds:begin -->", "<!-- toy_seeds:end -->"
MODELS = [("iter_0/eval", "boost"),
          ("iter_1/eval", "RISE iteration 1 (distillation: reference solutions)"),
          ("iter_1/control/eval", "single-turn control 1"),
          ("iter_2/eval", "RISE iteration 2 (self-distillation, best-of-4, no oracle)"),
          ("iter_2/control/eval", "single-turn control 2"),
          ("iter_3/eval", "RISE iteration 3 (self-distillation, best-of-4, no oracle)"),
          ("iter_3/control/eval", "single-turn control 3")]
METRICS = ["m1@t1", "m5@t1", "m1@t5", "p1@t5", "p5@t1"]


def run_seed(seed: int, out: pathlib.Path, extra: list[str]) -> float:
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "rise_jax.run", "--config=configs/toy.py", f"--config.seed={seed}",
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
      stages.evaluate(res, stage, out, limit=None)


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


def _stage_seconds(run_dir: pathlib.Path) -> float:
  return sum(json.loads(p.read_text()).get("seconds", 0.0) for p in run_dir.rglob("DONE"))


def _ms(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  mean = 100 * statistics.mean(values)
  sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.1f} ± {sd:.1f}"


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
  lines += ["| uniform guesser over the 180 answers (exact) | 0.6 | 0.6 | 0.6 | 2.8 | 2.8 | 2.2 | 0.0 |", "",
            "Turn-to-turn behaviour without oracle (turn 1 -> turn 2; mean ± sd over seeds, %):", "",
            "| model | acc. at t2 given t1 wrong | fresh sample on the same problems | acc. at t2 given t1 right "
            "| answer repeats previous turn |", "|---|---|---|---|---|"]
  for stage, label in models:
    row = [_ms([load[s, stage][k][0] for s in seeds])
           for k in ("acc_given_wrong", "fresh_acc_given_wrong", "acc_given_right", "repeat_rate")]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
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
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="runs", help="parent directory of the runs/toy_seed<S> directories")
  parser.add_argument("--no-docs", action="store_true", help="print the table without editing docs/toy.md")
  parser.add_argument("--sanity-seeds", type=int, nargs="*", default=None,
                      help="seeds whose boosted model gets the history-dropped check (default: all)")
  parser.add_argument("overrides", nargs="*", help="extra --config.* overrides passed to every run")
  args = parser.parse_args()
  runs, walls = {}, {}
  for seed in args.seeds:
    runs[seed] = (REPO / args.out / f"toy_seed{seed}").resolve()
    walls[seed] = run_seed(seed, runs[seed], args.overrides)
    intermediate_evals(runs[seed])
  text = table(runs, walls, args.sanity_seeds)
  print(text)
  (REPO / args.out / "toy_seeds.md").write_text(text + "\n")
  if not args.no_docs:
    doc = REPO / "docs" / "toy.md"
    body = doc.read_text()
    if BEGIN in body:
      body = body[:body.index(BEGIN)] + BEGIN + "\n" + text + "\n" + END + body[body.index(END) + len(END):]
    else:
      body += f"\n{BEGIN}\n{text}\n{END}\n"
    doc.write_text(body)


if __name__ == "__main__":
  main()
