"""RISE metrics: hand-computed values on hand-built logs, and a second, independent implementation of the paper's
definitions (rise.md "Inference and metrics") on random logs."""

import fractions
import itertools
import math
import random

import numpy as np
import pytest

from rise_jax.rise import metrics
from rise_jax.rise.metrics import compute_metrics

import rollout_builders as rb

pytestmark = pytest.mark.timeout(60)
B = 300  # bootstrap resamples where the intervals are not under test


# ------------------------------------------------------------------------------------- hand-computed values


def _hand_logs():
  # a: wrong, right, right        b: all wrong, answer repeats      c: unparsable (paper -1), right, wrong
  seq = [rb.sequential("a", [("1", 0), ("2", 1), ("2", 1)]),
         rb.sequential("b", [("3", 0), ("4", 0), ("3", 0)]),
         rb.sequential("c", [(None, -1), ("5", 1), ("6", 0)])]
  par = [rb.parallel("a", [("2", 1), ("1", 0), ("1", 0)]),
         rb.parallel("b", [("9", 0), ("8", 0), (None, -1)]),
         rb.parallel("c", [("5", 1), rb.candidate("5", 1, teacher=True), ("7", 0)])]
  return seq, par


def test_hand_computed_table():
  m = compute_metrics(*_hand_logs(), num_bootstrap=B)
  third = 1 / 3
  expected = {
      "m1@t1": 0, "p1@t1": 0,
      "m1@t2": third,          # a: tie 1|2 -> earliest 1 (wrong); b: tie -> 3 (wrong); c: 5 (right)
      "p1@t2": 2 * third,
      "m1@t3": 2 * third,      # a: 2 twice (right); b: 3 twice (wrong); c: tie 5|6 -> 5 (right)
      "p1@t3": 2 * third,
      "m2@t1": 2 * third,      # first two samples: a tie 2|1 -> 2 (right); b tie (wrong); c 5,5 (right)
      "p2@t1": (2 * third + 0 + 1) / 3,  # unbiased pass@2 from n = 3: a 1 - C(2,2)/C(3,2); c n - c < k
      "m3@t1": third,          # a: 1 twice (wrong); b tie 9|8 (wrong); c 5 twice (right)
      "p3@t1": 2 * third,
      "fresh_first_turn_accuracy": (third + 0 + 2 * third) / 3,
  }
  for name, value in expected.items():
    assert m[name] == pytest.approx(value), name
  assert m["per_turn_accuracy"] == pytest.approx([0, 2 * third, third])
  assert m["transitions"] == [{"c->c": 0, "c->i": 0, "i->c": 2, "i->i": 1},
                              {"c->c": 1, "c->i": 1, "i->c": 0, "i->i": 1}]
  # t1->t2: a 1->2, b 3->4 (c's turn 1 is unparsable, not counted); t2->t3: a 2->2 repeats of a, b, c.
  assert m["repeat_rate"] == pytest.approx([0, third])
  assert m["acc_given_wrong"] == pytest.approx([2 * third, 0])
  assert m["acc_given_right"][0] is None and m["acc_given_right"][1] == pytest.approx(0.5)
  assert m["fresh_acc_given_wrong"] == pytest.approx([third, 0])  # beside it: the parallel run, same problems
  assert m["unsolved_by_pass@B"]["B"] == 3 and m["unsolved_by_pass@B"]["num_unsolved"] == 1  # only b
  assert m["unsolved_by_pass@B"]["solved_by_turn"] == [0, 0, 0]
  assert m["tie_fraction"]["m2@t1"] == pytest.approx(2 * third)
  assert m["tie_fraction"]["m1@t2"] == pytest.approx(2 * third)
  assert m["all_unparsable_fraction"]["m1@t1"] == pytest.approx(third)  # c's first turn: no vote, incorrect
  assert m["per_turn_unparsable_rate"] == pytest.approx([third, 0, 0])
  assert m["num_problems"] == 3 and m["turns"] == 3 and m["parallel_k"] == 3
  # The teacher candidate (no token ids, num_tokens 3) still counts; history 100 / 150 / 200 per turn.
  assert m["compute"]["sequential"]["prefill_tokens"] == 3 * (100 + 150 + 200)
  assert m["compute"]["parallel"] == {**m["compute"]["parallel"], "prefill_tokens": 300, "decode_tokens": 27,
                                      "samples": 9}


