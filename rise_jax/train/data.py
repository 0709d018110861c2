"""`rise_jax.sft/1` records -> tokenised examples -> a seeded batch plan -> per-host rows of global batches.

Each conversation is rendered once through `rise_jax.chat` (the loss mask comes from its assistant spans, never
from re-tokenising pieces). The plan (which examples form each optimiser step, in which rows, padded to which
length) is a pure function of the seed and the example lengths, so every host computes the same plan; a host
then materialises only the rows its devices hold and `jax.make_array_from_process_local_data` assembles the
global array. Steps are padded to the mesh multiple with weightless rows; the loss normaliser of each step is
computed here, for the whole global batch (`loss.normalizer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from rise_jax import chat
from rise_jax.config import MAX_EXAMPLE_WEIGHT
from rise_jax.tasks.base import decode_line
from rise_jax.train import loss as loss_lib

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MIN_BUCKET = 16
# Steps of a megabatch (this many steps of examples) are sorted by length together, so a step's rows have
# similar lengths and little padding, while the step order stays random.
BUCKET_STEPS = 8


class RecordError(ValueError):
  """A malformed training record; the message names file, line (or record index) and field."""


@dataclasses.dataclass(frozen=True)
class Record:
  id: str
  weight: float
  messages: tuple[Mapping[str, Any], ...]
  where: str            # "file:line" or "records[i]", for error messages


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenised record: `targets[t]` is the token after `input_ids[t]`; `loss_mask[t]` marks trained ones."""
  id: str
  weight: float
  input_ids: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray

  @property
  def length(self) -> int:
    return len(self.input_ids)


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating records.
# ---------------------------------------------------------------------------------------------------------------

def _fail(where: str, field: str, msg: str):
  raise RecordError(f"{where}: field {field!r}: {msg}")


def parse_record(obj: Any, where: str) -> Record:
  """Validate one decoded record (docs/contracts.md §4)."""
  if not isinstance(obj, Mapping):
    raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
  for field in ("id", "weight", "messages"):
    if field not in obj:
      _fail(where, field, "missing")
  if not isinstance(obj["id"], str) or not obj["id"]:
    _fail(where, "id", f"must be a non-empty string, got {obj['id']!r}")
  weight = obj["weight"]
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    _fail(where, "weight", f"must be a number, got {weight!r}")
  if not math.isfinite(weight) or not 0 <= weight <= MAX_EXAMPLE_WEIGHT:
    _fail(where, "weight", f"must be finite and in [0, {MAX_EXAMPLE_WEIGHT:g}] (larger weights overflow float32 "
          f"training state), got {weight!r} (record {obj['id']!r})")
  messages = obj["messages"]
  if not isinstance(messages, list) or not messages:
    _fail(where, "messages", "must be a non-empty list")
  for i, m in enumerate(messages):
    field = f"messages[{i}]"
    if not isinstance(m, Mapping):
      _fail(where, field, "must be an object")
    if "role" not in m:
      _fail(where, f"{field}.role", "missing")
    if m["role"] not in ROLES:
      _fail(where, f"{field}.role", f"{m['role']!r} is not one of {list(ROLES)}")
    if not isinstance(m.get("content"), str):
      _fail(where, f"{field}.content", "missing or not a string")
    if m.get("train") is not None:  # parquet gives every message every column: None means absent
      if not isinstance(m["train"], bool):
        _fail(where, f"{field}.train", f"must be true or false, got {m['train']!r}")
      if m["train"] and m["role"] != "assistant":
        _fail(where, f"{field}.train", "only assistant messages can be trained")
  if not any(m["role"] == "assistant" for m in messages):
    _fail(where, "messages", "has no assistant message to train")
  return Record(obj["id"], float(weight), tuple(messages), where)


def check_weights(records: Sequence[Record], source: str) -> None:
  """Every weight 0 trains nothing (loss 0, no update): an error, not a silent no-op."""
  if records and not any(r.weight > 0 for r in records):
    raise RecordError(f"{source}: field 'weight': every one of the {len(records)} records has weight 0, so "
                      "training would change nothing")


def _data_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_dir():
    files = sorted([*path.glob("*.jsonl"), *path.glob("*.parquet")])
    if not files:
      raise FileNotFoundError(f"{path}: no *.jsonl or *.parquet training files")
    return files
  if not path.is_file():
    raise FileNotFoundError(f"training data {path} does not exist")
  return [path]


def read_records(path: str | pathlib.Path) -> list[Record]:
  """Records from a jsonl or parquet file, or a directory of them (e.g. a collection's `data/`).

  jsonl is parsed line by line here (not through `datasets`) so that every error names its line; parquet is
  read with `datasets` and errors name the row.
  """
  records = []
  for file in _data_files(pathlib.Path(path)):
    if file.suffix == ".parquet":
      import datasets  # heavy; only for parquet
      for i, row in enumerate(datasets.Dataset.from_parquet(str(file))):
        records.append(parse_record(row, f"{file}:row {i}"))
      continue
    with open(file, "rb") as f:
      for n, raw in enumerate(f, 1):
        try:
          line = decode_line(raw, file, n)
        except ValueError as e:
          raise RecordError(str(e)) from None
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError(f"{file}:{n}: bad JSON ({e.msg} at column {e.colno})") from None
        records.append(parse_record(obj, f"{file}:{n}"))
  return records


