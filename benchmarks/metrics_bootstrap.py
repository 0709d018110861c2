"""Bootstrap intervals for every metric of a GSM8K-size evaluation: rise_jax's shared-counts matrix product vs the
textbook loop (resample problem indices, recompute each metric), interleaved, medians and ratio.

  python benchmarks/metrics_bootstrap.py [--problems 1319] [--metrics 40] [--resamples 2000] [--repeats 5]
"""

import argparse
import statistics
import time

import numpy as np

from rise_jax.rise import metrics


def textbook(num: np.ndarray, den: np.ndarray, resamples: int, seed: int) -> list[list[float]]:
  """For each resample: draw P problem indices, recompute every metric as sum(num) / sum(den)."""
  rng = np.random.default_rng(seed)
  problems, count = num.shape
  samples = np.empty((resamples, count))
  for b in range(resamples):
    idx = rng.integers(0, problems, problems)
    samples[b] = num[idx].sum(0) / den[idx].sum(0)
  return [list(np.percentile(samples[:, i], [2.5, 97.5])) for i in range(count)]


def vectorised(table: metrics.Table, resamples: int, seed: int):
  metrics.bootstrap_counts.cache_clear()  # time the counts too, as a fresh evaluation would
  return metrics.confidence_intervals(table, metrics.bootstrap_counts(len(table.problem_ids), resamples, seed))


def synthetic_logs(problems: int, turns: int, k: int, seed: int = 0):
  """Sequential (no oracle) and parallel records shaped like a GSM8K evaluation's, answers from a small set."""
  rng = np.random.default_rng(seed)

  def candidate():
    answer = rng.choice(["18", "17", "19", "None"])
    answer = None if answer == "None" else str(answer)
    return {"text": "", "token_ids": None, "logprob_sum": None, "num_tokens": 200, "finish_reason": "stop",
            "answer": answer, "reward": float(answer == "18"), "resamples": 0}

  def turn(t, n):
    return {"t": t, "policy": "x", "history_tokens": 600, "window_applied": False, "sampling": {},
            "candidates": [candidate() for _ in range(n)], "chosen": 0, "feedback": None}

  def record(i, kind, turn_list):
    return {"problem_id": f"gsm8k/test/{i}", "task": "gsm8k", "reference": "#### 18", "turns": turn_list,
            "protocol": {"kind": kind, "oracle": False, "grader": "robust", "seed": 0}, "stop": "max_turns"}

  seq = [record(i, "sequential", [turn(t, 1) for t in range(1, turns + 1)]) for i in range(problems)]
  par = [record(i, "parallel", [turn(1, k)]) for i in range(problems)]
  return seq, par


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--problems", type=int, default=1319)
  parser.add_argument("--metrics", type=int, default=40)
  parser.add_argument("--resamples", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  num = (rng.random((args.problems, args.metrics)) < 0.4).astype(np.float64)
  den = np.ones_like(num)
  table = metrics.Table([str(i) for i in range(args.problems)])
  for i in range(args.metrics):
    table.add(f"metric{i}", num[:, i], den[:, i])

  times = {"rise_jax": [], "textbook": []}
  for r in range(args.repeats):
    for name, fn in (("rise_jax", lambda: vectorised(table, args.resamples, r)),
                     ("textbook", lambda: textbook(num, den, args.resamples, r))):
      start = time.perf_counter()
      out = fn()
      times[name].append(time.perf_counter() - start)
    assert len(out) == args.metrics
  # Same statistic, different random streams: the intervals agree to Monte-Carlo error.
  a = vectorised(table, args.resamples, 0)["metric0"]
  b = textbook(num[:, :1], den[:, :1], args.resamples, 1)[0]
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"{args.problems} problems x {args.metrics} metrics x {args.resamples} resamples, {args.repeats} repeats")
  print(f"rise_jax (shared counts, one matmul): median {med['rise_jax'] * 1e3:.1f} ms")
  print(f"textbook (index loop):                median {med['textbook'] * 1e3:.1f} ms")
  print(f"speed-up: {med['textbook'] / med['rise_jax']:.1f}x;  metric0 CI {np.round(a, 4)} vs {np.round(b, 4)}")
  seq, par = synthetic_logs(args.problems, turns=5, k=5)
  full = []
  for _ in range(args.repeats):
    metrics.bootstrap_counts.cache_clear()
    start = time.perf_counter()
    metrics.compute_metrics(seq, par, num_bootstrap=args.resamples)
    full.append(time.perf_counter() - start)
  print(f"compute_metrics, sequential (5 turns) + parallel (k = 5) logs: median {statistics.median(full):.2f} s")


if __name__ == "__main__":
  main()