def _score_logs():
  # Turn correctness per problem; chosen so that every metric differs between the two pairs and i->c != c->i.
  table = {"a": [0, 1, 1], "b": [1, 0, 1], "c": [0, 1, 0], "d": [0, 1, 1], "e": [1, 1, 0], "f": [0, 0, 0]}
  seq = [rb.sequential(pid, [(f"{pid}{t}", float(r)) for t, r in enumerate(rs)]) for pid, rs in table.items()]
  return table, seq


def test_score_metrics_by_hand():
  table, seq = _score_logs()
  m = compute_metrics(seq, num_bootstrap=B)
  score = m["score"]
  assert score["available"] and score["pairs"] == ["t1->t2", "t2->t3"] and score["num_episodes"] == [6, 6]
  # Counted by hand from `table`: pair 1 right at t1 b, e; at t2 a, c, d, e; i->c a, c, d; c->i b.
  # Pair 2 right at t2 a, c, d, e; at t3 a, b, d; i->c b; c->i c, e.
  expected = {"acc_t1": [2 / 6, 4 / 6], "acc_t2": [4 / 6, 3 / 6], "delta_t1_t2": [2 / 6, -1 / 6],
              "delta_i_to_c": [3 / 6, 1 / 6], "delta_c_to_i": [1 / 6, 2 / 6]}
  for name, values in expected.items():
    assert score[name] == pytest.approx(values), name
  # The same from the definitions in plain numpy.
  r = np.array(list(table.values()), dtype=bool)
  for t in range(2):
    assert score["delta_i_to_c"][t] == pytest.approx(np.mean(~r[:, t] & r[:, t + 1]))
    assert score["delta_c_to_i"][t] == pytest.approx(np.mean(r[:, t] & ~r[:, t + 1]))
    assert score["acc_t2"][t] - score["acc_t1"][t] == pytest.approx(score["delta_t1_t2"][t])
  assert score["acc_t1"] == pytest.approx(m["per_turn_accuracy"][:2])
  assert m["sources"]["score"] == m["sources"]["per_turn_accuracy"]


def test_score_metrics_pool_the_draws_of_a_problem():
  # Two draws of p (i->c, then c->c) and one of q twice over (c->i, i->i): four episodes.
  seq = [rb.sequential("p", [("1", 0), ("2", 1)], seed=0), rb.sequential("p", [("2", 1), ("2", 1)], seed=1),
         rb.sequential("q", [("3", 1), ("4", 0)], seed=0), rb.sequential("q", [("4", 0), ("4", 0)], seed=1)]
  score = compute_metrics(seq, num_bootstrap=B)["score"]
  assert score["num_episodes"] == [4]
  assert score["delta_i_to_c"] == [0.25] and score["delta_c_to_i"] == [0.25] and score["delta_t1_t2"] == [0.0]
  assert score["acc_t1"] == [0.5] and score["acc_t2"] == [0.5]


def test_score_intervals_come_from_the_one_resampling_matrix():
  table, seq = _score_logs()
  m = compute_metrics(seq, num_bootstrap=B, seed=3)
  score = m["score"]
  # acc_t1 / acc_t2 are per-turn accuracies: the same intervals, not a second resampling.
  assert score["ci95"]["acc_t1"] == m["ci95"]["per_turn_accuracy"][:2]
  assert score["ci95"]["acc_t2"] == m["ci95"]["per_turn_accuracy"][1:]
  # The flip-rate intervals by a plain loop over the rows of the sequential source's resampling counts.
  weights = metrics.bootstrap_counts(len(table), B, (3, 1))
  r = np.array([table[pid] for pid in sorted(table)], dtype=float)
  for t in range(2):
    flips = {"delta_i_to_c": (1 - r[:, t]) * r[:, t + 1], "delta_c_to_i": r[:, t] * (1 - r[:, t + 1]),
             "delta_t1_t2": r[:, t + 1] - r[:, t]}
    for name, per_problem in flips.items():
      replicates = [float(w @ per_problem / w.sum()) for w in weights]
      assert score["ci95"][name][t] == pytest.approx(list(np.percentile(replicates, [2.5, 97.5]))), (name, t)


def test_score_metrics_are_not_computed_from_an_oracle_log():
  seq = [rb.sequential("a", [("1", 0), ("2", 1)], oracle=True), rb.sequential("b", [("1", 0), ("3", 0)], oracle=True)]
  m = compute_metrics(seq, num_bootstrap=B)
  assert m["score"]["available"] is False and "oracle" in m["score"]["reason"]
  assert not any(name.startswith("delta") for name in m["per_problem"]["sequential"]["metrics"])
  assert m["transitions"] == [{"c->c": 0, "c->i": 0, "i->c": 1, "i->i": 1}]  # still reported, as before
  only_parallel = compute_metrics(parallel_records=[rb.parallel("a", [("1", 1)])], num_bootstrap=B)
  assert only_parallel["score"] == {"available": False, "reason": "no sequential run"}
  one_turn = compute_metrics([rb.sequential("a", [("1", 1)])], num_bootstrap=B)
  assert one_turn["score"]["available"] is False


