"""Graders on every real gold answer (../shared/data; skipped when absent).

robust: every GSM8K gold (train and test; as `\\boxed{N}` and as "The answer is N") and every MATH gold grades 1.
paper: exactly the documented quirk items differ, asserted by count so that a change in either direction fails:
GSM8K golds with thousands separators (14 of 1,319 test, 79 of 7,473 train) never grade 1; MATH answers with two
levels of braces (9 of the 1,000 test solutions) are truncated.
"""

import json

import pytest

from rise_jax.tasks.graders import grade
from rise_jax.tasks.graders import latex, verify
from rise_jax.tasks.graders import math as math_grader


def _read(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _brace_depth(text):
  depth = deepest = 0
  for ch in text:
    depth += {"{": 1, "}": -1}.get(ch, 0)
    deepest = max(deepest, depth)
  return deepest


@pytest.fixture(scope="session")
def gsm8k(shared_dir):
  return {split: _read(shared_dir / "data" / "gsm8k" / f"{split}.jsonl") for split in ("train", "test")}


@pytest.fixture(scope="session")
def math_test(shared_dir):
  return _read(shared_dir / "data" / "math" / "test.jsonl")


@pytest.mark.parametrize("split, size, separators", [("test", 1319, 14), ("train", 7473, 79)])
def test_gsm8k_every_gold(gsm8k, split, size, separators):
  records = gsm8k[split]
  assert len(records) == size
  golds = [r["answer"].rsplit("####", 1)[1].strip() for r in records]
  boxed = [f"The total is \\boxed{{{g}}}." for g in golds]
  stated = [f"Adding up, the answer is {g}" for g in golds]
  for responses in (boxed, stated):
    assert [grade("gsm8k", x, r["answer"], "robust") for x, r in zip(responses, records)] == [1.0] * size
  paper = [grade("gsm8k", x, r["answer"], "paper") for x, r in zip(boxed, records)]
  failed = [g for g, reward in zip(golds, paper) if reward != 1.0]
  assert len(failed) == separators and all("," in g for g in failed)
  assert set(paper) == {0.0, 1.0}
  # Paper mode reads only \boxed{}: the stated form is unparsable (-1) for every problem.
  assert {grade("gsm8k", x, r["answer"], "paper") for x, r in zip(stated, records)} == {-1.0}


def test_math_every_gold(math_test):
  assert len(math_test) == 1000
  solutions = [r["solution"] for r in math_test]
  golds = [latex.last_boxed(s) for s in solutions]
  assert None not in golds
  for mode in ("robust", "paper"):
    assert [grade("math", s, s, mode) for s in solutions] == [1.0] * 1000
    assert [grade("math", f"So $\\boxed{{{g}}}$.", s, mode) for g, s in zip(golds, solutions)] == [1.0] * 1000
  # The paper's regex truncates exactly the answers with two levels of braces.
  truncated = [(g, math_grader.paper_extract(s)) for g, s in zip(golds, solutions)
               if math_grader.paper_extract(s) != g]
  assert len(truncated) == 9
  assert [g for g, _ in truncated] == [g for g in golds if _brace_depth(g) >= 2]
  assert all(g.startswith(cut) and len(cut) < len(g) for g, cut in truncated)


@pytest.mark.timeout(120)
def test_math_golds_through_math_verify(math_test):
  """math-verify itself (not the identical-text shortcut) accepts every gold against itself and rejects gold + 1,
  where paper mode accepts 12: the 9 truncated answers and 3 whose trailing '\\text{ unit}' the normaliser cuts off
  together with everything after it."""
  golds = [latex.last_boxed(r["solution"]).strip() for r in math_test]
  assert all(verify.equal(g, g) for g in golds)
  plus_one = [f"\\boxed{{{g}+1}}" for g in golds]
  robust = [grade("math", x, r["solution"], "robust") for x, r in zip(plus_one, math_test)]
  paper = [grade("math", x, r["solution"], "paper") for x, r in zip(plus_one, math_test)]
  assert sum(robust) == 0
  accepted = [g for g, reward in zip(golds, paper) if reward == 1.0]
  assert len(accepted) == 12
  assert sum("\\text{ " in g for g in accepted) == 3
  assert sum(math_grader.paper_extract(f"\\boxed{{{g}}}") != g for g in accepted) == 9
