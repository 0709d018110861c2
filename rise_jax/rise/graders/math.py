"""MATH answer checking: `paper` (the reference's `MATHEnv.evaluate_response`) and `robust` (math-verify).

paper:  the reference's one-level-nesting regex `boxed\\{((?:[^{}]|(?:{[^}]*}))*)\\}` on response and solution,
        last match, then the reference's Hendrycks `is_equiv` (None vs None is True). Answers with two levels of
        braces (`\\frac{\\sqrt{3}}{2}`) are truncated before comparison, on both sides alike.
robust: the last balanced-brace `\\boxed{}` of each side; equal when the texts are identical up to whitespace,
        else when math-verify (`parse` + `verify`, per-call timeout) says so; when math-verify cannot parse a
        side, the Hendrycks `is_equiv` decides. math-verify's timeout is SIGALRM-based and only works in the
        main thread; called from any other thread the comparison runs in a one-process spawn-context pool
        (never fork: the parent may have initialised JAX).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import multiprocessing
import re
import threading

from rise_jax.rise.graders import hendrycks, latex

_PAPER_BOXED = re.compile(r"boxed\{((?:[^{}]|(?:{[^}]*}))*)\}")
VERIFY_TIMEOUT_S = 5

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def paper_extract(text: str) -> str | None:
  """The reference's `MATHEnv.extract_answer`: the last match of the one-level-nesting regex."""
  matches = _PAPER_BOXED.findall(text)
  return matches[-1] if matches else None


def paper_grade(response: str, reference: str) -> float:
  return 1.0 if hendrycks.is_equiv(paper_extract(response), paper_extract(reference)) else 0.0


@functools.lru_cache(maxsize=65536)
def _parse(answer: str, timeout_s: int) -> tuple:
  """math-verify's parse of one answer string (cached: a gold is compared with many samples)."""
  import math_verify  # Imported late: sympy and the antlr parser cost seconds.

  return tuple(math_verify.parse(f"${answer}$", extraction_config=[math_verify.LatexExtractionConfig()],
                                 parsing_timeout=timeout_s))


def _verify_in_this_thread(gold: str, pred: str, timeout_s: int) -> bool | None:
  """math-verify's verdict on two answer strings; None when either side does not parse."""
  import math_verify

  gold_parsed, pred_parsed = _parse(gold, timeout_s), _parse(pred, timeout_s)
  if not gold_parsed or not pred_parsed:
    return None
  return bool(math_verify.verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout_s))


def _spawn_pool() -> concurrent.futures.ProcessPoolExecutor:
  global _pool
  with _pool_lock:
    if _pool is None:
      _pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                     mp_context=multiprocessing.get_context("spawn"))
      atexit.register(_pool.shutdown, cancel_futures=True)
    return _pool


def math_verify_equal(gold: str, pred: str, timeout_s: int = VERIFY_TIMEOUT_S) -> bool | None:
  """math-verify equivalence with a working timeout from any thread (see the module docstring)."""
  if threading.current_thread() is threading.main_thread():
    return _verify_in_this_thread(gold, pred, timeout_s)
  return _spawn_pool().submit(_verify_in_this_thread, gold, pred, timeout_s).result()


def robust_equivalent(a: str | None, b: str | None) -> bool:
  """Equivalence of two extracted answers (order-insensitive up to math-verify's own asymmetries)."""
  if a is None or b is None:
    return False
  if a.split() == b.split():
    return True  # The same text up to whitespace runs: no need to parse.
  verdict = math_verify_equal(b, a)
  return hendrycks.is_equiv(a, b) if verdict is None else verdict


def reference_boxed(reference: str) -> str:
  answer = latex.last_boxed(reference)
  if answer is None:
    raise ValueError(f"MATH solution has no \\boxed{{}} answer: {reference[-80:]!r}")
  return answer.strip()


def robust_grade(response: str, reference: str) -> float:
  pred = latex.last_boxed(response)
  return 1.0 if robust_equivalent(pred, reference_boxed(reference)) else 0.0


# --------------------------------------------------------------------------------------------- task facade
def extract_answer(response: str, mode: str) -> str | None:
  """paper: the Hendrycks-normalised regex match (votes by string equality); robust: the raw balanced content
  (votes by `answers_equivalent`, since normalising would break LaTeX that math-verify must parse)."""
  if mode == "paper":
    answer = paper_extract(response)
    return None if answer is None else hendrycks.normalise(answer)
  answer = latex.last_boxed(response)
  return None if answer is None else answer.strip()


def reference_answer(reference: str, mode: str = "robust") -> str | None:
  if mode == "paper":
    answer = paper_extract(reference)
    return None if answer is None else hendrycks.normalise(answer)
  return reference_boxed(reference)


def grade(response: str, reference: str, mode: str) -> float:
  return paper_grade(response, reference) if mode == "paper" else robust_grade(response, reference)


def answers_equivalent(a: str | None, b: str | None, mode: str) -> bool:
  if mode == "paper":
    return a is not None and a == b
  return robust_equivalent(a, b)
