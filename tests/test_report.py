"""Report files: metrics.json round trip, report.md in the Table 1 layout, plots, and the cross-iteration summary."""

import json
import random

import pytest

from rise_jax.rise import metrics, report

import rollout_builders as rb

pytestmark = pytest.mark.timeout(120)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _logs(p_right: float, seed: int, n: int = 30, turns: int = 3, k: int = 3):
  rng = random.Random(seed)
  seq, par = [], []
  for i in range(n):
    answers = ["1" if rng.random() < p_right else rng.choice("23") for _ in range(turns)]
    seq.append(rb.sequential(f"toy/test/{i}", [(a, float(a == "1")) for a in answers]))
    samples = ["1" if rng.random() < p_right else rng.choice("23") for _ in range(k)]
    par.append(rb.parallel(f"toy/test/{i}", [(a, float(a == "1")) for a in samples]))
  return seq, par


@pytest.fixture(scope="module")
def two_iterations():
  return {"iter_0 (base)": metrics.compute_metrics(*_logs(0.3, 0), num_bootstrap=300),
          "iter_1": metrics.compute_metrics(*_logs(0.6, 1), num_bootstrap=300)}


def test_write_report_files(tmp_path, two_iterations):
  m = two_iterations["iter_1"]
  written = report.write_report(m, tmp_path, title="toy eval")
  assert set(written) == {"metrics.json", "report.md", "accuracy_vs_turn.png", "seq_vs_parallel.png",
                          "transitions.png"}
  assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(m))
  for name in ("accuracy_vs_turn.png", "seq_vs_parallel.png", "transitions.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temporary files left behind


def test_report_md_has_table1_with_intervals(tmp_path, two_iterations):
  m = two_iterations["iter_1"]
  report.write_report(m, tmp_path, plots=False)
  md = (tmp_path / "report.md").read_text()
  row = next(line for line in md.splitlines() if line.startswith("| this model |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  assert len(cells) == 5  # m1@t1, m3@t1, m1@t3 (w/o oracle), p1@t3, p3@t1 (w/ oracle)
  for cell, name in zip(cells, ["m1@t1", "m3@t1", "m1@t3", "p1@t3", "p3@t1"]):
    low, high = m["ci95"][name]
    assert cell.startswith(f"{100 * m[name]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"), (name, cell)
  assert cells[2].endswith(f"({100 * (m['m1@t3'] - m['m1@t1']):+.1f})")
  for header in ("## Sequential vs parallel", "## Turns", "paper Fig. 5", "## Compute", "## Majority votes"):
    assert header in md
  transitions = m["transitions"][0]
  assert f"| 1->2 | {transitions['c->c']} | {transitions['c->i']} | {transitions['i->c']} | {transitions['i->i']} |" \
      in md


def test_report_for_one_run_only(tmp_path):
  seq, par = _logs(0.5, 2)
  only_seq = report.write_report(metrics.compute_metrics(seq, num_bootstrap=100), tmp_path / "s")
  assert "seq_vs_parallel.png" not in only_seq and "accuracy_vs_turn.png" in only_seq
  only_par = report.write_report(metrics.compute_metrics(parallel_records=par, num_bootstrap=100), tmp_path / "p")
  assert set(only_par) == {"metrics.json", "report.md"}
  assert "| this model |" in (tmp_path / "p" / "report.md").read_text()


def test_write_summary(tmp_path, two_iterations):
  written = report.write_summary(two_iterations, tmp_path, num_bootstrap=300)
  assert set(written) == {"summary.json", "summary.md", "accuracy_vs_turn.png"}
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["iterations"] == ["iter_0 (base)", "iter_1"]
  before, after = two_iterations["iter_0 (base)"], two_iterations["iter_1"]
  assert summary["metrics"]["iter_1"]["m1@t3"] == after["m1@t3"]
  diff = summary["differences"]["iter_1 - iter_0 (base): m1@t1"]
  assert diff["diff"] == pytest.approx(after["m1@t1"] - before["m1@t1"])  # same 30 problems in both
  assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1] and diff["num_problems"] == 30
  assert "iter_1 - iter_0 (base): p1@t3" in summary["differences"]
  md = (tmp_path / "summary.md").read_text()
  # Table 1 and accuracy per turn (a row each), SCoRe's metrics (a row per turn pair: 2 of 3 turns).
  assert sum(line.startswith(("| iter_0 (base) |", "| iter_1 |")) for line in md.splitlines()) == 2 + 2 + 4
  assert summary["score_differences"]["iter_1 - iter_0 (base)"]["pairs"] == ["t1->t2", "t2->t3"]
  assert (tmp_path / "accuracy_vs_turn.png").read_bytes()[:8] == PNG_MAGIC


def test_summary_from_metrics_json_files(tmp_path, two_iterations):
  # The RISE loop reads each iteration's metrics.json back: differences work from the files alone.
  loaded = {}
  for name, m in two_iterations.items():
    report.write_report(m, tmp_path / name, plots=False)
    loaded[name] = json.loads((tmp_path / name / "metrics.json").read_text())
  a = report.write_summary(two_iterations, tmp_path / "a", num_bootstrap=200, plots=False)
  b = report.write_summary(loaded, tmp_path / "b", num_bootstrap=200, plots=False)
  assert "accuracy_vs_turn.png" not in a
  assert json.loads(a["summary.json"].read_text()) == json.loads(b["summary.json"].read_text())


def test_report_for_an_oracle_log_where_every_problem_stopped_at_turn_one(tmp_path):
  seq = [rb.sequential(f"p{i}", [("1", 1)], oracle=True, turns=3) for i in range(4)]
  par = [rb.parallel(f"p{i}", [("1", 1), ("2", 0)]) for i in range(4)]
  m = metrics.compute_metrics(seq, par, num_bootstrap=100)
  assert m["per_turn_accuracy"] == [1.0, None, None] and m["per_turn_count"] == [4, 0, 0]
  written = report.write_report(m, tmp_path)
  assert "transitions.png" in written
  assert "| 2 | –  | 0 | – |" in (tmp_path / "report.md").read_text()


def test_offline_cli_recomputes_from_logs(tmp_path):
  seq, par = _logs(0.5, 3, n=10)
  rb.write_log(tmp_path / "seq.jsonl", seq)
  rb.write_log(tmp_path / "par.jsonl", par)
  m = report.main(["--sequential", str(tmp_path / "seq.jsonl"), "--parallel", str(tmp_path / "par.jsonl"),
                   "--out", str(tmp_path / "out"), "--num_bootstrap", "100"])
  direct = metrics.compute_metrics(seq, par, num_bootstrap=100)
  assert m["m1@t3"] == direct["m1@t3"] and m["p3@t1"] == direct["p3@t1"]
  assert json.loads((tmp_path / "out" / "metrics.json").read_text())["sources"]["m3@t1"] == str(tmp_path / "par.jsonl")
  with pytest.raises(SystemExit):
    report.main(["--out", str(tmp_path / "x")])


def _log(path, records, model="rise@iter_1", config_hash="cafe0123"):
  from rise_jax.rollout import log as rollout_log
  header = rollout_log.make_header(config_hash, model, versions={"rise_jax": "0.1.0"}, git_commit="0" * 40)
  with rollout_log.RolloutWriter(path, header, fsync=False) as w:
    for r in records:
      w.write(r)
  return str(path)


def _refused(capsys, argv, needle):
  with pytest.raises(SystemExit) as e:
    report.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert needle in err, err


def test_offline_cli_refuses_what_would_merge_into_wrong_numbers(tmp_path, capsys):
  seq, par = _logs(0.5, 3, n=6)
  a = _log(tmp_path / "a.jsonl", seq)
  b = _log(tmp_path / "b.jsonl", [dict(r, protocol=dict(r["protocol"], seed=9)) for r in seq], model="rise@iter_2")
  c = _log(tmp_path / "c.jsonl", [dict(r, protocol=dict(r["protocol"], seed=9)) for r in seq], config_hash="beef")
  p = _log(tmp_path / "p.jsonl", par, model="rise@iter_2")
  out = ["--out", str(tmp_path / "out"), "--num_bootstrap", "50"]
  _refused(capsys, ["--sequential", a, "--sequential", b, *out], "field 'model': 'rise@iter_2', but")
  _refused(capsys, ["--sequential", a, "--parallel", p, *out], "field 'model'")
  _refused(capsys, ["--sequential", a, "--sequential", c, *out], "field 'config_hash': 'beef'")
  _refused(capsys, ["--sequential", a, "--sequential", a, *out], "the same file as")
  copy = tmp_path / "copy.jsonl"
  copy.write_bytes((tmp_path / "a.jsonl").read_bytes())
  _refused(capsys, ["--sequential", a, "--sequential", str(copy), *out], "draw seed 0 again")
  dup = _log(tmp_path / "dup.jsonl", seq + seq[:1])
  _refused(capsys, ["--sequential", dup, *out], "dup.jsonl:8: problem 'toy/test/0' again (first at line 2)")
  high = [rb.sequential("p0", [("1", 7.0)])]
  _refused(capsys, ["--sequential", _log(tmp_path / "high.jsonl", high), *out],
           "high.jsonl:2: field 'turns[0].candidates[0].reward': 7.0 is outside the robust grader's range")
  _refused(capsys, ["--sequential", _log(tmp_path / "empty.jsonl", []), *out], "empty.jsonl: holds no episodes")
  _refused(capsys, ["--sequential", str(tmp_path / "missing.jsonl"), *out], "missing.jsonl: no such file")
  (tmp_path / "file").write_text("x\n")
  _refused(capsys, ["--sequential", a, "--out", str(tmp_path / "file")], "is a file")
  assert report.main(["--sequential", a, *out])["num_problems"] == 6  # one clean log still reports


# ------------------------------------------------------------------------------------ SCoRe's metrics


def _turn_logs(rows, oracle=False):
  """Sequential records from per-problem turn correctness lists (answers distinct per turn)."""
  return [rb.sequential(pid, [(f"{pid}{t}", float(r)) for t, r in enumerate(rs)], oracle=oracle)
          for pid, rs in rows.items()]


def _flip_rates(rows):
  """SCoRe's metrics of turn pair 1 -> 2 straight from the definitions (fractions of problems)."""
  n = len(rows)
  return {"acc_t1": sum(r[0] for r in rows.values()) / n, "acc_t2": sum(r[1] for r in rows.values()) / n,
          "delta_t1_t2": sum(r[1] - r[0] for r in rows.values()) / n,
          "delta_i_to_c": sum(not r[0] and r[1] for r in rows.values()) / n,
          "delta_c_to_i": sum(r[0] and not r[1] for r in rows.values()) / n}


BOOST = {"a": [0, 0], "b": [1, 0], "c": [0, 0], "d": [1, 1]}
RISE = {"a": [0, 1], "b": [1, 1], "c": [0, 1], "d": [1, 1]}
CONTROL = {"a": [0, 0], "b": [1, 1], "c": [0, 1], "d": [0, 0]}


def test_report_md_has_scores_turn_to_turn_table(tmp_path):
  rows = {"a": [0, 1, 1], "b": [1, 0, 1], "c": [0, 1, 0], "d": [0, 1, 1], "e": [1, 1, 0], "f": [0, 0, 0]}
  m = metrics.compute_metrics(_turn_logs(rows), num_bootstrap=200)
  report.write_report(m, tmp_path, plots=False)
  md = (tmp_path / "report.md").read_text()
  assert "## Turn to turn without oracle (SCoRe's metrics)" in md
  score, hand = m["score"], _flip_rates(rows)

  def cell(name, signed):
    fmt = (lambda x: f"{100 * x:+.1f}") if signed else (lambda x: f"{100 * x:.1f}")  # noqa: E731
    low, high = score["ci95"][name][0]
    return f"{fmt(hand[name])} [{fmt(low)}, {fmt(high)}]"

  row = " | ".join([cell("acc_t1", False), cell("acc_t2", False), cell("delta_t1_t2", True),
                    cell("delta_i_to_c", False), cell("delta_c_to_i", False)])
  assert f"| t1->t2 | 6 | {row} |" in md
  assert "| t2->t3 | 6 |" in md
  assert json.loads((tmp_path / "metrics.json").read_text())["score"] == json.loads(json.dumps(score))


def test_report_says_scores_metrics_are_not_available_from_an_oracle_log(tmp_path):
  m = metrics.compute_metrics(_turn_logs({"a": [0, 1], "b": [0, 0]}, oracle=True), num_bootstrap=100)
  report.write_report(m, tmp_path, plots=False)
  md = (tmp_path / "report.md").read_text()
  assert "not available (the sequential log used an oracle" in md and "| t1->t2 |" not in md


def test_summary_paired_differences_of_scores_metrics(tmp_path):
  rows = {name: metrics.compute_metrics(_turn_logs(r), num_bootstrap=100)
          for name, r in (("boost", BOOST), ("RISE", RISE), ("control", CONTROL))}
  rows["oracle"] = metrics.compute_metrics(_turn_logs(RISE, oracle=True), num_bootstrap=100)
  report.write_summary(rows, tmp_path, num_bootstrap=300, plots=False,
                       comparisons=[("RISE", "control"), ("RISE", "boost"), ("RISE", "oracle")])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert list(summary["score_differences"]) == ["RISE - control", "RISE - boost", "RISE - oracle"]
  for other, table in (("control", CONTROL), ("boost", BOOST)):
    d, mine, theirs = summary["score_differences"][f"RISE - {other}"], _flip_rates(RISE), _flip_rates(table)
    assert d["available"] and d["pairs"] == ["t1->t2"]
    for name in metrics.SCORE_METRICS:
      assert d[name][0]["diff"] == pytest.approx(mine[name] - theirs[name]), (other, name)
      assert d[name][0]["num_problems"] == 4
  # RISE - boost: i->c +50, c->i -25 (a swap of the two would show)
  assert summary["score_differences"]["RISE - boost"]["delta_i_to_c"][0]["diff"] == pytest.approx(0.5)
  assert summary["score_differences"]["RISE - boost"]["delta_c_to_i"][0]["diff"] == pytest.approx(-0.25)
  oracle = summary["score_differences"]["RISE - oracle"]
  assert oracle["available"] is False and oracle["reason"].startswith("oracle: the sequential log used an oracle")
  assert summary["differences"]["RISE - control: m1@t1"]["diff"] == pytest.approx(0.25)
  assert summary["metrics"]["RISE"]["score"] == json.loads(json.dumps(rows["RISE"]["score"]))
  md = (tmp_path / "summary.md").read_text()
  assert "## SCoRe's metrics, paired differences" in md and "| RISE - boost: delta_i_to_c t1->t2 | 50.0 |" in md
  assert "RISE - oracle: not available" in md
  with pytest.raises(ValueError, match="not among"):
    report.write_summary(rows, tmp_path, plots=False, comparisons=[("RISE", "iter_9")])


def test_summary_of_metrics_written_before_scores_metrics(tmp_path):
  old = {name: metrics.compute_metrics(_turn_logs(r), num_bootstrap=100) for name, r in (("a", BOOST), ("b", RISE))}
  del old["a"]["score"]  # a metrics.json from before the key existed still summarises
  report.write_summary(old, tmp_path, num_bootstrap=100, plots=False)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["score_differences"]["b - a"] == {
      "available": False, "reason": "a: computed before SCoRe's metrics were reported"}
  assert "b - a: m1@t1" in summary["differences"]


def test_run_summary_compares_rise_with_its_control_and_the_boost():
  import types
  from rise_jax.pipeline import summary
  config = types.SimpleNamespace(rise=types.SimpleNamespace(boost=True))
  stages = ["iter_0/eval", "iter_1/eval", "iter_1/control/eval", "iter_2/eval"]
  pairs = summary.comparisons(stages, config)
  boost = "iter_0 (base + boost)"
  # RISE minus its control, the boost and the RISE iteration before it; never a control against the next RISE.
  assert pairs == [("iter_1 RISE", "iter_1 single-turn control"), ("iter_1 RISE", boost), ("iter_2 RISE", boost),
                   ("iter_2 RISE", "iter_1 RISE")]


def test_run_summary_writes_scores_differences_from_the_run_directory(tmp_path):
  import types
  from rise_jax.pipeline import summary
  config = types.SimpleNamespace(name="toy", seed=0, rise=types.SimpleNamespace(boost=True),
                                 eval=types.SimpleNamespace(parallel_k=2, turns=2))
  stages = [types.SimpleNamespace(name=n, kind="eval", iteration=i)
            for n, i in (("iter_0/eval", 0), ("iter_1/eval", 1), ("iter_1/control/eval", 1))]
  for stage, rows in zip(stages, (BOOST, RISE, CONTROL)):
    report.write_report(metrics.compute_metrics(_turn_logs(rows), num_bootstrap=100), tmp_path / stage.name,
                        plots=False)
    (tmp_path / stage.name / "DONE").write_text(json.dumps({"seconds": 1.0}))
  out = summary.write_run_summary(config, tmp_path, stages)
  d = out["score_differences"]
  assert d["iter_1 RISE - iter_1 single-turn control"]["delta_i_to_c"][0]["diff"] == pytest.approx(
      _flip_rates(RISE)["delta_i_to_c"] - _flip_rates(CONTROL)["delta_i_to_c"])
  assert d["iter_1 RISE - iter_0 (base + boost)"]["delta_c_to_i"][0]["diff"] == pytest.approx(-0.25)
  assert "## SCoRe's metrics, paired differences" in (tmp_path / "summary.md").read_text()
  # The terminal gets the rest of summary.md and where the SCoRe sections are (rows per model and turn pair).
  assert "## SCoRe's metrics, paired differences" not in out["table_md"] and "## Table 1" in out["table_md"]
  assert "(SCoRe's metrics, paired differences (paired bootstrap over shared problems): summary.md)" in out["table_md"]
