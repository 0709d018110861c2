"""RISE's evaluation metrics, with bootstrap uncertainty, computed from rollout records alone (contracts §3, §7).

Sources (the paper's definitions, rise.md "Inference"):
  sequential run  m1@t1 (turn 1 of the sequential episodes), m1@tk (majority over turns 1..k), p1@tk (any of turns
                  1..k correct), per-turn accuracy, transitions, repeat rate, conditional accuracies, Fig. 5.
                  p1@tk is valid from a no-oracle log: before the first correct turn the feedback is identical.
                  From an oracle log that stopped early, p1@tk counts any correct turn and m1@tk votes over the
                  turns that exist, and per-turn accuracy and transitions are over the episodes that reached them.
                  SCoRe's turn-to-turn metrics (`score`) per pair t -> t+1: acc_t1, acc_t2, delta_t1_t2 =
                  acc_t2 - acc_t1, delta_i_to_c / delta_c_to_i = fraction of episodes wrong at t and right at t+1 /
                  right at t and wrong at t+1, so delta_t1_t2 = delta_i_to_c - delta_c_to_i; only from a no-oracle
                  log (an oracle log stops at the first correct turn: they are reported as not available).
  parallel run    mk@t1 (majority over k first-turn samples), pk@t1 (any of k correct), the fresh first-turn
                  accuracy that the conditional "acc at t+1 given t wrong" is compared with, and Fig. 5's pass@B.
Invariants (p1@tk >= m1@tk >= ..., p1@tk >= m1@t1, pk@t1 >= mk@t1 on the same samples) are checked per problem,
only within one run.

Several records of one problem in a source are independent draws: a problem's value is the mean over its draws,
so m1@t1 is the mean over draws when the log has several. With n > k parallel samples of a problem, pk@t1 is the
unbiased pass@k estimator 1 - C(n-c, k)/C(n, k) and mk@t1 the mean vote over the n // k disjoint consecutive
k-sample chunks (each chunk is an i.i.d. k-sample set, so the mean is unbiased too); both equal the plain
definitions when n == k.

Majority vote: answers (extracted under the grader's normalisation) are clustered greedily in order: an answer
joins the first cluster whose first member (its representative) is equal or `task.answers_equivalent` to it, else
opens a new cluster (pairwise equivalence, as MATH robust mode needs; exact for any transitive equivalence).
Unparsable answers (None) do not vote; a vote with no parsable answer is incorrect. Among clusters with the most
votes, `tie_break` picks: earliest = the cluster that appeared first, latest = the cluster with the most recent
vote, random = a uniform choice seeded by (seed, problem, draw, k). The voted answer is the winning cluster's
representative, and it is correct iff that candidate's logged reward == 1: the representative is the answer
actually graded against the reference. Clusters whose members' rewards disagree (a non-transitive checker) are
counted in `vote_inconsistent_clusters`. MATH robust equivalence calls math-verify, whose deadline an answer pays at
most once (`graders.verify` remembers slow answers), so clustering k pathological answers costs <= k deadlines.

Uncertainty: every metric is a ratio of per-problem sums (num_p / den_p; den_p = 1 for plain means), so one
(B, P) matrix of bootstrap resampling counts over problems gives every 95% percentile interval with two matrix
products, and `paired_difference` resamples the problems two sources share for differences (sequential vs
parallel here; iteration vs iteration from two metrics files' `per_problem` tables).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import random
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rise_jax.config import TIE_BREAKS

TRANSITIONS = ("c->c", "c->i", "i->c", "i->i")
DEFAULT_NUM_BOOTSTRAP = 2000
# SCoRe's (arXiv 2409.12917) turn-to-turn metrics, reported for every consecutive turn pair t -> t+1.
SCORE_METRICS = ("acc_t1", "acc_t2", "delta_t1_t2", "delta_i_to_c", "delta_c_to_i")


def score_table_names(t: int) -> dict[str, str]:
  """The per-problem table metric behind each SCoRe metric of turn pair t -> t+1 (for `per_problem_values`)."""
  return {"acc_t1": f"turn{t}_accuracy", "acc_t2": f"turn{t + 1}_accuracy", "delta_t1_t2": f"delta_t{t}_t{t + 1}",
          "delta_i_to_c": f"delta_i_to_c_t{t}_t{t + 1}", "delta_c_to_i": f"delta_c_to_i_t{t}_t{t + 1}"}


def is_correct(reward: float) -> bool:
  """The project-wide rule: correct means reward == 1 (the paper grader's -1 for unparsable is wrong)."""
  return reward == 1.0


# ------------------------------------------------------------------------------------------------- voting


class AnswerClusters:
  """Greedy clustering of extracted answers under an equivalence, with memoised equivalence calls."""

  def __init__(self, equivalent: Callable[[str, str], bool]):
    self._equivalent = equivalent
    self._cache: dict[tuple[str, str], bool] = {}

  def equivalent(self, a: str, b: str) -> bool:
    if a == b:
      return True
    key = (a, b) if a <= b else (b, a)
    if key not in self._cache:
      self._cache[key] = bool(self._equivalent(a, b))
    return self._cache[key]

  def labels(self, answers: Sequence[str | None]) -> list[int | None]:
    """Cluster id per answer (None for unparsable); ids count up in order of first appearance.

    An answer's label depends only on the answers before it, so the labels of a prefix are the prefix of the labels.
    """
    representatives: list[str] = []
    out: list[int | None] = []
    for a in answers:
      if a is None:
        out.append(None)
        continue
      label = next((i for i, r in enumerate(representatives) if self.equivalent(r, a)), None)
      if label is None:
        label = len(representatives)
        representatives.append(a)
      out.append(label)
    return out


@dataclasses.dataclass(frozen=True)
class Vote:
  correct: bool
  tied: bool            # more than one cluster had the most votes
  all_unparsable: bool


def majority_vote(labels: Sequence[int | None], correct: Sequence[bool], tie_break: str,
                  rng: random.Random | None = None) -> Vote:
  """Plurality vote over clustered answers; the winner's representative (first member) decides correctness."""
  first: dict[int, int] = {}
  last: dict[int, int] = {}
  counts: collections.Counter[int] = collections.Counter()
  for i, label in enumerate(labels):
    if label is None:
      continue
    first.setdefault(label, i)
    last[label] = i
    counts[label] += 1
  if not counts:
    return Vote(correct=False, tied=False, all_unparsable=True)
  top = max(counts.values())
  leaders = sorted(label for label, n in counts.items() if n == top)
  if tie_break == "earliest":
    winner = min(leaders, key=first.__getitem__)
  elif tie_break == "latest":
    winner = max(leaders, key=last.__getitem__)
  elif tie_break == "random":
    if rng is None:
      raise ValueError("tie_break='random' needs an rng")
    winner = leaders[rng.randrange(len(leaders))] if len(leaders) > 1 else leaders[0]
  else:
    raise ValueError(f"tie_break {tie_break!r} is not one of {TIE_BREAKS}")
  return Vote(correct=bool(correct[first[winner]]), tied=len(leaders) > 1, all_unparsable=False)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --------------------------------------------------------------------------------------- per-problem tables


class Table:
  """Per-problem numerators and denominators of every metric of one source; a metric is sum(num) / sum(den)."""

  def __init__(self, problem_ids: Sequence[str]):
    self.problem_ids = list(problem_ids)
    self.index = {pid: i for i, pid in enumerate(self.problem_ids)}
    self.num: dict[str, np.ndarray] = {}
    self.den: dict[str, np.ndarray] = {}

  def add(self, name: str, num: Sequence[float], den: Sequence[float] | None = None):
    self.num[name] = np.asarray(num, dtype=np.float64)
    self.den[name] = np.ones(len(self.problem_ids)) if den is None else np.asarray(den, dtype=np.float64)

  def value(self, name: str) -> float | None:
    den = self.den[name].sum()
    return float(self.num[name].sum() / den) if den > 0 else None

  def to_json(self) -> dict[str, Any]:
    metrics = {}
    for name, num in self.num.items():
      entry = {"num": _round_list(num)}
      if not np.all(self.den[name] == 1):
        entry["den"] = _round_list(self.den[name])
      metrics[name] = entry
    return {"problem_ids": self.problem_ids, "metrics": metrics}


def _round_list(x: np.ndarray) -> list:
  return [int(v) if float(v).is_integer() else round(float(v), 6) for v in x]


@functools.lru_cache(maxsize=8)
def bootstrap_counts(num_problems: int, num_bootstrap: int, seed: int | tuple[int, ...]) -> np.ndarray:
  """(B, P) multiplicities of each problem in B resamples of P problems with replacement (read-only, cached)."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, num_problems, size=(num_bootstrap, num_problems)) if num_problems else np.zeros((0, 0))
  rows = np.arange(num_bootstrap)[:, None] * num_problems
  counts = np.bincount((picks + rows).ravel().astype(np.int64), minlength=num_bootstrap * num_problems)
  counts = counts.reshape(num_bootstrap, num_problems).astype(np.float64)
  counts.flags.writeable = False
  return counts


def _ratio_samples(weights: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """Bootstrap replicates of sum(num) / sum(den); num and den are [P] or [P, metrics] (one matrix product)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return (weights @ num) / (weights @ den)


def _interval(samples: np.ndarray) -> list[float] | None:
  samples = samples[np.isfinite(samples)]
  if samples.size == 0:
    return None
  low, high = np.percentile(samples, [2.5, 97.5])
  return [float(low), float(high)]


def confidence_intervals(table: Table, weights: np.ndarray) -> dict[str, list[float] | None]:
  """95% percentile bootstrap interval of every metric in `table` under shared resampling weights."""
  names = list(table.num)
  if not names:
    return {}
  samples = _ratio_samples(weights, np.stack([table.num[n] for n in names], axis=1),
                           np.stack([table.den[n] for n in names], axis=1))
  return {name: _interval(samples[:, i]) for i, name in enumerate(names)}


def paired_difference(a: Mapping[str, float | Sequence[float]], b: Mapping[str, float | Sequence[float]], *,
                      num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
  """Metric(a) - metric(b) on the problems both have, with a paired bootstrap over those problems.

  a, b: problem id -> per-problem value, or (num, den) for a ratio metric (see `per_problem_values`).
  Returns {"diff", "ci95", "num_problems", "p_value"}; p_value is the two-sided bootstrap tail probability of 0.
  """
  shared = sorted(set(a) & set(b))

  def arrays(source):
    pairs = [source[pid] if isinstance(source[pid], (tuple, list)) else (source[pid], 1.0) for pid in shared]
    return np.array([p[0] for p in pairs], dtype=np.float64), np.array([p[1] for p in pairs], dtype=np.float64)

  num_a, den_a = arrays(a)
  num_b, den_b = arrays(b)
  if not shared or den_a.sum() == 0 or den_b.sum() == 0:
    return {"diff": None, "ci95": None, "num_problems": len(shared), "p_value": None}
  diff = float(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum())
  weights = bootstrap_counts(len(shared), num_bootstrap, seed)
  samples = _ratio_samples(weights, num_a, den_a) - _ratio_samples(weights, num_b, den_b)
  samples = samples[np.isfinite(samples)]
  p_value = float(min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0)))) if samples.size else None
  return {"diff": diff, "ci95": _interval(samples), "num_problems": len(shared), "p_value": p_value}


