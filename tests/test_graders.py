"""Graders: curated pairs per task and mode, the reference's quirks, a spec-level re-implementation of the GSM8K
paper grader, and math-verify from a non-main thread. Real-data checks live in test_graders_real.py."""

import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rise_jax.tasks import get_task
from rise_jax.tasks.graders import grade
from rise_jax.tasks.graders import hendrycks, latex, verify
from rise_jax.tasks.graders import math as math_grader

GOLD_18 = "Janet has 9 + 9 = <<9+9=18>>18 ducks.\n#### 18"


# ------------------------------------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("response, reward", [
    ("so \\boxed{18}", 1.0),
    ("\\boxed{+18}", 1.0),             # int("+18") parses
    ("\\boxed{ 18 }", 1.0),            # int() strips whitespace
    ("\\boxed{1,8}", 1.0),             # commas are deleted, not understood
    ("\\boxed{17} no wait \\boxed{18}", 1.0),
    ("\\boxed{18} no wait \\boxed{17}", 0.0),
    ("\\boxed{18.0}", -1.0),           # int("18.0") fails
    ("\\boxed{\\$18}", -1.0),
    ("\\boxed{\\frac{36}{2}}", -1.0),  # [^}]+ stops at the first closing brace
    ("The answer is 18", -1.0),
    ("", -1.0),
])
def test_gsm8k_paper_mode(response, reward):
  assert grade("gsm8k", response, GOLD_18, mode="paper") == reward


def test_gsm8k_paper_mode_separator_quirk():
  gold = "... = 40000\n#### 40,000"
  assert grade("gsm8k", "\\boxed{40,000}", gold, mode="paper") == 0.0
  assert grade("gsm8k", "\\boxed{40000}", gold, mode="paper") == 0.0
  assert grade("gsm8k", "\\boxed{40}", gold, mode="paper") == 1.0  # the gold reads as 40
  assert grade("gsm8k", "\\boxed{40,000}", gold, mode="robust") == 1.0
  assert grade("gsm8k", "\\boxed{40}", gold, mode="robust") == 0.0


@pytest.mark.parametrize("response, reward", [
    ("\\boxed{18}", 1.0),
    ("\\boxed{18.0}", 1.0),
    ("\\boxed{18.00}", 1.0),
    ("\\boxed{\\$18}", 1.0),
    ("$\\boxed{\\$18.00}$", 1.0),
    ("\\boxed{18 \\text{ dollars}}", 1.0),
    ("\\boxed{\\frac{36}{2}}", 1.0),
    ("The answer is 18", 1.0),
    ("The answer is 18 dollars.", 1.0),
    ("So the answer is: $18.", 1.0),
    ("Final Answer: 18", 1.0),
    ("#### 18", 1.0),
    ("I first thought \\boxed{17}. The answer is 18", 1.0),     # the last stated answer wins
    ("The answer is 18. Hmm, recheck: \\boxed{17}", 0.0),
    ("\\boxed{1.8}", 0.0),
    ("\\boxed{180}", 0.0),
    ("She has 18 ducks.", 0.0),                                  # no stated answer
    ("\\boxed{}", 0.0),
    ("The answer is eighteen", 0.0),
])
def test_gsm8k_robust_mode(response, reward):
  assert grade("gsm8k", response, GOLD_18, mode="robust") == reward


def test_gsm8k_answers_for_majority_vote():
  task = get_task("gsm8k")
  answers = [task.extract_answer(r) for r in ("\\boxed{18.0}", "The answer is $18", "\\boxed{1,800}", "none")]
  assert answers == ["18", "18", "1800", None]
  assert task.answers_equivalent(answers[0], answers[1]) and not task.answers_equivalent(answers[0], answers[2])
  assert not task.answers_equivalent(None, None)
  assert task.extract_answer("\\boxed{0.250}") == "0.25" and task.extract_answer("\\boxed{2/3}") == "2/3"
  assert task.extract_answer("\\boxed{18.0}", mode="paper") is None
  assert task.extract_answer("\\boxed{+18}", mode="paper") == "18"
  assert task.reference_answer("#### 1,234") == "1234" and task.reference_answer("#### 1,234", "paper") == "1"


