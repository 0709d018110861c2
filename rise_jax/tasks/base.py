"""What every task shares: the Problem record, the Task interface, and loading problems from jsonl or the hub.

A source is a local `.jsonl` / `.json` file or a hub dataset `"owner/name"` (optionally `"owner/name:config"`,
several configs comma-separated and concatenated in the order given). Local lines are validated: an unreadable
line or a missing field is an error naming the file, the line and the field. The dev split is carved from train
with a fixed seed and keeps the train ids ("gsm8k/train/17"), so ids are stable whatever `dev_size` is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from typing import Any, Iterable, Sequence

from rise_jax.tasks import graders

SPLITS = ("train", "dev", "test")
DEV_SEED = 0


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str            # "<task>/<source split>/<index in the source>", e.g. "gsm8k/test/17"
  question: str      # the text shown to the model
  reference: str     # the dataset's own answer field (GSM8K answer, MATH solution, toy scratchpad)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_jsonl(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
  """Records of a jsonl file, each checked for `fields` (string values); errors name file, line and field."""
  records = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      line = decode_line(raw, path, line_no)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
      for field in fields:
        if field not in record:
          raise ValueError(f"{path}:{line_no}: missing field {field!r}")
        if not isinstance(record[field], str):
          raise ValueError(f"{path}:{line_no}: field {field!r} must be a string, got "
                           f"{type(record[field]).__name__}")
      records.append(record)
  if not records:
    raise ValueError(f"{path}: holds no records (an empty task file)")
  return records


def decode_line(raw: bytes, path, line_no: int) -> str:
  """One line of a UTF-8 text file; an invalid byte is an error naming file, line and column."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") \
        from None


def is_local(source: str) -> bool:
  return os.path.exists(source) or source.endswith((".jsonl", ".json"))


def load_records(source: str, split: str, fields: Sequence[str]) -> list[dict[str, Any]]:
  """Records of `source` (local file, or hub dataset split `split`), each with every field in `fields`."""
  if is_local(source):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"task source {source!r} does not exist")
    return read_jsonl(source, fields)
  import datasets  # Only hub sources pay for the import.

  name, _, configs = source.partition(":")
  records = []
  for config in (configs.split(",") if configs else [None]):
    rows = datasets.load_dataset(name, config, split=split)
    for index, row in enumerate(rows):
      for field in fields:
        if field not in row:
          raise ValueError(f"{source} (config {config}, split {split}) row {index}: missing field {field!r}")
      records.append(dict(row))
  return records


def split_dev(items: Sequence[Any], dev_size: int, seed: int = DEV_SEED) -> tuple[list[Any], list[Any]]:
  """(train, dev): `dev_size` items drawn with a fixed seed, both kept in source order."""
  if dev_size > len(items):
    raise ValueError(f"dev_size {dev_size} exceeds the {len(items)} training problems")
  dev_index = set(random.Random(seed).sample(range(len(items)), dev_size))
  train = [x for i, x in enumerate(items) if i not in dev_index]
  dev = [x for i, x in enumerate(items) if i in dev_index]
  return train, dev


class Task:
  """A task: problems per split plus the answer checker of its grader module."""

  name: str = ""

  def __init__(self, *, dev_size: int = 200, dev_seed: int = DEV_SEED, train_size: int | None = None,
               test_size: int | None = None):
    self.dev_size = dev_size
    self.dev_seed = dev_seed
    self.train_size = train_size
    self.test_size = test_size
    self._cache: dict[str, list[Problem]] = {}
    self.excluded: dict[str, list[str]] = {}  # source split -> ids dropped for an ungradable reference

  # -- problems ------------------------------------------------------------------------------------------
  def load(self, split: str) -> list[Problem]:
    """Problems of "train" (minus dev), "dev" (carved from train) or "test"; caps apply to train and test."""
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    if split not in self._cache:
      if split == "test":
        self._cache["test"] = self._cap(self._gradable("test"), self.test_size)
      else:
        train, dev = split_dev(self._gradable("train"), self.dev_size, self.dev_seed)
        self._cache["train"], self._cache["dev"] = self._cap(train, self.train_size), dev
    return self._cache[split]

  def _gradable(self, split: str) -> list[Problem]:
    """The source split minus problems whose reference has no answer to grade against, counted and logged
    (hub data cannot be fixed by the user; a local file can, and the ids say which lines)."""
    kept, excluded = [], []
    for problem in self._load_source_split(split):
      try:
        self.reference_answer(problem.reference, "robust")
        kept.append(problem)
      except ValueError:
        excluded.append(problem.id)
    self.excluded[split] = excluded
    if excluded:
      logging.warning("%s: excluded %d %s problem(s) whose reference has no gradable answer: %s", self.name,
                      len(excluded), split, ", ".join(excluded[:10]) + (" ..." if len(excluded) > 10 else ""))
    return kept

  @staticmethod
  def _cap(problems: list[Problem], size: int | None) -> list[Problem]:
    return problems if size is None else problems[:size]

  def _load_source_split(self, split: str) -> list[Problem]:
    """All problems of the source's "train" or "test" split, in source order."""
    raise NotImplementedError

  def solution(self, problem: Problem) -> str:
    """The reference as an answer to the problem, written the way the prompt sets ask for one (what a boost on
    reference solutions and the reference teacher put in the assistant turn); the reference itself by default."""
    return problem.reference

  def repair(self, question: str, attempt: str, reference: str) -> str | None:
    """A correction of a failed `attempt` that keeps its right steps, fixes the first wrong one and recomputes what
    follows (the `repair` teacher's reply); None: this task cannot repair it (the teacher then gives the reference
    solution). The base task has no exact repair; a task that has one overrides this."""
    del question, attempt, reference
    return None

  # -- grading -------------------------------------------------------------------------------------------
  @property
  def grader(self):
    return graders.get_grader(self.name)

  def extract_answer(self, response: str, mode: str = "robust") -> str | None:
    """The answer a response states, normalised so that `answers_equivalent` can compare it; None if none."""
    return self.grader.extract_answer(response, graders.check_mode(mode))

  def reference_answer(self, reference: str, mode: str = "robust") -> str | None:
    return self.grader.reference_answer(reference, graders.check_mode(mode))

  def grade(self, response: str, reference: str, mode: str = "robust") -> float:
    return self.grader.grade(response, reference, graders.check_mode(mode))

  def answers_equivalent(self, a: str | None, b: str | None, mode: str = "robust") -> bool:
    """Whether two `extract_answer` outputs are the same answer (majority-vote clustering)."""
    return self.grader.answers_equivalent(a, b, graders.check_mode(mode))


def problems_from_records(task: str, split: str, records: Iterable[dict[str, Any]], question: str,
                          reference: str, meta_fields: Sequence[str] = ()) -> list[Problem]:
  return [Problem(id=f"{task}/{split}/{i}", question=r[question], reference=r[reference],
                  meta={k: r[k] for k in meta_fields if k in r})
          for i, r in enumerate(records)]