def as_records(records_or_path: str | pathlib.Path | Iterable[Any]) -> list[Record]:
  """A path, or records already in memory (dicts from collection, or `Record`s) -> validated `Record`s."""
  if isinstance(records_or_path, (str, pathlib.Path)):
    return read_records(records_or_path)
  return [r if isinstance(r, Record) else parse_record(r, f"records[{i}]")
          for i, r in enumerate(records_or_path)]


# ---------------------------------------------------------------------------------------------------------------
# Tokenising through the chat layer.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EncodeReport:
  """What tokenisation skipped, by reason (never silently)."""
  total: int = 0
  kept: int = 0
  skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, record: Record):
    self.skipped.setdefault(reason, []).append(f"{record.id} ({record.where})")

  def summary(self) -> str:
    parts = [f"{len(v)} {k}" for k, v in sorted(self.skipped.items())]
    return f"{self.kept}/{self.total} records kept" + (f"; skipped: {', '.join(parts)}" if parts else "")


def encode_records(records: Sequence[Record], tokenizer, max_length: int,
                   on_truncation: str = "report") -> tuple[list[Example], EncodeReport]:
  """Render every record once; count (or raise on) those whose trained span is cut or whose mask is empty."""
  report = EncodeReport(total=len(records))
  examples = []
  for record in records:
    try:
      input_ids, targets, loss_mask = chat.train_arrays(tokenizer, list(record.messages), max_length=max_length)
    except chat.TruncationError as e:
      if on_truncation == "raise":
        raise RecordError(f"{record.where}: record {record.id!r}: {e}") from None
      report.skip("truncated", record)
      continue
    except chat.ChatTemplateError as e:
      raise RecordError(f"{record.where}: record {record.id!r}: field 'messages': {e}") from None
    if not np.any(loss_mask):
      if on_truncation == "raise":
        raise RecordError(f"{record.where}: record {record.id!r}: empty loss mask")
      report.skip("empty_mask", record)
      continue
    examples.append(Example(record.id, record.weight, np.asarray(input_ids, np.int32),
                            np.asarray(targets, np.int32), np.asarray(loss_mask, np.float32)))
  report.kept = len(examples)
  return examples, report