def per_problem_values(metrics: Mapping[str, Any], name: str) -> dict[str, tuple[float, float]]:
  """problem id -> (num, den) of metric `name` from a metrics dict (or metrics.json) written by compute_metrics."""
  for table in metrics["per_problem"].values():
    if name in table["metrics"]:
      entry = table["metrics"][name]
      den = entry.get("den", [1.0] * len(entry["num"]))
      return {pid: (float(n), float(d)) for pid, n, d in zip(table["problem_ids"], entry["num"], den)}
  raise KeyError(f"metric {name!r} has no per-problem values (known: "
                 f"{sorted(n for t in metrics['per_problem'].values() for n in t['metrics'])})")


# ----------------------------------------------------------------------------------------- reading records


@dataclasses.dataclass
class _Episode:
  """One sequential draw of a problem: the chosen candidate of each turn."""
  answers: list[str | None]
  correct: list[bool]
  labels: list[int | None]


class _Grading:
  """Answers and correctness of candidates under `mode`: as logged when the records were graded under it, else
  re-graded (needs the task). Vote clustering always uses `mode`'s equivalence."""

  def __init__(self, task, mode: str):
    self.task, self.mode = task, mode
    self.clusters = AnswerClusters(self._equivalent)

  def _equivalent(self, a: str, b: str) -> bool:
    if self.task is None:
      return a == b
    return self.task.answers_equivalent(a, b, self.mode)

  def regrades(self, record: Mapping[str, Any]) -> bool:
    return self.mode != record["protocol"]["grader"]

  def candidate(self, record: Mapping[str, Any], c: Mapping[str, Any]) -> tuple[str | None, bool]:
    if not self.regrades(record):
      return c["answer"], is_correct(c["reward"])
    if self.task is None:
      raise ValueError(f"re-grading {record['problem_id']} under {self.mode!r} (logged under "
                       f"{record['protocol']['grader']!r}) needs a task")
    return (self.task.extract_answer(c["text"], self.mode),
            is_correct(self.task.grade(c["text"], record["reference"], self.mode)))


