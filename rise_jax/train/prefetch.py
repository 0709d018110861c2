"""Host batches built ahead of the device: `prefetch(items, produce, depth)` runs `produce` on a background
thread, at most `depth` results ahead of the consumer, and yields them in order.

The training loop's host work (materialising rows, the estimator's token weights, the host->device copy) then
overlaps the previous device call instead of sitting between two calls. An exception in `produce` is raised in
the consumer at the item that failed; closing the generator early (a break, an error in the loop) stops the
thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch(items: Sequence[T], produce: Callable[[T], R], depth: int = 2) -> Iterator[R]:
  """Yield `produce(item)` for each item in order, computed on a thread up to `depth` items ahead (depth 0: on
  the caller's thread, when it is produced)."""
  if depth < 0:
    raise ValueError(f"depth must be >= 0, got {depth}")
  if depth == 0:
    return (produce(item) for item in items)
  return _threaded(items, produce, depth)


def _threaded(items: Sequence[T], produce: Callable[[T], R], depth: int) -> Iterator[R]:
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(x) -> bool:
    while not stop.is_set():  # a bounded put that notices the consumer has gone
      try:
        ready.put(x, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in items:
        if not put(produce(item)):
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
      put(_Failed(e))
      return
    put(_DONE)

  thread = threading.Thread(target=work, name="rise_jax-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      x = ready.get()
      if x is _DONE:
        return
      if isinstance(x, _Failed):
        raise x.error
      yield x
  finally:
    stop.set()
    thread.join()
