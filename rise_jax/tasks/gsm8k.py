"""GSM8K (Cobbe et al. 2021): grade-school word problems; the reference answer ends in "#### N".

Default source: the hub's `openai/gsm8k` (config `main`) for both splits; any local jsonl with `question` and
`answer` fields works too, e.g. ../shared/data/gsm8k/{train,test}.jsonl (7,473 / 1,319 problems).
"""

from __future__ import annotations

from rise_jax.tasks import base

HUB_SOURCE = "openai/gsm8k:main"
FIELDS = ("question", "answer")


class GSM8KTask(base.Task):
  name = "gsm8k"

  def __init__(self, *, train_source: str | None = None, test_source: str | None = None, **kwargs):
    super().__init__(**kwargs)
    self.sources = {"train": train_source or HUB_SOURCE, "test": test_source or HUB_SOURCE}

  def _load_source_split(self, split: str) -> list[base.Problem]:
    records = base.load_records(self.sources[split], split, FIELDS)
    return base.problems_from_records(self.name, split, records, question="question", reference="answer")