def test_score_per_problem_values_for_paired_differences():
  table, seq = _score_logs()
  m = compute_metrics(seq, num_bootstrap=B)
  names = metrics.score_table_names(2)
  assert metrics.per_problem_values(m, names["delta_c_to_i"]) == {
      pid: (float(rs[1] == 1 and rs[2] == 0), 1.0) for pid, rs in table.items()}
  assert metrics.per_problem_values(m, names["acc_t1"]) == {pid: (float(rs[1]), 1.0) for pid, rs in table.items()}


def test_contract_keys_and_sources():
  seq, par = _hand_logs()
  m = compute_metrics(seq, par, num_bootstrap=B, sources={"sequential": "seq.jsonl", "parallel": "par.jsonl"})
  for key in ("m1@t1", "m3@t1", "m1@t3", "p1@t3", "p3@t1", "per_turn_accuracy", "transitions", "ci95",
              "num_problems", "tie_break", "sources"):
    assert key in m
  assert m["sources"]["m1@t1"] == m["sources"]["p1@t3"] == m["sources"]["m1@t2"] == "seq.jsonl"
  assert m["sources"]["m3@t1"] == m["sources"]["p2@t1"] == "par.jsonl"
  for name in ("m1@t1", "m1@t3", "p1@t3", "m3@t1", "p3@t1"):
    low, high = m["ci95"][name]
    assert 0 <= low <= m[name] <= high <= 1
  assert "p1@t1" in m and m["p1@t1"] == m["m1@t1"]


@pytest.mark.parametrize("tie_break, expected", [("earliest", 0.0), ("latest", 1.0)])
def test_tie_break_rules(tie_break, expected):
  # Turns: 7 (wrong), 8 (right): one vote each. Earliest keeps 7, latest takes 8.
  seq = [rb.sequential("p", [("7", 0), ("8", 1)])]
  assert compute_metrics(seq, tie_break=tie_break, num_bootstrap=B)["m1@t2"] == expected


def test_latest_is_the_cluster_with_the_most_recent_vote():
  # 1, 2, 1, 2: both have two votes; 2 voted last. Representatives: first "1" (wrong), first "2" (right).
  labels = [0, 1, 0, 1]
  correct = [False, True, False, True]
  assert metrics.majority_vote(labels, correct, "latest").correct
  assert not metrics.majority_vote(labels, correct, "earliest").correct
  assert not metrics.majority_vote([0, 1, 1, 0], correct, "latest").correct


def test_random_tie_break_is_seeded_and_fair():
  seq = [rb.sequential(f"p{i}", [("7", 0), ("8", 1)]) for i in range(400)]
  a = compute_metrics(seq, tie_break="random", seed=1, num_bootstrap=B)
  b = compute_metrics(seq, tie_break="random", seed=1, num_bootstrap=B)
  c = compute_metrics(seq, tie_break="random", seed=2, num_bootstrap=B)
  assert a["m1@t2"] == b["m1@t2"]
  assert a["per_problem"] != c["per_problem"]
  assert abs(a["m1@t2"] - 0.5) < 0.1  # 400 fair coins: 5 standard deviations
  assert a["tie_fraction"]["m1@t2"] == 1.0


def test_unparsable_answers_do_not_vote():
  # None twice, then one right answer: the right answer wins alone; all-unparsable is wrong.
  seq = [rb.sequential("p", [(None, -1), (None, -1), ("4", 1)]), rb.sequential("q", [(None, 0)] * 3)]
  m = compute_metrics(seq, num_bootstrap=B)
  assert m["m1@t3"] == 0.5 and m["m1@t2"] == 0.0
  assert m["all_unparsable_fraction"]["m1@t2"] == 1.0 and m["all_unparsable_fraction"]["m1@t3"] == 0.5


def test_all_wrong_rows():
  seq = [rb.sequential(f"p{i}", [(str(i), 0), (str(i + 1), 0)]) for i in range(4)]
  par = [rb.parallel(f"p{i}", [("x", 0), ("y", 0)]) for i in range(4)]
  m = compute_metrics(seq, par, num_bootstrap=B)
  assert all(m[k] == 0 for k in ("m1@t1", "m1@t2", "p1@t2", "m2@t1", "p2@t1"))
  assert m["ci95"]["p1@t2"] == [0.0, 0.0]
  assert m["acc_given_right"] == [None] and m["ci95"]["acc_given_right"] == [None]
  assert m["unsolved_by_pass@B"]["num_unsolved"] == 4 and m["unsolved_by_pass@B"]["solved_by_turn"] == [0, 0]


