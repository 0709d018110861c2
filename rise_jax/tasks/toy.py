"""The toy task: `a+b*c` with a two-step scratchpad, small enough for a char-level model on 2 CPU cores.

Problem "25+3*4", worked answer "3*4=12,25+12=37"; the answer is the integer after the last '='. Operands:
a in [0, max_addend], b and c in [1, max_factor] (defaults 99 and 9: 8,100 distinct problems, answers 1..180,
an answer space of 180 values, so a uniform guesser scores 1/180 per attempt). Wrong answers of a model are
mostly near misses (a times-table slip, a dropped carry), and every step stays visible, so a retry can reread
the failed attempt and check it step by step (`ToyTask.repair` does so exactly, for the `repair` teacher). The
whole problem space is enumerated and permuted with `seed`; test takes the first `test_size` problems, the rest is
the train source, from which dev is carved with a fixed seed like any task's. Splits are disjoint by construction
and asserted.

Form `a*b+c*d` (`form`): the harder variant, three steps, "7*8+6*9" -> "7*8=56,6*9=54,56+54=110"; every operand
in [1, max_factor] (9: 6,561 problems, answers 2..162). Its two products are independent, so a repair keeps a
right product the attempt wrote and fixes the other one. Form `a*b+c*d/columns`: the same problems, the sum also
written column by column from the units with its carries, "7*8=56,6*9=54,6+4=10,5+5+1=11,56+54=110", so a wrong
sum shows which digit went wrong.

The task's tokenizer is char-level (`rise_jax.chat.toy_tokenizer`) with the specials of the `toy` chat template.
"""

from __future__ import annotations

import itertools
import random
import re

from rise_jax.tasks import base

FORMS = ("a+b*c", "a*b+c*d", "a*b+c*d/columns")
_TWO_PRODUCTS = re.compile(r"(\d+)\*(\d+)\+(\d+)\*(\d+)")
_QUESTION = {"a+b*c": re.compile(r"(\d+)\+(\d+)\*(\d+)"), "a*b+c*d": _TWO_PRODUCTS,
             "a*b+c*d/columns": _TWO_PRODUCTS}
# Digits bounded: int() of a match is cheap, however long a degenerate attempt is.
_N = r"\d{1,9}"
_PRODUCT = rf"(({_N})\*({_N})=({_N}))"
_COLUMN = rf"{_N}\+{_N}(?:\+{_N})?={_N}"
_ATTEMPT = {"a+b*c": re.compile(rf"\s*{_PRODUCT},{_N}\+{_N}={_N}\s*"),
            "a*b+c*d": re.compile(rf"\s*{_PRODUCT},{_PRODUCT},{_N}\+{_N}={_N}\s*"),
            "a*b+c*d/columns": re.compile(rf"\s*{_PRODUCT},{_PRODUCT},(?:{_COLUMN},){{1,9}}{_N}\+{_N}={_N}\s*")}


def worked_answer(a: int, b: int, c: int, d: int | None = None, *, columns: bool = False) -> str:
  """The reference scratchpad: the products first (precedence), then the sum; `a+b*c` for three operands,
  `a*b+c*d` for four, with `columns` the sum's column steps before it."""
  if d is None:
    return f"{b}*{c}={b * c},{a}+{b * c}={a + b * c}"
  return f"{a}*{b}={a * b},{c}*{d}={c * d},{_sum_steps(a * b, c * d, columns)}"


def _sum_steps(p: int, q: int, columns: bool) -> str:
  """`p+q=s`, after it with `columns` one step per column from the units: its two digits (0 past a number's
  length), the carry when there is one, and their sum (`6+4=10,5+5+1=11,56+54=110`)."""
  steps, carry = [], 0
  for i in range(max(len(str(p)), len(str(q))) if columns else 0):
    x, y = p // 10**i % 10, q // 10**i % 10
    steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={x + y + carry}")
    carry = (x + y + carry) // 10
  return ",".join([*steps, f"{p}+{q}={p + q}"])


