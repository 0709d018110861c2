"""The rollout log (`rise_jax.rollout/2`, docs/contracts.md §3): write, resume, read and validate episode records.

A log is jsonl: one header line, then one record per episode, appended and flushed one at a time so that a
crash loses at most the episode being written. A crash mid-write leaves a *torn* last line (no trailing newline,
not valid JSON); readers ignore it and count it, and a writer reopening the file for resume truncates it.
Everything the metrics need is in the records, so metrics can be recomputed offline from the log alone.

Optional fields of contracts §3 (docs/contracts.md §3, "Optional fields"):
  turn.prefill_tokens / turn.decode_tokens  tokens actually prefilled / decoded for that turn, or null when unknown
                                             (compute accounting; readers fall back to history_tokens / the sum
                                             of num_tokens).
  candidate.num_tokens may be null for a teacher candidate (no token ids, no usage count).
  candidate.grader_error (string): the grader raised on this sample; its reward is 0 and its answer null.
Unknown extra fields (the runner's `question`, `protocol.turns`, `candidate.flagged_degenerate`, ...) are kept as they are.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import pathlib
from typing import Any, Mapping

from rise_jax import provenance
from rise_jax.rollout.protocol import KINDS, SELECTIONS

# /2: the same record format as /1; rise_jax.evaluate's seeds changed to the one evaluation seed rule
# (rise.algorithm.eval_seed), so a /1 log of rise_jax.evaluate holds samples /2 code would not draw. Both are read.
SCHEMA = "rise_jax.rollout/2"
READABLE_SCHEMAS = ("rise_jax.rollout/1", SCHEMA)
HEADER_FIELDS = ("schema", "config_hash", "versions", "git_commit", "model", "created")
FINISH_REASONS = ("stop", "length", "cache_full")
STOPS = ("max_turns", "oracle_success")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens")


class RolloutLogError(ValueError):
  """A rollout log or record that breaks contracts §3; the message names file, line and field."""


# ----------------------------------------------------------------------------------------------- validation


def _fail(where: str, field: str, msg: str):
  raise RolloutLogError(f"{where}: field {field!r}: {msg}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _require(obj: Mapping, key: str, where: str, prefix: str, check, expected: str):
  field = f"{prefix}{key}"
  if key not in obj:
    _fail(where, field, "missing")
  if not check(obj[key]):
    _fail(where, field, f"expected {expected}, got {obj[key]!r:.80}")
  return obj[key]


def _is_str(x) -> bool:
  return isinstance(x, str)


def _is_opt(check):
  return lambda x: x is None or check(x)


def _is_nonneg_int(x) -> bool:
  return _is_int(x) and x >= 0


def _one_of(choices):
  return lambda x: x in choices


def validate_header(header: Any, where: str) -> dict:
  """Check a header line; returns it. `where` is e.g. "runs/x/rollouts.jsonl:1"."""
  if not isinstance(header, dict):
    raise RolloutLogError(f"{where}: header must be a JSON object, got {type(header).__name__}")
  _require(header, "schema", where, "", lambda s: s in READABLE_SCHEMAS, f"one of {READABLE_SCHEMAS}")
  _require(header, "config_hash", where, "", _is_str, "a string")
  _require(header, "versions", where, "", lambda v: isinstance(v, dict), "an object")
  _require(header, "git_commit", where, "", _is_opt(_is_str), "a string or null")
  _require(header, "model", where, "", lambda m: True, "any")
  _require(header, "created", where, "", _is_str, "an ISO-8601 string")
  return header


def _validate_candidate(c: Any, where: str, prefix: str):
  if not isinstance(c, dict):
    _fail(where, prefix.rstrip("."), "expected an object")
  _require(c, "text", where, prefix, _is_str, "a string")
  token_ids = _require(c, "token_ids", where, prefix,
                       _is_opt(lambda t: isinstance(t, list) and all(_is_nonneg_int(i) for i in t)),
                       "a list of token ids or null (teacher)")
  _require(c, "logprob_sum", where, prefix, _is_opt(lambda x: _is_number(x) and x <= 1e-6), "a number <= 0 or null")
  num_tokens = _require(c, "num_tokens", where, prefix, _is_opt(_is_nonneg_int), "an int >= 0 (or null for a teacher)")
  if num_tokens is None and token_ids is not None:
    _fail(where, f"{prefix}num_tokens", "null while token_ids is given")
  if token_ids is not None and len(token_ids) != num_tokens:
    _fail(where, f"{prefix}num_tokens", f"{num_tokens} but token_ids has {len(token_ids)} ids")
  _require(c, "finish_reason", where, prefix, _one_of(FINISH_REASONS), f"one of {list(FINISH_REASONS)}")
  _require(c, "answer", where, prefix, _is_opt(_is_str), "a string or null (unparsable)")
  _require(c, "reward", where, prefix, _is_number, "a finite number")
  _require(c, "resamples", where, prefix, _is_nonneg_int, "an int >= 0")


def _validate_turn(turn: Any, index: int, where: str):
  prefix = f"turns[{index}]."
  if not isinstance(turn, dict):
    _fail(where, f"turns[{index}]", "expected an object")
  _require(turn, "t", where, prefix, lambda t: t == index + 1, f"turn number {index + 1} (turns in order from 1)")
  _require(turn, "policy", where, prefix, _is_str, "a string")
  _require(turn, "history_tokens", where, prefix, _is_nonneg_int, "an int >= 0")
  _require(turn, "window_applied", where, prefix, lambda x: isinstance(x, bool), "a bool")
  sampling = _require(turn, "sampling", where, prefix, lambda s: isinstance(s, dict), "an object")
  for key in SAMPLING_FIELDS:
    _require(sampling, key, where, f"{prefix}sampling.", _is_opt(_is_number), "a number or null")
  candidates = _require(turn, "candidates", where, prefix, lambda c: isinstance(c, list) and c,
                        "a non-empty list")
  for j, c in enumerate(candidates):
    _validate_candidate(c, where, f"{prefix}candidates[{j}].")
  _require(turn, "chosen", where, prefix, lambda x: _is_int(x) and 0 <= x < len(candidates),
           f"an index into the {len(candidates)} candidates")
  _require(turn, "feedback", where, prefix, _is_opt(_is_str), "a string or null")
  for key in ("prefill_tokens", "decode_tokens"):
    if key in turn:
      _require(turn, key, where, prefix, _is_opt(_is_nonneg_int), "an int >= 0 or null (unknown)")


def validate_record(record: Any, where: str) -> dict:
  """Check one episode record against contracts §3; returns it.

  Raises RolloutLogError naming `where` (file:line) and the dotted field, e.g.
  `rollouts.jsonl:7: field 'turns[1].candidates[0].reward': missing`. Beyond shapes it checks the episode's
  internal consistency: turns numbered 1..n, `chosen` in range, a parallel episode has one turn, and
  `stop == "oracle_success"` exactly when an oracle episode ended on its first correct turn.
  """
  if not isinstance(record, dict):
    raise RolloutLogError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
  _require(record, "problem_id", where, "", lambda s: _is_str(s) and s, "a non-empty string")
  _require(record, "task", where, "", _is_str, "a string")
  _require(record, "reference", where, "", _is_str, "a string")
  protocol = _require(record, "protocol", where, "", lambda p: isinstance(p, dict), "an object")
  kind = _require(protocol, "kind", where, "protocol.", _one_of(KINDS), f"one of {list(KINDS)}")
  oracle = _require(protocol, "oracle", where, "protocol.", lambda x: isinstance(x, bool), "a bool")
  _require(protocol, "window", where, "protocol.", _is_opt(lambda w: _is_int(w) and w >= 1), "an int >= 1 or null")
  _require(protocol, "grader", where, "protocol.", _is_str, "a string")
  _require(protocol, "prompt_set", where, "protocol.", _is_str, "a string")
  _require(protocol, "select", where, "protocol.", _one_of(SELECTIONS), f"one of {list(SELECTIONS)}")
  _require(protocol, "seed", where, "protocol.", _is_int, "an int")
  turns = _require(record, "turns", where, "", lambda t: isinstance(t, list) and t, "a non-empty list")
  for i, turn in enumerate(turns):
    _validate_turn(turn, i, where)
  stop = _require(record, "stop", where, "", _one_of(STOPS), f"one of {list(STOPS)}")
  if kind == "parallel" and len(turns) != 1:
    _fail(where, "turns", f"a parallel episode has exactly one turn, got {len(turns)}")
  chosen_correct = [t["candidates"][t["chosen"]]["reward"] == 1.0 for t in turns]
  if stop == "oracle_success" and not (oracle and chosen_correct[-1]):
    _fail(where, "stop", "'oracle_success' needs protocol.oracle and a correct chosen candidate at the last turn")
  if oracle and any(chosen_correct[:-1]):
    _fail(where, "turns", "an oracle episode continued past a correct turn")
  if oracle and chosen_correct[-1] and stop != "oracle_success":
    _fail(where, "stop", "an oracle episode whose last turn is correct must stop with 'oracle_success'")
  return record


# -------------------------------------------------------------------------------------------------- reading


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
  """Complete (newline-terminated) lines, and the unterminated tail (b"" when the file ends with a newline)."""
  parts = data.split(b"\n")
  return parts[:-1], parts[-1]


def _parse(line: bytes, where: str) -> Any:
  try:
    return json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RolloutLogError(f"{where}: not valid JSON ({e})") from None


def _read(path: pathlib.Path, validate: bool) -> tuple[dict, list[dict], int, int]:
  """(header, records, num_torn_lines, byte length of the intact prefix)."""
  data = path.read_bytes()
  lines, tail = _split_lines(data)
  num_torn = 0
  intact = len(data) - len(tail)
  if tail.strip():
    # An unterminated last line is torn unless it happens to be a whole record (crash just before the newline).
    try:
      json.loads(tail)
      lines.append(tail)
      intact = len(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
      num_torn = 1
  if not lines:
    raise RolloutLogError(f"{path}:1: no header line (empty or torn file)")
  header = validate_header(_parse(lines[0], f"{path}:1"), f"{path}:1")
  records = []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      raise RolloutLogError(f"{path}:{number}: blank line inside the log")
    where = f"{path}:{number}"
    record = _parse(line, where)
    records.append(validate_record(record, where) if validate else record)
  return header, records, num_torn, intact


def read_rollouts(path: str | os.PathLike, *, validate: bool = True) -> tuple[dict, list[dict], int]:
  """Read a rollout log: (header, records, num_torn_lines).

  A torn last line (a crash mid-write) is ignored and counted; any other malformed line is an error naming the
  file, the line and the field.
  """
  header, records, num_torn, _ = _read(pathlib.Path(path), validate)
  return header, records, num_torn


# -------------------------------------------------------------------------------------------------- writing


def make_header(config_hash: str, model: Any, *, versions: dict | None = None,
                git_commit: str | None = None) -> dict:
  """A complete header; versions and git commit are filled in from the environment when not given."""
  return {
      "schema": SCHEMA,
      "config_hash": config_hash,
      "versions": provenance.package_versions() if versions is None else versions,
      "git_commit": provenance.git_commit() if git_commit is None else git_commit,
      "model": model,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


class RolloutWriter:
  """Appends episode records to a rollout log, one flushed (and fsynced) line per episode.

  A new (or empty) file gets `header` as its first line (`config_hash` and `model` are required; the other
  header fields default to `make_header`'s). An existing file is opened for resume: its header
  must carry the same schema and `config_hash` (else RolloutLogError naming both hashes), every record in it is
  validated, and a torn last line is truncated away (counted in `num_torn_lines`). `existing_ids()` tells the
  runner which problems are already done.
  """

  def __init__(self, path: str | os.PathLike, header: Mapping[str, Any], *, fsync: bool = True):
    self.path = pathlib.Path(path)
    header = dict(header)
    for key in ("config_hash", "model"):
      if key not in header:
        raise RolloutLogError(f"{self.path} (header to write): field {key!r}: missing")
    # schema, versions, git_commit and created are filled in from the environment when not given.
    header = make_header(header["config_hash"], header["model"], versions=header.get("versions"),
                         git_commit=header.get("git_commit")) | header
    self.header = validate_header(header, f"{self.path} (header to write)")
    self._fsync = fsync
    self._counts: collections.Counter[str] = collections.Counter()
    self._seeds: set[int] = set()
    self.num_torn_lines = 0
    if self.path.exists() and self.path.stat().st_size > 0 and not self._only_a_torn_header():
      self._open_for_resume()
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "wb")
      self._write_line(self.header)

  def _only_a_torn_header(self) -> bool:
    """A crash while writing the header line itself: nothing was logged, so the file starts over.

    Only a prefix of what this writer writes qualifies, so an unrelated file given by mistake is never replaced.
    """
    data = self.path.read_bytes()
    start = json.dumps({"schema": SCHEMA}, separators=(",", ":"))[:-1].encode()  # b'{"schema":"rise_jax.rollout/1"'
    if b"\n" in data or not (start.startswith(data) or data.startswith(start)):
      return False
    try:
      json.loads(data)
      return False
    except (json.JSONDecodeError, UnicodeDecodeError):
      self.num_torn_lines = 1
      return True

  def _open_for_resume(self):
    existing, records, self.num_torn_lines, intact = _read(self.path, validate=True)
    if existing["config_hash"] != self.header["config_hash"]:
      raise RolloutLogError(
          f"{self.path}:1: field 'config_hash': the log was written under config {existing['config_hash']}, "
          f"refusing to append under config {self.header['config_hash']}")
    self.header = existing
    self._counts.update(r["problem_id"] for r in records)
    self._seeds.update(r["protocol"]["seed"] for r in records)
    self._file = open(self.path, "r+b")
    self._file.truncate(intact)
    self._file.seek(intact)
    if intact and self._last_byte(intact) != b"\n":
      # The last record was whole but its newline was lost in the crash.
      self._file.write(b"\n")
      self._flush()

  def _last_byte(self, size: int) -> bytes:
    with open(self.path, "rb") as f:
      f.seek(size - 1)
      return f.read(1)

  def existing_ids(self) -> frozenset[str]:
    """Problem ids with at least one record in the file (from before this writer or written by it)."""
    return frozenset(self._counts)

  def existing_seeds(self) -> frozenset[int]:
    """The protocol seeds of the records already in the file (the runner refuses to mix seeds in one log)."""
    return frozenset(self._seeds)

  def count(self, problem_id: str) -> int:
    """Records for `problem_id` (several when a protocol runs independent draws of the same problem)."""
    return self._counts[problem_id]

  def __len__(self) -> int:
    return sum(self._counts.values())

  def write(self, record: Mapping[str, Any], *, validate: bool = True):
    """Append one episode record and make it durable before returning."""
    record = dict(record)
    if validate:
      validate_record(record, f"{self.path}:{len(self) + 2} (record to write)")
    self._write_line(record)
    self._counts[record["problem_id"]] += 1
    seed = (record.get("protocol") or {}).get("seed")
    if seed is not None:
      self._seeds.add(seed)

  def _write_line(self, obj: Mapping[str, Any]):
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
    self._file.write(line.encode("utf-8"))
    self._flush()

  def _flush(self):
    self._file.flush()
    if self._fsync:
      os.fsync(self._file.fileno())

  def close(self):
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> RolloutWriter:
    return self

  def __exit__(self, *exc):
    self.close()