def test_oracle_log_that_stopped_early():
  # Oracle episodes: a solved at turn 1, b at turn 3, c never (3 turns).
  seq = [rb.sequential("a", [("1", 1)], oracle=True),
         rb.sequential("b", [("2", 0), ("3", 0), ("4", 1)], oracle=True),
         rb.sequential("c", [("5", 0), ("5", 0), ("6", 0)], oracle=True)]
  m = compute_metrics(seq, turns=3, num_bootstrap=B)
  assert m["p1@t1"] == pytest.approx(1 / 3)
  assert m["p1@t2"] == pytest.approx(1 / 3)
  assert m["p1@t3"] == pytest.approx(2 / 3)  # any correct turn, whatever happened after
  # m1@tk over the turns that exist: a's single right answer; b's tie 2|3|4 -> earliest 2 (wrong); c wrong.
  assert m["m1@t3"] == pytest.approx(1 / 3)
  assert m["per_turn_count"] == [3, 2, 2]
  assert m["per_turn_accuracy"] == pytest.approx([1 / 3, 0, 0.5])
  assert m["transitions"] == [{"c->c": 0, "c->i": 0, "i->c": 0, "i->i": 2},
                              {"c->c": 0, "c->i": 0, "i->c": 1, "i->i": 1}]
  assert m["notes"] and "oracle" in m["notes"][0]


def test_turn_budget_is_read_from_the_protocol():
  seq = [rb.sequential("a", [("1", 1)], oracle=True, turns=4)]
  assert compute_metrics(seq, num_bootstrap=B)["turns"] == 4


def test_no_oracle_episode_with_missing_turns_is_an_error():
  seq = [rb.sequential("a", [("1", 0), ("2", 0)]), rb.sequential("b", [("1", 0)])]
  with pytest.raises(ValueError, match="record b .* has 1 turns; a no-oracle episode runs all 2"):
    compute_metrics(seq, num_bootstrap=B)


def test_sources_must_match_protocols():
  seq, par = _hand_logs()
  with pytest.raises(ValueError, match="protocol.kind is 'parallel', expected 'sequential'"):
    compute_metrics(par, num_bootstrap=B)
  mixed = [rb.sequential("a", [("1", 0)]), rb.sequential("b", [("1", 0)], grader="paper")]
  with pytest.raises(ValueError, match="mix graders"):
    compute_metrics(mixed, num_bootstrap=B)


def test_m1_at_t1_is_the_mean_over_draws():
  seq = [rb.sequential("a", [("1", 1)], seed=0), rb.sequential("a", [("2", 0)], seed=1),
         rb.sequential("b", [("1", 1)], seed=0), rb.sequential("b", [("1", 1)], seed=1)]
  m = compute_metrics(seq, num_bootstrap=B)
  assert m["m1@t1"] == 0.75
  assert m["m1@t1_per_draw"] == {"0": 1.0, "1": 0.5}
  assert m["num_draws"] == {"2": 2} and m["num_problems"] == 2


def test_more_samples_than_k_use_unbiased_estimators():
  # 6 samples, 2 right. pass@2 = 1 - C(4,2)/C(6,2) = 1 - 6/15; m2@t1 over the chunks (1,2) (2,3) (1,4).
  par = [rb.parallel("p", [("1", 1), ("2", 0), ("2", 0), ("3", 0), ("1", 1), ("4", 0)])]
  m = compute_metrics(parallel_records=par, num_bootstrap=B)
  assert m["p2@t1"] == pytest.approx(1 - 6 / 15)
  assert m["m2@t1"] == pytest.approx(2 / 3)  # earliest wins each tie: 1 (right), 2 (wrong), 1 (right)
  assert m["m3@t1"] == 0.0  # chunks (1,2,2) -> 2 (wrong); (3,1,4) -> three-way tie, earliest 3 (wrong)
  assert m["tie_fraction"]["m3@t1"] == 0.5 and m["tie_fraction"]["m2@t1"] == 1.0  # every pair differs
  assert m["p6@t1"] == 1.0 and m["parallel_k"] == 6
  # No sequential run: m1@t1 comes from the samples.
  assert m["m1@t1"] == pytest.approx(1 / 3) and m["p1@t1"] == pytest.approx(1 / 3)
  assert m["sources"]["m1@t1"] == "<records>" and "per_turn_accuracy" not in m