def _kept_product(step: re.Match, group: int, x: int, y: int) -> str:
  """The attempt's product step `group` as written when its factors are x and y (either order) and its value
  right, else the step recomputed."""
  f, g, value = (int(step.group(group + i)) for i in (1, 2, 3))
  return step.group(group) if sorted((f, g)) == sorted((x, y)) and value == x * y else f"{x}*{y}={x * y}"


class ToyTask(base.Task):
  name = "toy"

  def __init__(self, *, seed: int = 0, form: str = "a+b*c", max_addend: int = 99, max_factor: int = 9,
               test_size: int | None = 2000, **kwargs):
    super().__init__(test_size=test_size, **kwargs)
    if form not in FORMS:
      raise ValueError(f"toy task: unknown form {form!r}; known: {FORMS}")
    if max_addend < 0 or max_factor < 1:
      raise ValueError(f"toy task needs max_addend >= 0 and max_factor >= 1, got {max_addend}, {max_factor}")
    self.seed = seed
    self.form = form
    self._columns = form == "a*b+c*d/columns"
    self.max_addend = max_addend
    self.max_factor = max_factor
    factors = range(1, max_factor + 1)
    if form == "a+b*c":
      self._space = list(itertools.product(range(max_addend + 1), factors, factors))
    else:
      self._space = list(itertools.product(factors, factors, factors, factors))
    random.Random(seed).shuffle(self._space)
    num_test = len(self._space) if test_size is None else test_size
    needed = num_test + self.dev_size + 1
    if needed > len(self._space):
      raise ValueError(f"toy task: test_size {num_test} + dev_size {self.dev_size} + at least one training "
                       f"problem exceed the {len(self._space)} distinct problems; raise "
                       f"{'max_addend' if form == 'a+b*c' else 'max_factor'}")
    self._num_test = num_test

  def answer_space_size(self) -> int:
    """How many distinct answers the problems have (the chance level of a uniform guesser is 1 / this)."""
    products = {b * c for b in range(1, self.max_factor + 1) for c in range(1, self.max_factor + 1)}
    addends = range(self.max_addend + 1) if self.form == "a+b*c" else products
    return len({a + p for a in addends for p in products})

  def repair(self, question: str, attempt: str, reference: str) -> str | None:
    """The attempt corrected step by step: a product step with the question's factors (either order) and the
    right value is kept as written, a wrong one is recomputed, and the sum (with its column steps) is recomputed
    from the products (`a+b*c`: `b*c=P,a+P=S`; `a*b+c*d`: `a*b=P,c*d=Q,P+Q=S`). None for an attempt not of the
    form's shape."""
    del reference  # the question holds the operands
    q, m = _QUESTION[self.form].fullmatch(question.strip()), _ATTEMPT[self.form].fullmatch(attempt)
    if q is None or m is None:
      return None
    ops = [int(x) for x in q.groups()]
    if self.form == "a+b*c":
      a, b, c = ops
      step = _kept_product(m, 1, b, c)
      return f"{step},{a}+{b * c}={a + b * c}"
    a, b, c, d = ops
    return f"{_kept_product(m, 1, a, b)},{_kept_product(m, 5, c, d)},{_sum_steps(a * b, c * d, self._columns)}"

  def _load_source_split(self, split: str) -> list[base.Problem]:
    operands = self._space[:self._num_test] if split == "test" else self._space[self._num_test:]
    if self.form == "a+b*c":
      return [base.Problem(id=f"toy/{split}/{i}", question=f"{a}+{b}*{c}", reference=worked_answer(a, b, c),
                           meta={"a": a, "b": b, "c": c})
              for i, (a, b, c) in enumerate(operands)]
    return [base.Problem(id=f"toy/{split}/{i}", question=f"{a}*{b}+{c}*{d}",
                         reference=worked_answer(a, b, c, d, columns=self._columns),
                         meta={"a": a, "b": b, "c": c, "d": d})
            for i, (a, b, c, d) in enumerate(operands)]

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
