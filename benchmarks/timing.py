"""Wall-clock timing the benchmarks share: one timed call, and medians of repetitions interleaved across callables
(the machine is shared, so only side-by-side ratios within one run are meaningful)."""

from __future__ import annotations

import statistics
import time


def timed(fn):
  """(seconds, result) of one call."""
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def interleaved(fns: dict, reps: int) -> dict:
  """Median wall time of each callable, repetitions interleaved across callables."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      times[name].append(timed(fn)[0])
  return {k: statistics.median(v) for k, v in times.items()}