def test_equivalent_answers_form_one_cluster():
  task = FractionTask()
  # 1/2, 0.5 and 2/4 are one answer (right); 3 and 3.0 another. 3 votes beat 2.
  seq = [rb.sequential("p", [("3", 0), ("1/2", 1), ("3.0", 0), ("0.5", 1), ("2/4", 1)])]
  assert compute_metrics(seq, task=task, num_bootstrap=B)["m1@t5"] == 1.0
  assert compute_metrics(seq, task=None, num_bootstrap=B)["m1@t5"] == 0.0  # string equality: 3 wins the tie
  m = compute_metrics(seq, task=task, num_bootstrap=B)
  assert m["repeat_rate"] == [0.0, 0.0, 0.0, 1.0]  # 0.5 -> 2/4 repeats under the task's equivalence


def test_regrading_under_another_mode_uses_the_task():
  task = FractionTask()
  seq = [rb.sequential("p", [("wrong", 0)])]
  seq[0]["turns"][0]["candidates"][0]["text"] = "so \\boxed{0.25}"
  seq[0]["reference"] = "1/4"
  assert compute_metrics(seq, num_bootstrap=B)["m1@t1"] == 0.0
  m = compute_metrics(seq, task=task, grader="paper", num_bootstrap=B)  # logged under "robust"
  assert m["m1@t1"] == 1.0 and m["regraded"] and m["grader"] == "paper"
  with pytest.raises(ValueError, match="needs a task"):
    compute_metrics(seq, grader="paper", num_bootstrap=B)


def test_inconsistent_clusters_are_counted():
  # A non-transitive-looking checker: "a" and "b" equivalent but graded differently.
  class Loose(FractionTask):
    def answers_equivalent(self, a, b, mode):
      return True
  seq = [rb.sequential("p", [("a", 0), ("b", 1)])]
  m = compute_metrics(seq, task=Loose(), num_bootstrap=B)
  assert m["vote_inconsistent_clusters"] == 1
  assert m["m1@t2"] == 0.0  # the representative ("a") is what was voted, and it is wrong


def test_teacher_tokens_unknown_are_counted():
  seq = [rb.sequential("p", [("1", 0), ("2", 1)])]
  seq[0]["turns"][1]["candidates"][0].update(token_ids=None, num_tokens=None, logprob_sum=None)
  seq[0]["turns"][1]["prefill_tokens"] = 20
  m = compute_metrics(seq, num_bootstrap=B)
  assert m["compute"]["sequential"]["candidates_with_unknown_tokens"] == 1
  assert m["compute"]["sequential"]["prefill_tokens"] == 100 + 20
  assert m["compute"]["sequential"]["decode_tokens_per_turn"] == [3, 0]


class FractionTask:
  """A stand-in task: answers are numbers, equivalent when equal as fractions (the API of `rise_jax.tasks.Task`)."""
  name = "fractions"

  @staticmethod
  def _value(a):
    try:
      return fractions.Fraction(a)
    except (ValueError, ZeroDivisionError):
      return None

  def extract_answer(self, response, mode):
    start = response.rfind("\\boxed{")
    return None if start < 0 else response[start + 7:response.index("}", start)]

  def answers_equivalent(self, a, b, mode):
    va, vb = self._value(a), self._value(b)
    return va is not None and va == vb

  def grade(self, response, reference, mode):
    answer = self.extract_answer(response, mode)
    return 1.0 if answer is not None and self.answers_equivalent(answer, reference, mode) else 0.0


# --------------------------------------------------------------------- an independent reference implementation


def ref_vote(answers, rewards, tie_break):
  """Plurality over parsable answers; the winner's first occurrence is the graded answer."""
  votes = [a for a in answers if a is not None]
  if not votes:
    return 0.0
  counts = {a: votes.count(a) for a in votes}
  best = max(counts.values())
  tied = [a for a in counts if counts[a] == best]
  if tie_break == "earliest":
    winner = min(tied, key=answers.index)
  else:
    winner = max(tied, key=lambda a: len(answers) - 1 - answers[::-1].index(a))
  return float(rewards[answers.index(winner)] == 1)


