"""math-verify with one deadline per call and a memory of slow answers: a pathological answer (a power tower,
`10^{1000000000}`, `10000000!`, deep braces) costs math-verify's timeout at most once, then Hendrycks decides.

math-verify's own timeouts arm SIGALRM per parse and per compared pair (up to 4 pairs per call, each its full
timeout), and its handlers catch `Exception`; here math-verify runs with its timeouts off inside one SIGALRM
deadline per parse and per `verify` call that raises a BaseException (re-raised every 0.1 s in case a bare
`except:` in sympy swallows it). SIGALRM only works in the main thread: from any other thread the call runs in a
one-process spawn-context pool (never fork: the parent may have initialised JAX), whose worker keeps its own memory.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import signal
import threading
import time

from rise_jax.tasks.graders import limits

VERIFY_TIMEOUT_S = 5.0
_RETRY_S = 0.1

_slow: set[str] = set()  # answers that ran into a deadline: never given to math-verify again
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


class DeadlineExceeded(BaseException):
  """Not an Exception, so math-verify's and sympy's `except Exception` handlers let it through."""


@contextlib.contextmanager
def deadline(seconds: float):
  """Raise DeadlineExceeded in the (main) thread once `seconds` have passed; restores any outer SIGALRM timer."""
  armed = [True]

  def _fire(signum, frame):
    if armed[0]:  # a signal delivered while the block is exiting must not escape it
      raise DeadlineExceeded(f"over {seconds} s")

  handler = signal.signal(signal.SIGALRM, _fire)
  outer = signal.setitimer(signal.ITIMER_REAL, seconds, _RETRY_S)
  start = time.monotonic()
  try:
    yield
  finally:
    armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, handler)
    if outer[0] > 0:  # e.g. pytest-timeout's alarm: give it back what is left of it
      signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - start), 1e-3), outer[1])


def _math_verify():
  import math_verify  # Imported late: sympy and the antlr parser cost seconds.
  from math_verify import grader, parser

  grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True  # its "timeout disabled" warning: ours is on
  return math_verify


def _mark_slow(answer: str, what: str) -> None:
  _slow.add(answer)
  logging.warning("math-verify: %s of %r ran into its deadline; this answer is compared by Hendrycks is_equiv "
                  "from now on", what, answer[:80])


@functools.lru_cache(maxsize=65536)
def _parse(answer: str, timeout_s: float) -> tuple:
  """math-verify's parse of one answer (cached: a gold is compared with many samples); () if it does not parse."""
  math_verify = _math_verify()
  try:
    with deadline(timeout_s):
      return tuple(math_verify.parse(f"${answer}$", extraction_config=[math_verify.LatexExtractionConfig()],
                                     parsing_timeout=None))
  except DeadlineExceeded:
    _mark_slow(answer, "parsing")
    return ()


def _equal_in_this_thread(gold: str, pred: str, timeout_s: float) -> bool | None:
  """math-verify's verdict; None when a side is too long, slow or does not parse. A verify that runs into the
  deadline marks `pred` slow (graders pass the sample as `pred`, so a pathological sample never taints a gold)."""
  if any(len(x) > limits.MAX_VERIFY_CHARS or x in _slow for x in (gold, pred)):
    return None
  gold_parsed, pred_parsed = _parse(gold, timeout_s), _parse(pred, timeout_s)
  if not gold_parsed or not pred_parsed:
    return None
  try:
    with deadline(timeout_s):
      return bool(_math_verify().verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))
  except DeadlineExceeded:
    _mark_slow(pred, "comparison")
    return None


def _spawn_pool() -> concurrent.futures.ProcessPoolExecutor:
  global _pool
  with _pool_lock:
    if _pool is None:
      _pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                     mp_context=multiprocessing.get_context("spawn"))
      atexit.register(_pool.shutdown, cancel_futures=True)
    return _pool


def _drop_pool() -> None:
  global _pool
  with _pool_lock:
    _pool = None


@functools.lru_cache(maxsize=65536)
def equal(gold: str, pred: str) -> bool | None:
  """math-verify equivalence of two answers with a working deadline from any thread; None = no verdict."""
  if threading.current_thread() is threading.main_thread():
    return _equal_in_this_thread(gold, pred, VERIFY_TIMEOUT_S)
  try:  # the deadline travels with the call: the worker process does not see this module's setting
    return _spawn_pool().submit(_equal_in_this_thread, gold, pred, VERIFY_TIMEOUT_S).result()
  except concurrent.futures.process.BrokenProcessPool:
    _drop_pool()  # the worker died (killed, out of memory): the next call starts a fresh one
    logging.warning("math-verify worker died comparing %r with %r; no verdict", pred[:80], gold[:80])
    return None