def _check_records(records: Sequence[Mapping[str, Any]], kind: str, where: str):
  graders, tasks = set(), set()
  for i, r in enumerate(records):
    if r["protocol"]["kind"] != kind:
      raise ValueError(f"{where} record {i} ({r['problem_id']}): protocol.kind is {r['protocol']['kind']!r}, "
                       f"expected {kind!r}")
    graders.add(r["protocol"]["grader"])
    tasks.add(r["task"])
  if len(graders) > 1 or len(tasks) > 1:
    raise ValueError(f"{where}: records mix graders {sorted(graders)} / tasks {sorted(tasks)}; "
                     "metrics compare like with like")


def _group(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  out: dict[str, list] = collections.defaultdict(list)
  for r in records:
    out[r["problem_id"]].append(r)
  return dict(sorted(out.items()))


def _rng(seed: int, *parts) -> random.Random:
  # String seeds hash deterministically (sha512) across processes, unlike hash().
  return random.Random("|".join(map(str, (seed, *parts))))


# ------------------------------------------------------------------------------------------------ sources


class _Tally:
  """Counts for the fractions reported beside the metrics (ties, all-unparsable votes)."""

  def __init__(self):
    self.votes: collections.Counter[str] = collections.Counter()
    self.ties: collections.Counter[str] = collections.Counter()
    self.unparsable: collections.Counter[str] = collections.Counter()

  def add(self, name: str, vote: Vote):
    self.votes[name] += 1
    self.ties[name] += vote.tied
    self.unparsable[name] += vote.all_unparsable

  def fractions(self, counter) -> dict[str, float]:
    return {name: counter[name] / n for name, n in self.votes.items()}


def _inconsistent_clusters(labels: Sequence[int | None], correct: Sequence[bool]) -> int:
  seen: dict[int, set] = collections.defaultdict(set)
  for label, ok in zip(labels, correct):
    if label is not None:
      seen[label].add(ok)
  return sum(len(v) > 1 for v in seen.values())


def _invariant(cond: bool, what: str, pid: str):
  if not cond:
    raise RuntimeError(f"metric invariant violated for {pid}: {what} (a bug in metrics or a corrupt log)")


def _sequential_table(groups, grading: _Grading, turns: int, tie_break: str, seed: int, tally: _Tally,
                      fresh: Mapping[str, float], unsolved: Mapping[str, bool], oracle: bool) -> tuple[Table, dict]:
  table = Table(list(groups))
  pairs = turns - 1
  cols = collections.defaultdict(lambda: np.zeros(len(table.problem_ids)))
  extra = {"vote_inconsistent_clusters": 0, "draws": collections.Counter(), "unparsable": np.zeros(turns),
           "reached": np.zeros(turns), "per_draw": collections.defaultdict(list)}
  for p, (pid, records) in enumerate(groups.items()):
    episodes = []
    for r in records:
      scored = [grading.candidate(r, t["candidates"][t["chosen"]]) for t in r["turns"]]
      answers = [a for a, _ in scored]
      correct = [ok for _, ok in scored]
      if not r["protocol"]["oracle"] and len(answers) != turns:
        raise ValueError(f"sequential record {pid} (seed {r['protocol']['seed']}) has {len(answers)} turns; a "
                         f"no-oracle episode runs all {turns}")
      if len(answers) > turns:
        raise ValueError(f"sequential record {pid} has {len(answers)} turns, more than {turns}")
      labels = grading.clusters.labels(answers)
      extra["vote_inconsistent_clusters"] += _inconsistent_clusters(labels, correct)
      episodes.append(_Episode(answers, correct, labels))
      extra["per_draw"][r["protocol"]["seed"]].append((pid, correct[0]))
    draws = len(episodes)
    extra["draws"][draws] += 1
    for d, e in enumerate(episodes):
      n = len(e.answers)
      for k in range(1, turns + 1):
        vote = majority_vote(e.labels[:k], e.correct[:k], tie_break,
                             _rng(seed, "seq", pid, d, k) if tie_break == "random" else None)
        tally.add(f"m1@t{k}", vote)
        any_correct = any(e.correct[:k])
        _invariant(any_correct or not vote.correct, f"m1@t{k} correct with no correct turn", pid)
        _invariant(any_correct or not e.correct[0], f"p1@t{k} < m1@t1", pid)
        cols[f"m1@t{k}"][p] += vote.correct / draws
        cols[f"p1@t{k}"][p] += any_correct / draws
        if unsolved.get(pid):
          cols[f"unsolved_solved@t{k}"][p] += any_correct / draws
      for t in range(n):
        cols[f"acc@t{t + 1}"][p] += e.correct[t]
        cols[f"reached@t{t + 1}"][p] += 1
        extra["unparsable"][t] += e.answers[t] is None
        extra["reached"][t] += 1
      for t in range(min(n - 1, pairs)):
        before, after = e.correct[t], e.correct[t + 1]
        name = f"{'c' if before else 'i'}->{'c' if after else 'i'}"
        cols[f"{name}@t{t + 1}"][p] += 1
        if e.answers[t] is not None:
          cols[f"repeat_den@t{t + 1}"][p] += 1
          cols[f"repeat@t{t + 1}"][p] += (e.answers[t + 1] is not None
                                          and grading.clusters.equivalent(e.answers[t], e.answers[t + 1]))
        if not before and pid in fresh:
          cols[f"fresh_given_wrong@t{t + 1}"][p] += fresh[pid]
          cols[f"fresh_den@t{t + 1}"][p] += 1
  zeros = np.zeros(len(table.problem_ids))
  for k in range(1, turns + 1):
    table.add(f"m1@t{k}", cols[f"m1@t{k}"])
    table.add(f"p1@t{k}", cols[f"p1@t{k}"])
    for j in range(1, k):
      _invariant(bool(np.all(cols[f"p1@t{k}"] >= cols[f"p1@t{j}"] - 1e-12)), f"p1@t{k} < p1@t{j}", "some problem")
    table.add(f"turn{k}_accuracy", cols[f"acc@t{k}"], cols[f"reached@t{k}"])
  for t in range(1, pairs + 1):
    c = {name: cols.get(f"{name}@t{t}", zeros) for name in TRANSITIONS}
    table.add(f"acc_t{t + 1}_given_t{t}_wrong", c["i->c"], c["i->c"] + c["i->i"])
    table.add(f"acc_t{t + 1}_given_t{t}_right", c["c->c"], c["c->c"] + c["c->i"])
    table.add(f"repeat_rate_t{t}_t{t + 1}", cols.get(f"repeat@t{t}", zeros), cols.get(f"repeat_den@t{t}", zeros))
    table.add(f"fresh_acc_given_t{t}_wrong", cols.get(f"fresh_given_wrong@t{t}", zeros),
              cols.get(f"fresh_den@t{t}", zeros))
    extra.setdefault("transitions", []).append({name: int(v.sum()) for name, v in c.items()})
    if not oracle:  # an oracle log has no c->i and its i->c is over survivors: SCoRe's rates would be biased
      episodes = sum(c.values())
      names = score_table_names(t)
      table.add(names["delta_t1_t2"], c["i->c"] - c["c->i"], episodes)
      table.add(names["delta_i_to_c"], c["i->c"], episodes)
      table.add(names["delta_c_to_i"], c["c->i"], episodes)
  in_unsolved = np.array([float(bool(unsolved.get(pid))) for pid in table.problem_ids])
  if unsolved:
    for k in range(1, turns + 1):
      table.add(f"unsolved_solved@t{k}", cols.get(f"unsolved_solved@t{k}", zeros), in_unsolved)
  return table, extra


def _parallel_table(groups, grading: _Grading, tie_break: str, seed: int, tally: _Tally,
                    standalone: bool) -> tuple[Table, dict]:
  table = Table(list(groups))
  samples = {}
  for pid, records in groups.items():
    scored = [grading.candidate(r, c) for r in records for c in r["turns"][0]["candidates"]]
    samples[pid] = ([a for a, _ in scored], [ok for _, ok in scored])
  sizes = collections.Counter(len(a) for a, _ in samples.values())
  max_k = min(sizes) if sizes else 0
  cols = collections.defaultdict(lambda: np.zeros(len(table.problem_ids)))
  inconsistent = 0
  for p, (pid, (answers, correct)) in enumerate(samples.items()):
    n, c = len(answers), sum(correct)
    for k in range(1, max_k + 1):
      chunks = n // k
      votes, anys = 0.0, 0.0
      for j in range(chunks):
        part = slice(j * k, (j + 1) * k)
        labels = grading.clusters.labels(answers[part])
        if k == n:
          inconsistent += _inconsistent_clusters(labels, correct[part])
        vote = majority_vote(labels, correct[part], tie_break,
                             _rng(seed, "par", pid, j, k) if tie_break == "random" else None)
        if k > 1 or standalone:  # beside a sequential run, "m1@t1" is the sequential one
          tally.add(f"m{k}@t1", vote)
        votes += vote.correct
        anys += any(correct[part])
      _invariant(anys >= votes, f"p{k}@t1 < m{k}@t1 on the same samples", pid)
      cols[f"m{k}@t1"][p] = votes / chunks
      cols[f"p{k}@t1"][p] = pass_at_k(n, c, k)
    cols["solved_by_pass@B"][p] = float(c > 0)
  # With a sequential run, m1@t1 / p1@t1 are its own: the parallel single-sample accuracy gets its own name.
  table.add("fresh_first_turn_accuracy", cols["p1@t1"])
  for k in range(1 if standalone else 2, max_k + 1):
    table.add(f"m{k}@t1", cols[f"m{k}@t1"])
    table.add(f"p{k}@t1", cols[f"p{k}@t1"])
  table.add("pass@B", cols["solved_by_pass@B"])
  extra = {"sizes": dict(sorted(sizes.items())), "max_k": max_k, "vote_inconsistent_clusters": inconsistent,
           "first_turn_accuracy": {pid: sum(ok) / len(ok) for pid, (_, ok) in samples.items()},
           "unsolved": {pid: not any(ok) for pid, (_, ok) in samples.items()}}
  return table, extra


def compute_accounting(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Prefill and decode tokens of one protocol's episodes (resamples included when the runner logged them).

  A turn's prefill is its logged `prefill_tokens` (only the new tokens when the KV cache is reused), else its
  `history_tokens` (a full re-prefill); its decode is `decode_tokens`, else the sum of the candidates' num_tokens
  (teacher candidates without a count are counted in `candidates_with_unknown_tokens`). `grader_errors`: samples
  graded 0 because the grader raised (the runner's `grader_error` field).
  """
  prefill = decode = samples = unknown = grader_errors = 0
  per_turn_decode: collections.Counter[int] = collections.Counter()
  for r in records:
    for t in r["turns"]:
      pre = t.get("prefill_tokens")
      prefill += t["history_tokens"] if pre is None else pre
      dec = t.get("decode_tokens")
      if dec is None:
        counts = [c["num_tokens"] for c in t["candidates"]]
        unknown += sum(n is None for n in counts)
        dec = sum(n for n in counts if n is not None)
      decode += dec
      per_turn_decode[t["t"]] += dec
      samples += len(t["candidates"])
      grader_errors += sum("grader_error" in c for c in t["candidates"])
  problems = len({r["problem_id"] for r in records})
  return {"episodes": len(records), "samples": samples, "prefill_tokens": prefill, "decode_tokens": decode,
          "prefill_tokens_per_problem": prefill / problems if problems else None,
          "decode_tokens_per_problem": decode / problems if problems else None,
          "decode_tokens_per_turn": [per_turn_decode[t] for t in sorted(per_turn_decode)],
          "candidates_with_unknown_tokens": unknown, "grader_errors": grader_errors}


def compute_metrics(sequential_records: Sequence[Mapping[str, Any]] | None = None,
                    parallel_records: Sequence[Mapping[str, Any]] | None = None, task=None,
                    grader: str | None = None, tie_break: str = "earliest", *, seed: int = 0,
                    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP, turns: int | None = None,
                    sources: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Every RISE metric from a sequential and/or a parallel run's records, in the contracts §7 shape.

  task: answers_equivalent(a, b, mode) for vote clustering (string equality when None); extract_answer / grade
    only when `grader` differs from the mode the records were graded under (then answers are re-graded).
  grader: the grading mode; None = as logged.
  turns: the sequential turn budget (default: protocol.turns when logged, else the longest episode).
  sources: {"sequential": path, "parallel": path} for the `sources` map; "<records>" when absent.
  Returns the contracts §7 keys plus the documented extras (docs/contracts.md, "§7").
  """
  if tie_break not in TIE_BREAKS:
    raise ValueError(f"tie_break {tie_break!r} is not one of {TIE_BREAKS}")
  seq, par = list(sequential_records or []), list(parallel_records or [])
  if not seq and not par:
    raise ValueError("compute_metrics needs sequential and/or parallel records")
  _check_records(seq, "sequential", "sequential records")
  _check_records(par, "parallel", "parallel records")
  if seq and par and seq[0]["protocol"]["grader"] != par[0]["protocol"]["grader"] and grader is None:
    raise ValueError(f"the sequential run was graded {seq[0]['protocol']['grader']!r} and the parallel run "
                     f"{par[0]['protocol']['grader']!r}: pass grader= to re-grade both under one mode")
  sources = {"sequential": "<records>", "parallel": "<records>", **(sources or {})}
  logged_grader = (seq or par)[0]["protocol"]["grader"]
  grading = _Grading(task, grader or logged_grader)
  tally = _Tally()
  out: dict[str, Any] = {}
  ci: dict[str, Any] = {}
  src: dict[str, str] = {}
  tables: dict[str, Table] = {}
  notes: list[str] = []

  par_extra = None
  if par:
    par_table, par_extra = _parallel_table(_group(par), grading, tie_break, seed, tally, standalone=not seq)
    tables["parallel"] = par_table
  if seq:
    if turns is None:
      logged = {r["protocol"].get("turns") for r in seq}
      turns = logged.pop() if len(logged) == 1 and None not in logged else max(len(r["turns"]) for r in seq)
    fresh = par_extra["first_turn_accuracy"] if par_extra else {}
    unsolved = par_extra["unsolved"] if par_extra else {}
    oracle = any(r["protocol"]["oracle"] for r in seq)
    seq_table, seq_extra = _sequential_table(_group(seq), grading, turns, tie_break, seed, tally, fresh, unsolved,
                                             oracle)
    tables["sequential"] = seq_table
    if oracle:
      notes.append("the sequential log used an oracle: m1@tk votes over the turns each episode reached, and "
                   "per-turn accuracy / transitions are over the episodes that reached each turn")

  weights = {name: bootstrap_counts(len(t.problem_ids), num_bootstrap, (seed, i + 1))
             for i, (name, t) in enumerate(sorted(tables.items()))}
  cis = {name: confidence_intervals(t, weights[name]) for name, t in tables.items()}

  def put(key: str, source: str, metric: str | None = None):
    metric = metric or key
    out[key] = tables[source].value(metric)
    ci[key] = cis[source][metric]
    src[key] = sources[source]

  if seq:
    for k in range(1, turns + 1):
      put(f"m1@t{k}", "sequential")
      put(f"p1@t{k}", "sequential")
  if par:
    first = 1 if not seq else 2  # with a sequential run, m1@t1 / p1@t1 are its own (contracts §7)
    for k in range(first, par_extra["max_k"] + 1):
      put(f"m{k}@t1", "parallel")
      put(f"p{k}@t1", "parallel")
    put("fresh_first_turn_accuracy", "parallel")
    if par_extra["sizes"] and len(par_extra["sizes"]) > 1:
      notes.append(f"parallel problems have different sample counts {par_extra['sizes']}: k runs up to the "
                   f"smallest ({par_extra['max_k']})")

  if seq:
    t_seq = tables["sequential"]
    out["per_turn_accuracy"] = [t_seq.value(f"turn{t}_accuracy") for t in range(1, turns + 1)]
    ci["per_turn_accuracy"] = [cis["sequential"][f"turn{t}_accuracy"] for t in range(1, turns + 1)]
    out["per_turn_count"] = [int(t_seq.den[f"turn{t}_accuracy"].sum()) for t in range(1, turns + 1)]
    out["per_turn_unparsable_rate"] = [float(u / n) if n else None for u, n in
                                       zip(seq_extra["unparsable"], seq_extra["reached"])]
    out["transitions"] = seq_extra.get("transitions", [])
    for key, prefix in (("repeat_rate", "repeat_rate_t{t}_t{u}"), ("acc_given_wrong", "acc_t{u}_given_t{t}_wrong"),
                        ("acc_given_right", "acc_t{u}_given_t{t}_right")):
      names = [prefix.format(t=t, u=t + 1) for t in range(1, turns)]
      out[key] = [t_seq.value(n) for n in names]
      ci[key] = [cis["sequential"][n] for n in names]
      src[key] = sources["sequential"]
    for name in ("per_turn_accuracy", "transitions"):
      src[name] = sources["sequential"]
    if par:
      names = [f"fresh_acc_given_t{t}_wrong" for t in range(1, turns)]
      out["fresh_acc_given_wrong"] = [t_seq.value(n) for n in names]
      ci["fresh_acc_given_wrong"] = [cis["sequential"][n] for n in names]
      src["fresh_acc_given_wrong"] = sources["parallel"]
      names = [f"unsolved_solved@t{k}" for k in range(1, turns + 1)]
      b = min(par_extra["sizes"]) if par_extra["sizes"] else 0
      out["unsolved_by_pass@B"] = {
          "B": b, "num_unsolved": int(t_seq.den[names[0]].sum()),
          "solved_by_turn": [t_seq.value(n) for n in names],
          "ci95": [cis["sequential"][n] for n in names]}
      src["unsolved_by_pass@B"] = f"{sources['parallel']} + {sources['sequential']}"
    out["score"] = _score(t_seq, cis["sequential"], turns, oracle)
    src["score"] = sources["sequential"]
    draws = seq_extra["per_draw"]
    if len(draws) > 1:
      out["m1@t1_per_draw"] = {str(s): float(np.mean([ok for _, ok in v])) for s, v in sorted(draws.items())}
    out["num_draws"] = {str(n): c for n, c in sorted(seq_extra["draws"].items())}
  else:
    out["score"] = {"available": False, "reason": "no sequential run"}
  if seq and par:
    out["paired"] = _paired(tables, turns, par_extra["max_k"], num_bootstrap, seed)

  out["ci95"] = ci
  out["num_problems"] = len(set(t for table in tables.values() for t in table.problem_ids))
  out["num_problems_by_source"] = {name: len(t.problem_ids) for name, t in tables.items()}
  out["tie_break"] = tie_break
  out["tie_fraction"] = tally.fractions(tally.ties)
  out["all_unparsable_fraction"] = tally.fractions(tally.unparsable)
  out["vote_inconsistent_clusters"] = ((seq_extra["vote_inconsistent_clusters"] if seq else 0)
                                       + (par_extra["vote_inconsistent_clusters"] if par else 0))
  out["grader"] = grader or logged_grader
  out["regraded"] = grader is not None and grader != logged_grader
  out["turns"] = turns if seq else None
  out["parallel_k"] = par_extra["max_k"] if par else None
  out["compute"] = {name: compute_accounting(rs) for name, rs in (("sequential", seq), ("parallel", par)) if rs}
  out["bootstrap"] = {"num_resamples": num_bootstrap, "seed": seed, "level": 0.95, "unit": "problem"}
  out["sources"] = src
  out["notes"] = notes
  out["per_problem"] = {name: t.to_json() for name, t in tables.items()}
  return out


def _score(table: Table, cis: Mapping[str, list[float] | None], turns: int, oracle: bool) -> dict[str, Any]:
  """SCoRe's metrics per consecutive turn pair from the no-oracle sequential table, or why there are none."""
  if oracle:
    return {"available": False, "reason": "the sequential log used an oracle: episodes stop at their first correct "
                                          "turn, so c->i cannot occur and i->c counts only the episodes still going"}
  if turns < 2:
    return {"available": False, "reason": "one turn: no consecutive turn pair"}
  pairs = range(1, turns)
  out: dict[str, Any] = {"available": True, "pairs": [f"t{t}->t{t + 1}" for t in pairs],
                         "num_episodes": [int(table.den[score_table_names(t)["delta_t1_t2"]].sum()) for t in pairs]}
  for metric in SCORE_METRICS:
    out[metric] = [table.value(score_table_names(t)[metric]) for t in pairs]
  out["ci95"] = {metric: [cis[score_table_names(t)[metric]] for t in pairs] for metric in SCORE_METRICS}
  return out


def _paired(tables: Mapping[str, Table], turns: int, max_k: int, num_bootstrap: int, seed: int) -> dict:
  """Sequential minus parallel at the same sample budget k (both runs' problems in common)."""
  seq, par = tables["sequential"], tables["parallel"]

  def values(table: Table, name: str):
    return {pid: (table.num[name][i], table.den[name][i]) for i, pid in enumerate(table.problem_ids)}

  out = {}
  for k in range(2, min(turns, max_k) + 1):
    out[f"m1@t{k} - m{k}@t1"] = paired_difference(values(seq, f"m1@t{k}"), values(par, f"m{k}@t1"),
                                                  num_bootstrap=num_bootstrap, seed=seed)
    out[f"p1@t{k} - p{k}@t1"] = paired_difference(values(seq, f"p1@t{k}"), values(par, f"p{k}@t1"),
                                                  num_bootstrap=num_bootstrap, seed=seed)
  return out


def metrics_from_logs(sequential_paths=None, parallel_path=None, task=None, grader: str | None = None,
                      tie_break: str = "earliest", **kwargs) -> dict[str, Any]:
  """compute_metrics over rollout log files: one sequential log or a list of them (one per independent draw),
  and a parallel log. Torn last lines are ignored and counted per file in `num_torn_lines`."""
  from rise_jax.rollout import log as rollout_log  # local: metrics over in-memory records need no file layer

  if sequential_paths is not None and isinstance(sequential_paths, (str, os.PathLike)):
    sequential_paths = [sequential_paths]
  sequential, parallel, torn, sources = [], None, {}, {}
  for path in sequential_paths or []:
    _, records, torn[str(path)] = rollout_log.read_rollouts(path)
    sequential.extend(records)
  if sequential_paths:
    sources["sequential"] = " + ".join(str(p) for p in sequential_paths)
  if parallel_path is not None:
    _, parallel, torn[str(parallel_path)] = rollout_log.read_rollouts(parallel_path)
    sources["parallel"] = str(parallel_path)
  out = compute_metrics(sequential, parallel, task, grader, tie_break, sources=sources, **kwargs)
  out["num_torn_lines"] = torn
  return out
