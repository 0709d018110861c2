"""Conversion of rollout records into weighted training records, against hand-computed datasets.

Every expected dataset below was written out by hand from the definitions in rise.md / the reference's
`workflow_convert.py` (prefix per kept action, only the last action trained, criteria, dedupe removing an action
together with the feedback after it, only_success, w = exp(r / tau)).
"""

import json
import math

import pytest

from rise_jax.rise import algorithm as collect
from rise_jax.rise.conversion import ConversionOptions, convert_rollouts

W1 = 12.182493960703473   # exp(1 / 0.4)
WM1 = 0.0820849986238988  # exp(-1 / 0.4)


def _turn(t, text, reward, feedback="F", ids=None, n=1, policy="learner@iter_0"):
  candidates = [{"text": f"other{j}", "token_ids": None, "reward": 0.0} for j in range(n - 1)]
  candidates.append({"text": text, "token_ids": ids, "reward": reward})
  return {"t": t, "policy": policy, "candidates": candidates, "chosen": n - 1, "feedback": feedback}


def _record(pid, *turns, grader="robust"):
  return {"problem_id": pid, "task": "toy", "reference": "?", "turns": list(turns),
          "protocol": {"kind": "sequential", "grader": grader, "select": "best_reward"}, "stop": "max_turns"}


def _init(pid):
  return [{"role": "user", "content": "INSTR"}, {"role": "assistant", "content": "EX"},
          {"role": "user", "content": f"Q:{pid}"}]


def _a(text, train=False):
  return {"role": "assistant", "content": text, **({"train": True} if train else {})}


def _u(text):
  return {"role": "user", "content": text}


# A: wrong, the same wrong answer again (whitespace differs), then right.
EP_A = _record("p/A", _turn(1, "7", 0.0, "F1", ids=[7]), _turn(2, "7 ", 0.0, "F2"), _turn(3, "9", 1.0, None, n=4))
# B: an empty first answer, then right: dedupe turns the second answer into a first-position example.
EP_B = _record("p/B", _turn(1, "  ", 0.0, "F1"), _turn(2, "5", 1.0, None))
# C: right at once (the episode stopped there).
EP_C = _record("p/C", _turn(1, "3", 1.0, None))
# D: never right.
EP_D = _record("p/D", _turn(1, "4", 0.0, "F1"), _turn(2, "2", 0.0, None))
# E: the paper grader's -1 (unparsable), then a parsable wrong answer.
EP_E = _record("p/E", _turn(1, "x", -1.0, "F1"), _turn(2, "y", 0.0, None), grader="paper")
ALL = [EP_A, EP_B, EP_C, EP_D, EP_E]


def _convert(records, **kw):
  return convert_rollouts(records, _init, ConversionOptions(**kw))


def _summary(conv):
  """(id, weight, messages after the 3 opening ones) for each record."""
  return [(r["id"], r["weight"], r["messages"][3:]) for r in conv.records]


def test_criteria_all_with_dedupe_hand_computed():
  conv = _convert(ALL, criteria="all", dedupe=True)
  assert _summary(conv) == [
      ("p/A#iter1#t1", 1.0, [_a("7", True)]),
      # the duplicate turn 2 and its feedback F2 are gone: turn 3 follows F1 directly.
      ("p/A#iter1#t3", pytest.approx(W1), [_a("7"), _u("F1"), _a("9", True)]),
      # the empty turn 1 and F1 are gone: turn 2 is now a first-position example.
      ("p/B#iter1#t2", pytest.approx(W1), [_a("5", True)]),
      ("p/C#iter1#t1", pytest.approx(W1), [_a("3", True)]),
      ("p/D#iter1#t1", 1.0, [_a("4", True)]),
      ("p/D#iter1#t2", 1.0, [_a("4"), _u("F1"), _a("2", True)]),
      ("p/E#iter1#t1", pytest.approx(WM1), [_a("x", True)]),
      ("p/E#iter1#t2", 1.0, [_a("x"), _u("F1"), _a("y", True)]),
  ]
  for r in conv.records:
    assert r["messages"][:3] == _init(r["meta"]["problem_id"])
    assert sum(bool(m.get("train")) for m in r["messages"]) == 1
  s = conv.stats
  assert (s.episodes, s.actions, s.removed_duplicate, s.removed_empty, s.examples) == (5, 10, 1, 1, 8)
  assert s.examples_per_reward == {"0.0": 4, "1.0": 3, "-1.0": 1}
  assert s.kept_per_criterion == {"all": 8, "better": 7, "best": 8, "success": 3}
  assert conv.sampled_ids[:2] == [[7], None]
  meta = conv.records[2]["meta"]
  assert (meta["turn"], meta["position"], meta["reward"]) == (2, 1, 1.0)
  assert conv.records[1]["meta"]["source"] == "learner@iter_0:best_of_4"
  assert conv.records[6]["meta"]["grader"] == "paper"