def ref_metrics(seq_draws, par_samples, turns, n, tie_break):
  """The paper's definitions, problem by problem. seq_draws[p]: the problem's episodes (independent draws, each a
  list of (answer, reward) turns); par_samples[p]: its n first-turn samples. A problem's value is the mean over
  its draws; per-turn, transition and conditional rates pool every episode."""
  out = {}
  problems = sorted(seq_draws)
  mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
  right = lambda r: r == 1  # noqa: E731
  for k in range(1, turns + 1):
    out[f"m1@t{k}"] = mean([mean([ref_vote([a for a, _ in e[:k]], [r for _, r in e[:k]], tie_break)
                                  for e in seq_draws[p]]) for p in problems])
    out[f"p1@t{k}"] = mean([mean([any(right(r) for _, r in e[:k]) for e in seq_draws[p]]) for p in problems])
  for k in range(2, n + 1):
    # pk@t1 by brute force over all k-subsets; mk@t1 over disjoint chunks, as the estimator is defined.
    out[f"p{k}@t1"] = mean([mean([any(right(r) for _, r in sub) for sub in itertools.combinations(par_samples[p], k)])
                            for p in problems])
    out[f"m{k}@t1"] = mean([mean([ref_vote([a for a, _ in par_samples[p][j:j + k]],
                                           [r for _, r in par_samples[p][j:j + k]], tie_break)
                                  for j in range(0, n - k + 1, k)]) for p in problems])
  episodes = [(p, e) for p in problems for e in seq_draws[p]]
  for t in range(turns):
    out[f"acc{t + 1}"] = mean([right(e[t][1]) for _, e in episodes if len(e) > t])
  trans, cond_w, cond_r, fresh, rep = [], [], [], [], []
  for t in range(turns - 1):
    pairs = [(e[t], e[t + 1], p) for p, e in episodes if len(e) > t + 1]
    c = {"c->c": 0, "c->i": 0, "i->c": 0, "i->i": 0}
    for (_, r0), (_, r1), _ in pairs:
      c[("c" if right(r0) else "i") + "->" + ("c" if right(r1) else "i")] += 1
    trans.append(c)
    wrong = [(x, y, p) for x, y, p in pairs if not right(x[1])]
    cond_w.append(mean([right(y[1]) for _, y, _ in wrong]))
    cond_r.append(mean([right(y[1]) for x, y, _ in pairs if right(x[1])]))
    fresh.append(mean([mean([right(r) for _, r in par_samples[p]]) for _, _, p in wrong]))
    rep.append(mean([x[0] == y[0] for x, y, _ in pairs if x[0] is not None]))
  out.update(transitions=trans, acc_given_wrong=cond_w, acc_given_right=cond_r, fresh=fresh, repeat=rep)
  # SCoRe's metrics: fractions of the episodes, pair (t, t+1) compares e[t-1] with e[t].
  score = {name: [] for name in metrics.SCORE_METRICS}
  for t in range(turns - 1):
    both = [(right(e[t][1]), right(e[t + 1][1])) for _, e in episodes if len(e) > t + 1]
    score["acc_t1"].append(mean([x for x, _ in both]))
    score["acc_t2"].append(mean([y for _, y in both]))
    score["delta_t1_t2"].append(mean([y - x for x, y in both]))
    score["delta_i_to_c"].append(mean([not x and y for x, y in both]))
    score["delta_c_to_i"].append(mean([x and not y for x, y in both]))
  out["score"] = score
  unsolved = [p for p in problems if not any(right(r) for _, r in par_samples[p])]
  out["unsolved"] = [mean([mean([any(right(r) for _, r in e[:k]) for e in seq_draws[p]]) for p in unsolved])
                     for k in range(1, turns + 1)]
  return out


def _random_logs(rng: random.Random, num_problems: int, turns: int, n: int, oracle: bool, draws: int = 1):
  seq_draws, par_samples, seq, par = {}, {}, [], []
  for i in range(num_problems):
    pid = f"toy/test/{i}"
    gold = rng.choice("123")
    draw = lambda: rng.choice(["1", "2", "3", "4", None])  # noqa: E731
    seq_draws[pid] = []
    for d in range(draws):
      answers = []
      for _ in range(turns):
        a = draw()
        answers.append((a, 1.0 if a == gold else (-1.0 if a is None else 0.0)))
        if oracle and a == gold:
          break
      seq_draws[pid].append(answers)
      seq.append(rb.sequential(pid, answers, oracle=oracle, turns=turns, seed=d))
    par_samples[pid] = [(a, 1.0 if a == gold else 0.0) for a in (draw() for _ in range(n))]
    # The parallel samples arrive as records of up to 3 candidates (several parallel draws of one problem).
    for j in range(0, n, 3):
      par.append(rb.parallel(pid, par_samples[pid][j:j + 3], seed=j))
  return seq_draws, par_samples, seq, par


def _close(a, b):
  if a is None or b is None:
    return a is None and b is None
  return math.isclose(a, b, abs_tol=1e-9)