def _spec_gsm8k_paper(response: str, reference: str) -> float:
  """The reference grader as its source reads, written independently of rise_jax's code."""
  found = re.findall(r"boxed{([^}]+)}", response)
  if not found:
    return -1.0
  try:
    value = int(found[-1].replace(",", ""))
  except ValueError:
    return -1.0
  gold = float(re.search(r"####\s*([-+]?\d+(?:\.\d+)?)", reference).group(1))
  return 1.0 if float(value) == gold else 0.0


# 309 nines overflow the reference's float(); 4301 digits exceed its int()'s limit.
_pieces = st.sampled_from(["\\boxed{", "boxed{", "}", "18", "+", "-", ",", ".", "0", " ", "\\$", "x", "{", "7",
                           "9" * 309, "9" * 4301, "_"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=12).map("".join), st.sampled_from(["#### 18", "#### -7", "#### 1,800", "#### 0"]))
def test_gsm8k_paper_mode_matches_the_spec(response, reference):
  """Equal to the reference wherever it returns a reward; its "wrong" reward (0) where it crashes."""
  try:
    expected = _spec_gsm8k_paper(response, reference)
  except OverflowError:
    expected = 0.0
  assert grade("gsm8k", response, reference, mode="paper") == expected


def test_gsm8k_reference_without_a_gold_is_an_error():
  with pytest.raises(ValueError, match="no '#### <number>'"):
    grade("gsm8k", "\\boxed{1}", "no gold here", mode="paper")
  with pytest.raises(ValueError, match="no '#### <number>'"):
    grade("gsm8k", "\\boxed{1}", "no gold here", mode="robust")