def test_criteria_without_dedupe_hand_computed():
  def ids(**kw):
    return [r["id"] for r in _convert(ALL, dedupe=False, **kw).records]
  assert ids(criteria="all") == ["p/A#iter1#t1", "p/A#iter1#t2", "p/A#iter1#t3", "p/B#iter1#t1", "p/B#iter1#t2",
                                 "p/C#iter1#t1", "p/D#iter1#t1", "p/D#iter1#t2", "p/E#iter1#t1", "p/E#iter1#t2"]
  # better: strictly above the previous action (ties dropped).
  assert ids(criteria="better") == ["p/A#iter1#t1", "p/A#iter1#t3", "p/B#iter1#t1", "p/B#iter1#t2",
                                    "p/C#iter1#t1", "p/D#iter1#t1", "p/E#iter1#t1", "p/E#iter1#t2"]
  # best: at least every earlier action (ties kept).
  assert ids(criteria="best") == ["p/A#iter1#t1", "p/A#iter1#t2", "p/A#iter1#t3", "p/B#iter1#t1", "p/B#iter1#t2",
                                  "p/C#iter1#t1", "p/D#iter1#t1", "p/D#iter1#t2", "p/E#iter1#t1", "p/E#iter1#t2"]
  # success: only correct actions, first turn included only when correct.
  assert ids(criteria="success") == ["p/A#iter1#t3", "p/B#iter1#t2", "p/C#iter1#t1"]
  full = _convert([EP_A], dedupe=False).records[2]["messages"][3:]
  assert full == [_a("7"), _u("F1"), _a("7 "), _u("F2"), _a("9", True)]  # sampled text kept verbatim


def test_better_and_best_after_dedupe_compare_kept_neighbours():
  # rewards after dedupe: [0 (t1), -1 (t3), 0 (t4)]: t2 duplicates t1 and goes, with its feedback.
  ep = _record("p/F", _turn(1, "a", 0.0, "F1"), _turn(2, "a", 0.0, "F2"), _turn(3, "b", -1.0, "F3"),
               _turn(4, "c", 0.0, None))
  better = _convert([ep], criteria="better").records
  assert [r["id"] for r in better] == ["p/F#iter1#t1", "p/F#iter1#t4"]
  assert better[1]["messages"][3:] == [_a("a"), _u("F1"), _a("b"), _u("F3"), _a("c", True)]
  assert [r["id"] for r in _convert([ep], criteria="best").records] == ["p/F#iter1#t1", "p/F#iter1#t4"]
  assert [r["id"] for r in _convert([ep], criteria="best", dedupe=False).records] == [
      "p/F#iter1#t1", "p/F#iter1#t2", "p/F#iter1#t4"]


def test_only_success_drops_unsolved_episodes_and_counts_them():
  conv = _convert(ALL, only_success=True)
  assert sorted({r["meta"]["problem_id"] for r in conv.records}) == ["p/A", "p/B", "p/C"]
  assert conv.stats.episodes_skipped_only_success == 2
  assert conv.stats.examples == 4


def test_uniform_weights_and_tau():
  assert {r["weight"] for r in _convert(ALL, weighting="uniform").records} == {1.0}
  tau_weights = [r["weight"] for r in _convert([EP_A], tau=0.1).records]
  assert tau_weights == pytest.approx([1.0, math.exp(10.0)])
  assert collect.weight_table([-1, 0, 1], "exp", 0.4) == pytest.approx({"-1.0": WM1, "0.0": 1.0, "1.0": W1})


def test_single_turn_control_strips_history_keeps_selection_and_weights():
  multi = _convert(ALL)
  single = _convert(ALL, single_turn=True)
  assert len(single.records) == len(multi.records)
  for m, s in zip(multi.records, single.records):
    assert s["id"] == m["id"] + "#single"
    assert s["weight"] == m["weight"]
    assert s["messages"] == m["messages"][:3] + [m["messages"][-1]]
    assert s["meta"]["single_turn"] is True


def test_reference_stops_at_first_success():
  # A (malformed for collection, but possible in an evaluation log) action after a success is never trained.
  ep = _record("p/G", _turn(1, "1", 1.0, "F1"), _turn(2, "2", 0.0, None))
  assert [r["id"] for r in _convert([ep]).records] == ["p/G#iter1#t1"]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("turns"), "record 0: field 'turns'"),
    (lambda r: r["turns"][0].update(chosen=5), "turns[0]: field 'chosen'"),
    (lambda r: r["turns"][0].update(feedback=None), "turns[0]: field 'feedback' is required"),
    (lambda r: r["turns"][1]["candidates"][0].update(reward=None), "turns[1]: candidates[0].reward"),
])
def test_bad_records_fail_naming_record_and_field(mutate, message):
  ep = _record("p/D", _turn(1, "4", 0.0, "F1"), _turn(2, "2", 0.0, None))
  mutate(ep)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    _convert([ep])