@pytest.mark.parametrize("seed, oracle, tie_break, draws, n", [
    (0, False, "earliest", 1, 5), (1, False, "latest", 1, 5), (2, True, "earliest", 1, 5), (3, True, "latest", 1, 5),
    (4, False, "earliest", 3, 7), (5, True, "latest", 2, 7)])
def test_against_reference_implementation(seed, oracle, tie_break, draws, n):
  turns = 4
  seq_draws, par_samples, seq, par = _random_logs(random.Random(seed), 50, turns, n, oracle, draws)
  ref = ref_metrics(seq_draws, par_samples, turns, n, tie_break)
  m = compute_metrics(seq, par, tie_break=tie_break, num_bootstrap=B)
  for name in [f"m1@t{i}" for i in range(1, turns + 1)] + [f"p1@t{i}" for i in range(1, turns + 1)] + \
              [f"m{i}@t1" for i in range(2, n + 1)] + [f"p{i}@t1" for i in range(2, n + 1)]:
    assert _close(m[name], ref[name]), (name, m[name], ref[name])
  assert all(_close(m["per_turn_accuracy"][t], ref[f"acc{t + 1}"]) for t in range(turns))
  assert m["transitions"] == ref["transitions"]
  for mine, theirs in (("acc_given_wrong", "acc_given_wrong"), ("acc_given_right", "acc_given_right"),
                       ("fresh_acc_given_wrong", "fresh"), ("repeat_rate", "repeat")):
    assert all(_close(x, y) for x, y in zip(m[mine], ref[theirs], strict=True)), mine
  assert all(_close(x, y) for x, y in zip(m["unsolved_by_pass@B"]["solved_by_turn"], ref["unsolved"]))
  if oracle:
    assert m["score"]["available"] is False and "oracle" in m["score"]["reason"]
  else:
    assert m["score"]["pairs"] == [f"t{t}->t{t + 1}" for t in range(1, turns)]
    for name in metrics.SCORE_METRICS:
      assert all(_close(x, y) for x, y in zip(m["score"][name], ref["score"][name], strict=True)), name


# ---------------------------------------------------------------------------------------------- uncertainty


def test_pass_at_k_matches_enumeration():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        brute = np.mean([any(i < c for i in sub) for sub in itertools.combinations(range(n), k)])
        assert metrics.pass_at_k(n, c, k) == pytest.approx(brute)


def test_bootstrap_interval_matches_a_plain_loop():
  rng = np.random.default_rng(0)
  values = (rng.random(200) < 0.3).astype(float)
  table = metrics.Table([str(i) for i in range(200)])
  table.add("acc", values)
  low, high = metrics.confidence_intervals(table, metrics.bootstrap_counts(200, 4000, 1))["acc"]
  loop = [values[rng.integers(0, 200, 200)].mean() for _ in range(4000)]
  ref_low, ref_high = np.percentile(loop, [2.5, 97.5])
  assert abs(low - ref_low) < 0.015 and abs(high - ref_high) < 0.015
  se = math.sqrt(values.mean() * (1 - values.mean()) / 200)  # and the normal approximation
  assert abs((high - low) - 2 * 1.96 * se) < 0.02


def test_ratio_metric_interval_resamples_problems_not_episodes():
  # Conditional accuracy num/den per problem: resampling problems keeps a problem's counts together.
  table = metrics.Table(["a", "b"])
  table.add("cond", [3, 0], [3, 1])
  weights = np.array([[2, 0], [0, 2], [1, 1]], dtype=float)
  samples = metrics._ratio_samples(weights, table.num["cond"], table.den["cond"])
  assert samples.tolist() == [1.0, 0.0, 0.75]


def test_paired_difference():
  rng = np.random.default_rng(0)
  base = rng.random(300) < 0.5
  better = base | (rng.random(300) < 0.2)  # strictly more right, strongly correlated
  a = {str(i): float(v) for i, v in enumerate(better)}
  b = {str(i): float(v) for i, v in enumerate(base)}
  out = metrics.paired_difference(a, b, num_bootstrap=2000, seed=0)
  assert out["diff"] == pytest.approx(better.mean() - base.mean())
  assert out["num_problems"] == 300 and out["ci95"][0] > 0 and out["p_value"] < 0.01
  # Unpaired intervals overlap, the paired one excludes 0: the pairing is what the function adds.
  unpaired = np.sqrt(better.var() / 300 + base.var() / 300) * 1.96
  assert out["ci95"][1] - out["ci95"][0] < 2 * unpaired
  same = metrics.paired_difference(a, a, num_bootstrap=200)
  assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
  # Only shared problems are compared; (num, den) pairs are ratios.
  partial = metrics.paired_difference({"x": (1, 2), "y": (1, 1)}, {"y": 0.0, "z": 1.0}, num_bootstrap=50)
  assert partial["num_problems"] == 1 and partial["diff"] == 1.0