# ------------------------------------------------------------------------------------------------------- MATH
@pytest.mark.parametrize("a, b, equal", [
    ("\\frac12", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "3/4", True),
    ("k = 5", "5", True),
    ("5\\text{ cm}", "5", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("10\\%", "10", True),
    ("10%", "10", False),                 # the RISE copy strips "\\%" twice and never a bare "%"
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("90^\\circ", "90", True),
    (".5", "\\frac{1}{2}", True),
    ("2\\sqrt", "2\\sqrt", True),         # the normaliser raises; raw strings compared
    ("2\\sqrt", "2 \\sqrt", False),
    ("\\text{ a}\\text{ b}", "\\text{ a}", False),
    ("x+1", "1+x", False),
])
def test_hendrycks_is_equiv(a, b, equal):
  assert hendrycks.is_equiv(a, b) is equal


def test_math_paper_mode():
  sol = "Thus $x = \\boxed{\\frac{\\sqrt{3}}{2}}$."
  assert grade("math", "\\boxed{\\frac{\\sqrt{3}}{2}}", sol, mode="paper") == 1.0
  # Two levels of braces: both sides truncate to "\frac{\sqrt{3}", so a wrong denominator passes.
  assert math_grader.paper_extract(sol) == "\\frac{\\sqrt{3}"
  assert grade("math", "\\boxed{\\frac{\\sqrt{3}}{3}}", sol, mode="paper") == 1.0
  assert grade("math", "\\boxed{\\frac{\\sqrt{3}}{3}}", sol, mode="robust") == 0.0
  assert grade("math", "\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}", mode="paper") == 1.0
  assert grade("math", "\\boxed{1}\\boxed{2}", "\\boxed{2}", mode="paper") == 1.0
  assert grade("math", "no answer", "no boxed either", mode="paper") == 1.0  # None vs None
  assert grade("math", "no answer", "\\boxed{2}", mode="paper") == 0.0
  assert grade("math", "\\boxed{10%}", "\\boxed{10}", mode="paper") == 0.0


@pytest.mark.parametrize("pred, gold, equal", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("x^2+1", "1+x^2", True),
    ("\\text{(C)}", "C", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("(1, 2)", "(1,2)", True),
    ("10\\%", "10", True),
    ("90^\\circ", "90", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{2}", False),
    ("2\\pi", "6.28", False),
    ("\\frac{1}{3}", "0.33", False),
    ("[1,2)", "(1,2]", False),
    ("\\infty", "-\\infty", False),
    ("\\text{Monday}", "\\text{Tuesday}", False),
    ("3", "4", False),
])
def test_math_robust_mode(pred, gold, equal):
  solution = f"The answer is $\\boxed{{{gold}}}$."
  assert grade("math", f"So $\\boxed{{{pred}}}$", solution, mode="robust") == float(equal)
  task = get_task("math")
  assert task.answers_equivalent(task.extract_answer(f"\\boxed{{{pred}}}"), task.extract_answer(solution)) is equal


def test_math_robust_extracts_the_last_balanced_box():
  assert latex.last_boxed("a \\boxed{1} b \\boxed{\\frac{\\sqrt{3}}{2}} c") == "\\frac{\\sqrt{3}}{2}"
  assert latex.last_boxed("\\boxed 7 and \\fbox{8}") == "8" and latex.last_boxed("\\boxed 7.") == "7."
  assert latex.last_boxed("\\boxed{unclosed") is None
  assert grade("math", "no box", "\\boxed{2}", mode="robust") == 0.0
  with pytest.raises(ValueError, match="no \\\\boxed"):
    grade("math", "\\boxed{2}", "no box", mode="robust")


@pytest.mark.timeout(120)
def test_math_verify_off_the_main_thread_uses_a_spawn_pool(monkeypatch):
  monkeypatch.setattr(verify, "VERIFY_TIMEOUT_S", 0.5)  # passed on to the worker with each call
  results = {}

  def work():
    results["equal"] = grade("math", "\\boxed{\\sqrt{2}/2}", "\\boxed{\\frac{\\sqrt{2}}{2}}", mode="robust")
    results["different"] = grade("math", "\\boxed{\\sqrt{2}}", "\\boxed{\\frac{\\sqrt{2}}{2}}", mode="robust")
    start = time.monotonic()  # a pathological answer is bounded by the deadline in the worker too
    results["slow"] = grade("math", "\\boxed{10^{1000000000}}", "\\boxed{\\frac{\\sqrt{2}}{2}}", mode="robust")
    results["slow_s"] = time.monotonic() - start

  thread = threading.Thread(target=work)
  thread.start()
  thread.join()
  assert results.pop("slow_s") < 3
  assert results == {"equal": 1.0, "different": 0.0, "slow": 0.0}
  assert verify._pool is not None and verify._pool._mp_context.get_start_method() == "spawn"


# -------------------------------------------------------------------------------------------------------- toy
@pytest.mark.parametrize("response, paper, robust", [
    ("3*4=12,25+12=37", 1.0, 1.0),
    ("3*4=12,25+12=36", 0.0, 0.0),
    ("3*4=12,25+12=3", 0.0, 0.0),
    ("3*4=12", 0.0, 0.0),        # stops after the first step: its result is the stated answer
    ("37", -1.0, 0.0),           # no scratchpad, no '=': unparsable
    ("", -1.0, 0.0),
])
def test_toy_grader(response, paper, robust):
  assert grade("toy", response, "3*4=12,25+12=37", mode="paper") == paper
  assert grade("toy", response, "3*4=12,25+12=37", mode="robust") == robust


def test_grade_takes_a_task_or_its_name():
  assert grade(get_task("toy"), "1*2=2,3+2=5", "5") == grade("toy", "1*2=2,3+2=5", "5") == 1.0


def test_unknown_mode_or_task():
  with pytest.raises(ValueError, match="grading mode 'strict'"):
    grade("gsm8k", "\\boxed{1}", "#### 1", mode="strict")
  with pytest.raises(ValueError, match="no grader for task 'mbpp'"):
    grade("mbpp", "", "")
