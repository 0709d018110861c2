"""MATH (Hendrycks et al. 2021): competition problems; the reference is the solution with a `\\boxed{}` answer.

Default sources: train from the hub's `EleutherAI/hendrycks_math` (its seven subject configs, concatenated);
test from the same hub dataset's full 5,000-problem test split. The paper evaluated on a 1,000-problem test
subset shipped with the reference code (here ../shared/data/math/test.jsonl): pass it as `test_source`. Local
jsonl records need `problem` and `solution`; `level` and `type` are kept in `Problem.meta` when present.
"""

from __future__ import annotations

from rise_jax.tasks import base

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")
HUB_SOURCE = "EleutherAI/hendrycks_math:" + ",".join(SUBJECTS)
FIELDS = ("problem", "solution")


class MATHTask(base.Task):
  name = "math"

  def __init__(self, *, train_source: str | None = None, test_source: str | None = None, **kwargs):
    super().__init__(**kwargs)
    self.sources = {"train": train_source or HUB_SOURCE, "test": test_source or HUB_SOURCE}

  def _load_source_split(self, split: str) -> list[base.Problem]:
    records = base.load_records(self.sources[split], split, FIELDS)
    return base.problems_from_records(self.name, split, records, question="problem", reference="solution",
                                      meta_fields=("level", "type"))
