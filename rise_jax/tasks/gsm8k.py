"""GSM8K (Cobbe et al. 2021): grade-school word problems; the reference answer ends in "#### N".

Default source: the hub's `openai/gsm8k` (config `main`) for both splits; any local jsonl with `question` and
`answer` fields works too, e.g. ../shared/data/gsm8k/{train,test}.jsonl (7,473 / 1,319 problems).
"""

from __future__ import annotations

import re

from rise_jax.tasks import base

HUB_SOURCE = "openai/gsm8k:main"
_CALCULATOR = re.compile(r"<<[^<>]*>>")   # the dataset's calculator annotations: "48/2 = <<48/2=24>>24"
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
FIELDS = ("question", "answer")


class GSM8KTask(base.Task):
  name = "gsm8k"

  def __init__(self, *, train_source: str | None = None, test_source: str | None = None, **kwargs):
    super().__init__(**kwargs)
    self.sources = {"train": train_source or HUB_SOURCE, "test": test_source or HUB_SOURCE}

  def solution(self, problem: base.Problem) -> str:
    """The worked reference without calculator annotations, its "#### N" line as the instruction's
    "\\boxed{N}" (the paper grader reads only boxes: the raw reference scores -1 there)."""
    text = _CALCULATOR.sub("", problem.reference)
    match = _FINAL.search(text)
    if match is None:
      return text
    return f"{text[:match.start()].rstrip()}\nThe answer is \\boxed{{{match.group(1).replace(',', '')}}}."

  def _load_source_split(self, split: str) -> list[base.Problem]:
    records = base.load_records(self.sources[split], split, FIELDS)
    return base.problems_from_records(self.name, split, records, question="question", reference="answer")
