"""experiments/toy_seeds.py's aggregation over seeds, on synthetic metrics dicts (the seed runs themselves take many
minutes each): per-seed paired differences, their mean and Student's t interval, and the tables built from files."""

import importlib.util
import json
import pathlib
import statistics

import pytest

from rise_jax import config as config_lib
from rise_jax.pipeline import recipes

REPO = pathlib.Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]
T_975_DF2 = 4.302652729911275  # Student's t quantile 0.975 with 2 degrees of freedom (printed tables: 4.303)


@pytest.fixture(scope="module")
def toy_seeds():
  spec = importlib.util.spec_from_file_location("toy_seeds", REPO / "experiments" / "toy_seeds.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _metrics(base: float, i_to_c: float, c_to_i: float, oracle: bool = False) -> dict:
  """A metrics.json as compute_metrics writes it, reduced to what the aggregation reads. The second turn pair's
  flip rates differ from the first's, so reading the wrong pair shows."""
  score = ({"available": False, "reason": "the sequential log used an oracle"} if oracle else
           {"available": True, "pairs": ["t1->t2", "t2->t3"], "acc_t1": [base, base + i_to_c - c_to_i],
            "acc_t2": [base + i_to_c - c_to_i, base], "delta_t1_t2": [i_to_c - c_to_i, c_to_i - i_to_c],
            "delta_i_to_c": [i_to_c, 0.5], "delta_c_to_i": [c_to_i, 0.25]})
  return {"m1@t1": base, "m5@t1": base + 0.05, "m1@t5": base + 0.02, "p1@t5": base + 0.1, "p5@t1": base + 0.2,
          "acc_given_wrong": [0.3], "fresh_acc_given_wrong": [0.2], "acc_given_right": [0.9], "repeat_rate": [0.5],
          "score": score}


def _load():
  # Per seed: boost, RISE 1, control 1 (hand-picked so every difference differs from seed to seed).
  boost = {0: _metrics(0.60, 0.00, 0.01), 1: _metrics(0.62, 0.01, 0.00), 2: _metrics(0.64, 0.00, 0.00)}
  rise = {0: _metrics(0.70, 0.20, 0.05), 1: _metrics(0.75, 0.30, 0.02), 2: _metrics(0.71, 0.25, 0.04)}
  control = {0: _metrics(0.80, 0.00, 0.00), 1: _metrics(0.78, 0.01, 0.01), 2: _metrics(0.83, 0.02, 0.00)}
  load = {}
  for stage, per_seed in (("iter_0/eval", boost), ("iter_1/eval", rise), ("iter_1/control/eval", control)):
    load.update({(s, stage): per_seed[s] for s in SEEDS})
  return load, boost, rise, control


def test_t_interval_is_students_t_over_seeds(toy_seeds):
  values = [0.10, 0.04, 0.07]
  mean, (low, high) = toy_seeds.t_interval(values)
  sd = (sum((v - 0.07) ** 2 for v in values) / 2) ** 0.5  # sample sd, n - 1 = 2
  assert mean == pytest.approx(0.07)
  assert high - mean == pytest.approx(mean - low) == pytest.approx(T_975_DF2 * sd / 3 ** 0.5)
  assert toy_seeds.t_interval([0.3]) == (0.3, None)


def test_paired_differences_per_seed(toy_seeds):
  load, boost, rise, control = _load()
  rows = toy_seeds.paired_over_seeds(load, SEEDS, ["iter_0/eval", "iter_1/eval", "iter_1/control/eval"])
  by = {(r["comparison"], r["metric"]): r for r in rows}
  assert {c for c, _ in by} == {"RISE 1 − control 1", "RISE 1 − boost", "RISE 1"}
  cases = [("RISE 1 − control 1", control), ("RISE 1 − boost", boost)]
  for comparison, other in cases:
    for name in toy_seeds.METRICS:
      assert by[comparison, name]["per_seed"] == pytest.approx({s: rise[s][name] - other[s][name] for s in SEEDS})
    for name in ("delta_i_to_c", "delta_c_to_i", "delta_t1_t2", "acc_t2"):  # turn pair 1 -> 2: index 0
      want = {s: rise[s]["score"][name][0] - other[s]["score"][name][0] for s in SEEDS}
      assert by[comparison, name]["per_seed"] == pytest.approx(want), (comparison, name)
  # RISE - boost, Δi→c per seed by hand: 0.20 - 0.00, 0.30 - 0.01, 0.25 - 0.00; Δc→i: 0.04, 0.02, 0.04.
  assert list(by["RISE 1 − boost", "delta_i_to_c"]["per_seed"].values()) == pytest.approx([0.20, 0.29, 0.25])
  assert list(by["RISE 1 − boost", "delta_c_to_i"]["per_seed"].values()) == pytest.approx([0.04, 0.02, 0.04])
  within = by["RISE 1", "m1@t5 − m5@t1"]
  assert within["per_seed"] == pytest.approx({s: -0.03 for s in SEEDS})
  r = by["RISE 1 − control 1", "m1@t1"]
  diffs = [0.70 - 0.80, 0.75 - 0.78, 0.71 - 0.83]
  half = T_975_DF2 * statistics.stdev(diffs) / 3 ** 0.5
  assert r["mean"] == pytest.approx(statistics.mean(diffs)) and r["num_seeds"] == 3
  assert r["ci95"] == pytest.approx([statistics.mean(diffs) - half, statistics.mean(diffs) + half])


def test_scores_differences_skip_seeds_without_them(toy_seeds):
  load, *_ = _load()
  load[1, "iter_1/control/eval"] = dict(_metrics(0.8, 0, 0, oracle=True))
  del load[2, "iter_1/control/eval"]["score"]  # a metrics.json written before SCoRe's metrics were reported
  rows = toy_seeds.paired_over_seeds(load, SEEDS, ["iter_1/eval", "iter_1/control/eval"])
  r = next(r for r in rows if r["metric"] == "delta_i_to_c")
  assert r["per_seed"][1] is None and r["per_seed"][2] is None and r["num_seeds"] == 1 and r["ci95"] is None
  assert r["mean"] == pytest.approx(0.20)
  lines = toy_seeds.paired_lines(rows, SEEDS)
  assert "| RISE 1 − control 1 | Δi→c(t1, t2) | +20.0 | - | - | +20.0 (one seed) |" in lines
  assert "Student's t" in lines[0]


def test_table_from_run_directories(toy_seeds, tmp_path):
  load, *_ = _load()
  runs = {}
  for s in SEEDS:
    runs[s] = tmp_path / f"toy_seed{s}"
    (runs[s] / "iter_0/train").mkdir(parents=True)
    (runs[s] / "config.json").write_text(json.dumps({"task": config_lib.to_dict(recipes.toy())["task"]}))
    (runs[s] / "iter_0/train/DONE").write_text(json.dumps({"seconds": 10.0, "stopped_early_at": 100 + s}))
    for stage in ("iter_0/eval", "iter_1/eval", "iter_1/control/eval"):
      (runs[s] / stage).mkdir(parents=True)
      (runs[s] / stage / "metrics.json").write_text(json.dumps(load[s, stage]))
  text = toy_seeds.table(runs, {s: 1.0 for s in SEEDS}, sanity_seeds=[])
  diffs = [0.70 - 0.80, 0.75 - 0.78, 0.71 - 0.83]
  mean, (low, high) = toy_seeds.t_interval(diffs)
  assert (f"| RISE 1 − control 1 | m1@t1 | -10.0 | -3.0 | -12.0 | {100 * mean:+.1f} [{100 * low:+.1f}, "
          f"{100 * high:+.1f}] |") in text
  # SCoRe's metrics, mean ± sd over seeds: the boost's Δc→i(t1, t2) is 1, 0, 0 %.
  boost_row = next(line for line in text.splitlines() if line.startswith("| boost |") and "Δ" not in line
                   and line.count("±") == len(toy_seeds.SCORE))
  assert boost_row.endswith("| 0.3 ± 0.6 |")
  # The default toy's 180 answers: 1/180 per attempt, 5/180 over five distinct guesses, 1 - (179/180)^5 parallel.
  assert "| uniform guesser over the 180 answers (exact) | 0.6 | 0.6 | 0.6 | 2.8 | 2.7 | 2.2 | 0.0 |" in text


def test_retry_and_five_samples_rows_are_paired_within_each_seed(toy_seeds):
  load, boost, rise, control = _load()
  for s in SEEDS:  # per seed: the retry after a wrong turn 1, and a fresh sample on the same problems
    rise[s]["acc_given_wrong"], rise[s]["fresh_acc_given_wrong"] = [0.30 + 0.05 * s, 0.9], [0.25, 0.1]
  rows = toy_seeds.paired_over_seeds(load, SEEDS, ["iter_0/eval", "iter_1/eval", "iter_1/control/eval"])
  by = {(r["comparison"], r["metric"]): r for r in rows}
  assert list(by["RISE 1", toy_seeds.RETRY]["per_seed"].values()) == pytest.approx([0.05, 0.10, 0.15])
  # RISE's m1@t5 (base + 0.02) against the control's m5@t1 (its base + 0.05), seed by seed.
  want = [0.72 - 0.85, 0.77 - 0.83, 0.73 - 0.88]
  assert list(by["RISE 1 − control 1", toy_seeds.FIVE_SAMPLES]["per_seed"].values()) == pytest.approx(want)


def test_run_names_and_docs_markers_follow_the_config(toy_seeds):
  assert toy_seeds.run_name("configs/toy.py") == "toy"
  assert toy_seeds.run_name("configs/toy_two_products.py:mix") == "toy_two_products_mix"
  assert toy_seeds.markers("configs/toy.py") == ("<!-- toy_seeds:begin -->", "<!-- toy_seeds:end -->")
  assert toy_seeds.markers("configs/toy_two_products.py:mix")[0] == "<!-- toy_seeds:toy_two_products_mix:begin -->"


def test_the_history_dropped_policy_streams_the_opening_messages_only(toy_seeds, tmp_path):
  """The sanity check's policy runs under the stream-only runner and shows the inner policy the opening messages
  (instruction, example answer, question) at every turn, so it samples as parallel sampling does."""
  from rise_jax.rollout import log as rollout_log
  from rise_jax.rollout.policies import ScriptedPolicy, TurnSampling
  from rise_jax.rollout.runner import Protocol, run_episodes
  from rise_jax.tasks import get_task
  from rise_jax.tasks.prompts import get_prompt_set
  task = get_task("toy", test_size=20, dev_size=5)
  prompts = get_prompt_set("toy")
  seen = []
  inner = ScriptedPolicy(lambda request, j: seen.append(len(request.messages)) or "1*1=1,0+1=2", name="inner")
  protocol = Protocol.sequential(3, select="first", sampling=TurnSampling(temperature=1.0, max_new_tokens=8),
                                 grader="robust")
  problems = task.load("test")[:2]
  run_episodes(problems, toy_seeds._DropHistory(inner), protocol, tmp_path / "log.jsonl", task=task,
               prompts=prompts, header=rollout_log.make_header("h", "m"), progress=False)
  assert seen == [3] * 6