def test_iteration_vs_iteration_from_metrics_dicts():
  seq1 = [rb.sequential(f"p{i}", [("1", 0), ("2", float(i % 2))]) for i in range(20)]
  seq2 = [rb.sequential(f"p{i}", [("1", 0), ("2", 1.0)]) for i in range(20)]
  m1, m2 = compute_metrics(seq1, num_bootstrap=B), compute_metrics(seq2, num_bootstrap=B)
  out = metrics.paired_difference(metrics.per_problem_values(m2, "p1@t2"), metrics.per_problem_values(m1, "p1@t2"),
                                  num_bootstrap=B)
  assert out["diff"] == pytest.approx(0.5) and out["num_problems"] == 20
  cond = metrics.per_problem_values(m1, "acc_t2_given_t1_wrong")
  assert cond["p1"] == (1.0, 1.0) and cond["p0"] == (0.0, 1.0)
  with pytest.raises(KeyError, match="no per-problem values"):
    metrics.per_problem_values(m1, "m9@t1")


def test_paired_sequential_vs_parallel_in_metrics():
  seq, par = _hand_logs()
  m = compute_metrics(seq, par, num_bootstrap=B)
  assert m["paired"]["m1@t3 - m3@t1"]["diff"] == pytest.approx(m["m1@t3"] - m["m3@t1"])
  assert m["paired"]["p1@t2 - p2@t1"]["diff"] == pytest.approx(m["p1@t2"] - m["p2@t1"])


def test_metrics_from_logs_counts_torn_lines(tmp_path):
  seq, par = _hand_logs()
  rb.write_log(tmp_path / "seq.jsonl", seq)
  rb.write_log(tmp_path / "par.jsonl", par)
  with open(tmp_path / "seq.jsonl", "a") as f:
    f.write('{"problem_id": "d", "tu')
  m = metrics.metrics_from_logs(tmp_path / "seq.jsonl", tmp_path / "par.jsonl", num_bootstrap=B)
  assert m["num_torn_lines"] == {str(tmp_path / "seq.jsonl"): 1, str(tmp_path / "par.jsonl"): 0}
  assert m["m1@t3"] == pytest.approx(2 / 3) and m["sources"]["m1@t3"].endswith("seq.jsonl")


def test_metrics_from_logs_with_one_file_per_draw(tmp_path):
  rb.write_log(tmp_path / "d0.jsonl", [rb.sequential("a", [("1", 1)], seed=0), rb.sequential("b", [("1", 0)])])
  rb.write_log(tmp_path / "d1.jsonl", [rb.sequential("a", [("1", 0)], seed=1), rb.sequential("b", [("1", 0)],
                                                                                               seed=1)])
  m = metrics.metrics_from_logs([tmp_path / "d0.jsonl", tmp_path / "d1.jsonl"], None, num_bootstrap=B)
  assert m["m1@t1"] == 0.25 and m["m1@t1_per_draw"] == {"0": 0.5, "1": 0.0}
  assert m["sources"]["m1@t1"] == f"{tmp_path / 'd0.jsonl'} + {tmp_path / 'd1.jsonl'}"


def test_per_problem_tables_keep_the_sequential_m1_at_t1():
  seq, par = _hand_logs()
  m = compute_metrics(seq, par, num_bootstrap=B)
  assert metrics.per_problem_values(m, "m1@t1") == {"a": (0.0, 1.0), "b": (0.0, 1.0), "c": (0.0, 1.0)}
  fresh = metrics.per_problem_values(m, "fresh_first_turn_accuracy")
  assert fresh["c"] == (pytest.approx(2 / 3), 1.0)


def test_with_the_real_math_task_clusters_equivalent_latex():
  from rise_jax.tasks import get_task
  math_task = get_task("math")
  # \frac{1}{2}, 0.5 and \dfrac12 are one answer under robust grading (math-verify), three under paper's
  # string equality; 3 (twice) wins only when they are split.
  answers = [("3", 0), ("\\frac{1}{2}", 1), ("3", 0), ("0.5", 1), ("\\dfrac{1}{2}", 1)]
  seq = [rb.sequential("math/test/0", answers, task="math")]
  assert compute_metrics(seq, task=math_task, num_bootstrap=B)["m1@t5"] == 1.0
  seq[0]["protocol"]["grader"] = "paper"
  assert compute_metrics(seq, task=math_task, num_bootstrap=B)["m1@t5"] == 0.0