# ---------------------------------------------------------------------------------------------------------------
# The batch plan (identical on every host) and per-host materialisation.
# ---------------------------------------------------------------------------------------------------------------

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def bucket_length(n: int, max_length: int, per_octave: int = 1) -> int:
  """Padded length: `n` rounded up to one of `per_octave` evenly spaced lengths of its octave (1: the next power of
  two; 4: ..., 32, 40, 48, 56, 64, 80, ...), at least MIN_BUCKET, a multiple of 8, capped at max_length.

  Each length is one compiled step: more buckets per octave trade compiles for padding (worst case 2x at 1,
  1.25x at 4; the toy's 33-token examples pad to 40 instead of 64).
  """
  n = max(int(n), MIN_BUCKET)
  octave_top = 1 << (n - 1).bit_length()
  step = max(octave_top // 2 // per_octave, 8)
  return min(max_length, -(-n // step) * step)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """One optimiser step: `rows[m][r]` are the example indices packed into row r of micro-batch m (() = padding)."""
  epoch: int
  rows: tuple[tuple[tuple[int, ...], ...], ...]
  length: int

  @property
  def shape(self) -> tuple[int, int, int]:
    return (len(self.rows), len(self.rows[0]), self.length)

  @property
  def example_ids(self) -> list[int]:
    return [e for micro in self.rows for row in micro for e in row]


def _pack(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """First-fit decreasing into rows of `capacity` tokens (deterministic: ties keep the given order)."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(indices, key=lambda i: -lengths[i]):
    for r, space in enumerate(free):
      if lengths[i] <= space:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(capacity - lengths[i])
  return rows


def plan_epoch(lengths: Sequence[int], *, epoch: int, seed: int, global_batch: int, micro_batch: int,
               row_multiple: int, max_length: int, packing: bool, buckets_per_octave: int = 1) -> list[StepPlan]:
  """The steps of one epoch: `global_batch` examples each (the last may have fewer, padded with empty rows)."""
  lengths = [int(x) for x in lengths]
  n = len(lengths)
  if n == 0:
    return []
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(n)
  groups = []
  for start in range(0, n, global_batch * BUCKET_STEPS):
    mega = order[start:start + global_batch * BUCKET_STEPS]
    mega = mega[np.argsort([lengths[i] for i in mega], kind="stable")]
    groups.extend(mega[s:s + global_batch] for s in range(0, len(mega), global_batch))
  groups = [groups[i] for i in rng.permutation(len(groups))]
  num_micro = global_batch // micro_batch
  steps = []
  for group in groups:
    group = [int(i) for i in group]
    if packing:
      rows = _pack(group, lengths, max_length)
      rows_per_micro = _round_up(1 << max(-(-len(rows) // num_micro) - 1, 0).bit_length(), row_multiple)
      length = max_length
    else:
      rows = [[i] for i in group]
      rows_per_micro = _round_up(micro_batch, row_multiple)
      length = bucket_length(max(lengths[i] for i in group), max_length, buckets_per_octave)
    rows += [[] for _ in range(num_micro * rows_per_micro - len(rows))]
    micro = tuple(tuple(tuple(r) for r in rows[m * rows_per_micro:(m + 1) * rows_per_micro])
                  for m in range(num_micro))
    steps.append(StepPlan(epoch, micro, length))
  return steps


def plan(lengths: Sequence[int], *, epochs: int, **kwargs) -> list[StepPlan]:
  """Every step of the run; a resumed run indexes this list with its restored step (the data position)."""
  return [s for e in range(epochs) for s in plan_epoch(lengths, epoch=e, **kwargs)]


def chunk_plan(steps: Sequence[StepPlan], start: int, max_steps: int, boundaries: Iterable[int]) -> list[range]:
  """Consecutive steps from `start` grouped into device calls of `max_steps` steps or a power of two below it.

  A call never crosses a boundary (checkpoint steps, a profile window: the state must exist there) nor a change
  of batch shape (padding steps to a common length cost more than the calls it saved: docs/benchmarks.md). Each
  call length and shape is one compiled program, hence the few lengths. Boundaries include every checkpoint
  step, so a run resumed from one groups the remaining steps exactly as the uninterrupted run did.
  """
  cuts = {b for b in boundaries if start < b < len(steps)}
  calls, begin = [], start
  for i in range(start + 1, len(steps) + 1):
    if i == len(steps) or i in cuts or steps[i].shape != steps[begin].shape:
      while begin < i:
        n = min(i - begin, max_steps)
        n = n if n == max_steps else 1 << (n.bit_length() - 1)
        calls.append(range(begin, begin + n))
        begin += n
  return calls


@dataclasses.dataclass(frozen=True)
class StepStats:
  """Host-side facts about a global batch (from the plan, identical on every host)."""
  normalizer: float
  sum_weights: float
  examples: int
  trained_tokens: int
  tokens: int           # real (non-padding) input tokens


def step_stats(step: StepPlan, examples: Sequence[Example], estimator: str) -> StepStats:
  ids = step.example_ids
  w = np.array([examples[i].weight for i in ids])
  n = np.array([examples[i].loss_mask.sum() for i in ids])
  return StepStats(loss_lib.normalizer(estimator, w, n), float(w.sum()), len(ids), int(n.sum()),
                   int(sum(examples[i].length for i in ids)))


def materialize(step: StepPlan, examples: Sequence[Example], estimator: str, rows: Sequence[int] | slice,
                pad_id: int = 0) -> dict[str, np.ndarray]:
  """Arrays [micro, len(rows), length] for the selected row indices of every micro-batch (this host's rows).

  input_ids, targets, positions (restarting in each packed example), segment_ids (0 = padding, 1.. = the
  examples of a row) and weights (the per-token a_t of the estimator, packing-aware).
  """
  num_micro, rows_per_micro, length = step.shape
  selected = list(range(rows_per_micro))[rows] if isinstance(rows, slice) else list(rows)
  shape = (num_micro, len(selected), length)
  out = {"input_ids": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
         "positions": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32)}
  mask = np.zeros(shape, np.float32)
  tok_w = np.zeros(shape, np.float32)
  for m in range(num_micro):
    for j, r in enumerate(selected):
      start = 0
      for s, e in enumerate(step.rows[m][r], 1):
        ex = examples[e]
        end = start + ex.length
        out["input_ids"][m, j, start:end] = ex.input_ids
        out["targets"][m, j, start:end] = ex.targets
        out["positions"][m, j, start:end] = np.arange(ex.length)
        out["segment_ids"][m, j, start:end] = s
        mask[m, j, start:end] = ex.loss_mask
        tok_w[m, j, start:end] = ex.weight
        start = end
  flat = lambda x: x.reshape(-1, length)
  out["weights"] = loss_lib.token_weights(flat(mask), flat(tok_w), estimator,
                                          segment_ids=flat(out["segment_ids"])).reshape(shape)
  return out


def host_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> slice:
  """The contiguous block of rows (axis 1) that this process's devices hold under `sharding`."""
  spans = {idx[1].indices(global_shape[1])[:2] for idx in
           sharding.addressable_devices_indices_map(tuple(global_shape)).values()}
  start, stop = min(s for s, _ in spans), max(e for _, e in spans)
  covered = sum(e - s for s, e in spans)
  if covered != stop - start:
    raise ValueError(f"this process's rows {sorted(spans)} are not contiguous; reorder the mesh devices so each "
                     "process holds one block of the batch axis")
  return slice(start, stop)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                 global_shape: Sequence[int]) -> dict[str, jax.Array]:
  """Assemble the global arrays from this process's rows."""
  return {k: jax.make_array_from_process_local_data(sharding, v, tuple(global_shape)) for k, v in local.items()}
