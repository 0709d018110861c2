"""The toy task: `a+b*c` with a two-step scratchpad, small enough for a char-level model on 2 CPU cores.

Problem "25+3*4", worked answer "3*4=12,25+12=37"; the answer is the integer after the last '='. Operands:
a in [0, max_addend], b and c in [1, max_factor] (defaults 99 and 9: 8,100 distinct problems, answers 1..180,
an answer space of 180 values, so a uniform guesser scores 1/180 per attempt). Wrong answers of a model are
mostly near misses (a times-table slip, a dropped carry), and every step stays visible, so a retry can reread
the failed attempt and check it step by step (`ToyTask.repair` does so exactly, for the `repair` teacher). The
whole problem space is enumerated and permuted with `seed`; test takes the first `test_size` problems, the rest is
the train source, from which dev is carved with a fixed seed like any task's. Splits are disjoint by construction
and asserted.

The task's tokenizer is char-level (`rise_jax.chat.toy_tokenizer`) with the specials of the `toy` chat template.
"""

from __future__ import annotations

import itertools
import random
import re

from rise_jax.tasks import base

_QUESTION = re.compile(r"(\d+)\+(\d+)\*(\d+)")
# Digits bounded: int() of a match is cheap, however long a degenerate attempt is.
_ATTEMPT = re.compile(r"\s*((\d{1,9})\*(\d{1,9})=(\d{1,9})),\d{1,9}\+\d{1,9}=\d{1,9}\s*")


def worked_answer(a: int, b: int, c: int) -> str:
  """The reference scratchpad: the product first (precedence), then the sum."""
  return f"{b}*{c}={b * c},{a}+{b * c}={a + b * c}"


class ToyTask(base.Task):
  name = "toy"

  def __init__(self, *, seed: int = 0, max_addend: int = 99, max_factor: int = 9, test_size: int | None = 2000,
               **kwargs):
    super().__init__(test_size=test_size, **kwargs)
    if max_addend < 0 or max_factor < 1:
      raise ValueError(f"toy task needs max_addend >= 0 and max_factor >= 1, got {max_addend}, {max_factor}")
    self.seed = seed
    self.max_addend = max_addend
    self.max_factor = max_factor
    self._space = list(itertools.product(range(max_addend + 1), range(1, max_factor + 1),
                                         range(1, max_factor + 1)))
    random.Random(seed).shuffle(self._space)
    num_test = len(self._space) if test_size is None else test_size
    needed = num_test + self.dev_size + 1
    if needed > len(self._space):
      raise ValueError(f"toy task: test_size {num_test} + dev_size {self.dev_size} + at least one training "
                       f"problem exceed the {len(self._space)} distinct problems; raise max_addend")
    self._num_test = num_test

  def answer_space_size(self) -> int:
    """How many distinct answers the problems have (the chance level of a uniform guesser is 1 / this)."""
    products = {b * c for b in range(1, self.max_factor + 1) for c in range(1, self.max_factor + 1)}
    return len({a + p for a in range(self.max_addend + 1) for p in products})

  def repair(self, question: str, attempt: str, reference: str) -> str | None:
    """The attempt `b*c=P,a+P=S` corrected step by step: a wrong product (or wrong factors) is rewritten with the
    sum that follows from it; a right product is kept as written (either factor order) and only the sum is fixed.
    None for an attempt not of that shape."""
    del reference  # the question holds the operands
    q, m = _QUESTION.fullmatch(question.strip()), _ATTEMPT.fullmatch(attempt)
    if q is None or m is None:
      return None
    a, b, c = (int(x) for x in q.groups())
    x, y, product = (int(v) for v in m.groups()[1:])
    if sorted((x, y)) != sorted((b, c)) or product != b * c:
      return worked_answer(a, b, c)
    return f"{m.group(1)},{a}+{product}={a + product}"

  def _load_source_split(self, split: str) -> list[base.Problem]:
    triples = self._space[:self._num_test] if split == "test" else self._space[self._num_test:]
    return [base.Problem(id=f"toy/{split}/{i}", question=f"{a}+{b}*{c}", reference=worked_answer(a, b, c),
                         meta={"a": a, "b": b, "c": c})
            for i, (a, b, c) in enumerate(triples)]

  def load(self, split: str) -> list[base.Problem]:
    problems = super().load(split)
    self._assert_disjoint()
    return problems

  def _assert_disjoint(self):
    if "test" not in self._cache or "train" not in self._cache:
      super().load("test" if "test" not in self._cache else "train")
    questions = {s: {p.question for p in self._cache[s]} for s in base.SPLITS}
    for s1, s2 in itertools.combinations(base.SPLITS, 2):
      overlap = questions[s1] & questions[s2]
      assert not overlap, f"toy splits {s1} and {s2} share problems, e.g. {sorted(overlap)[:3]}"