def test_duplicate_problem_in_one_log_fails():
  with pytest.raises(ValueError, match="duplicate problem_id"):
    _convert([EP_C, EP_C])


def test_reward_range():
  assert collect.reward_range("gsm8k", "paper") == (-1.0, 0.0, 1.0)
  assert collect.reward_range("gsm8k", "robust") == (0.0, 1.0)


def test_write_dataset_round_trip_and_summary(tmp_path):
  from rise_jax.rise import dataset
  options = ConversionOptions(criteria="better")
  conv = convert_rollouts(ALL, _init, options)
  summary = dataset.write_dataset(conv, tmp_path, options=options, reward_values=(-1.0, 0.0, 1.0))
  lines = (tmp_path / "data" / "sft.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == conv.records
  manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
  assert manifest["schema"] == "rise_jax.sft/1" and manifest["num_records"] == 7 == summary["num_records"]
  assert summary["weight_table"] == pytest.approx({"-1.0": WM1, "0.0": 1.0, "1.0": W1})
  assert summary["sum_weights"] == pytest.approx(3 * W1 + WM1 + 3 * 1.0)
  md = (tmp_path / "summary.md").read_text()
  assert "| better (used) | 7 |" in md and "| -1.0 | 0.08208 | 1 |" in md
  assert (tmp_path / "weights_hist.png").stat().st_size > 1000
  assert not list(tmp_path.rglob(".*tmp*"))


def test_written_dataset_reads_back_through_the_trainer_and_errors_name_file_and_line(tmp_path):
  from rise_jax.rise import dataset
  from rise_jax.train import data as train_data
  conv = convert_rollouts(ALL, _init, ConversionOptions(criteria="better"))
  dataset.write_dataset(conv, tmp_path, options=ConversionOptions(criteria="better"), reward_values=(-1.0, 0.0, 1.0))
  read = train_data.read_records(tmp_path / "data" / dataset.DATA_FILE)
  assert [(r.id, r.weight) for r in read] == [(r["id"], r["weight"]) for r in conv.records]
  path = tmp_path / "sft.jsonl"
  path.write_text('{"id": "a", "weight": 1.0, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                  '{"id": "b", "messages": []}\n')
  with pytest.raises(ValueError, match=r"sft.jsonl:2: field 'weight': missing"):
    train_data.read_records(path)


def test_collection_protocol_is_algorithm_1():
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.collect.turns, c.collect.samples_per_turn, c.collect.improvement_samples = 3, 2, 16
  p = collect.collection_protocol(c)
  assert (p.kind, p.turns, p.samples_per_turn, p.select, p.oracle, p.window) == (
      "sequential", 3, (2, 2, 16), "best_reward", True, None)
  c.collect.improvement = "teacher"
  c.collect.teacher.temperature, c.collect.teacher.max_tokens = 0.7, 300
  p = collect.collection_protocol(c)
  assert [(s.temperature, s.max_new_tokens) for s in p.sampling] == [(1.0, 20), (1.0, 20), (0.7, 300)]


def test_evaluation_protocols_are_algorithm_2_with_one_seed_rule():
  """Draw d samples with seed + 1 + 2d and the parallel run with seed + 2 (what rise_jax.run always drew at
  draws = 1), whichever command evaluates; Self-Refine is draw 0 under its own prompt set."""
  from rise_jax.pipeline import recipes
  c = recipes.toy()
  c.seed, c.eval.turns, c.eval.parallel_k, c.eval.draws, c.eval.self_refine, c.eval.window = 7, 4, 3, 3, True, 2
  runs = collect.evaluation_protocols(c)
  assert list(runs) == ["sequential", "sequential_draw1", "sequential_draw2", "parallel", "self_refine"]
  assert {name: p.seed for name, p in runs.items()} == {
      "sequential": 8, "sequential_draw1": 10, "sequential_draw2": 12, "parallel": 9, "self_refine": 8}
  seq, par, refine = runs["sequential"], runs["parallel"], runs["self_refine"]
  assert (seq.kind, seq.turns, seq.samples_per_turn, seq.select, seq.oracle, seq.window) == (
      "sequential", 4, (1, 1, 1, 1), "first", False, 2)
  assert (par.kind, par.turns, par.samples_per_turn) == ("parallel", 1, (3,))
  assert (refine.prompt_set, seq.prompt_set) == ("self_refine", c.task.prompt_set)
  c.eval.draws, c.eval.self_refine = 1, False
  assert list(collect.evaluation_protocols(c)) == ["sequential", "parallel"]
