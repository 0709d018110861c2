"""A run directory's rules (docs/contracts.md §6): which config made it, which stages are done.

- `check_config`: a directory that holds results refuses a config with another identity (`config.identity`),
  naming the differing fields, before anything is written; one without results yet adopts the new config.
  `rise_jax.evaluate`'s output directory follows it.
- `RunDir.check`: the RISE loop's finer rule: each `DONE` marker records the fields its stage depends on
  (`plan.stage_fields`); a change to one a finished or started stage used is refused naming field and stage,
  any other is logged and recorded.
- `RunDir`: the RISE loop's directory: `config.json` and `run.json` (schema, versions, git commit, config hash) at
  the top, one directory per stage finished by an atomic `DONE` marker written last.
Writing goes through `rise_jax.files` (atomic writes, the one-writer lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

from rise_jax import config as config_lib
from rise_jax import files, provenance
from rise_jax.pipeline import plan as plan_lib
from rise_jax.files import LOCK_FILE, RunDirError

log = logging.getLogger(__name__)

RUN_SCHEMA = "rise_jax.run/1"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
DONE_FILE = "DONE"
DONE_HINT = "delete it and re-run the same command to redo that stage (it resumes from what it kept)"
# Top-level entries that are bookkeeping, not results: the config itself, the run record, the lock, and the toy
# tokenizer (a pure function of the code).
BOOKKEEPING = frozenset({CONFIG_FILE, RUN_FILE, LOCK_FILE, "tokenizer"})


DONE_DIGEST = "digest"  # sha256 of the marker's canonical JSON without this field, written with it


def done_digest(marker: dict[str, Any]) -> str:
  """The self-digest of a DONE marker: sha256 over its sorted, compact JSON without the digest field."""
  body = {k: v for k, v in marker.items() if k != DONE_DIGEST}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_done(path: str | os.PathLike) -> dict[str, Any]:
  """A DONE marker's record, verified against its self-digest (markers written before digests: trusted as read).
  An edited marker is an IntegrityError naming the file, as an edited export or dataset is."""
  path = pathlib.Path(path)
  marker = files.read_json(path, DONE_HINT)
  if not isinstance(marker, dict):
    raise files.CorruptFileError(f"{path}: expected a JSON object, got {type(marker).__name__}; {DONE_HINT}")
  recorded = marker.get(DONE_DIGEST)
  if recorded is not None and recorded != done_digest(marker):
    raise files.IntegrityError(f"{path}: field {DONE_DIGEST!r}: {str(recorded)[:16]}... is not the sha256 of the "
                               "marker's other fields: the marker was edited after the stage finished; "
                               f"{DONE_HINT}")
  return marker


def done_markers(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{stage name: its DONE marker} of every finished stage in a run directory, in the plan's or any other."""
  paths = list(root.glob(f"iter_*/*/{DONE_FILE}")) + list(root.glob(f"iter_*/control/*/{DONE_FILE}"))
  return {p.parent.relative_to(root).as_posix(): p for p in sorted(paths)}


STAGE_FIELDS = "config_fields"  # a DONE marker's {dotted field: value} of every field its outputs depend on
_ABSENT = object()


class ConfigMismatch(RunDirError):
  """The run directory holds results made by a different config."""


def _holds_files(path: pathlib.Path) -> bool:
  return path.is_dir() and any(p.is_file() for p in path.rglob("*"))


def holds_results(root: pathlib.Path) -> bool:
  """Whether any file besides the bookkeeping (config, run record, lock, toy tokenizer) exists under root."""
  for entry in root.iterdir():
    if entry.name in BOOKKEEPING:
      continue
    if entry.is_file() or _holds_files(entry):
      return True
  return False


def check_config(root: str | os.PathLike, config) -> dict[str, Any] | None:
  """The config saved in `root` when its results must be resumed under it; None when `root` has no config or no
  results yet (the caller writes `config`'s). Raises ConfigMismatch naming the differing fields. Writes nothing."""
  root = pathlib.Path(root)
  path = root / CONFIG_FILE
  if not path.is_file():
    return None
  saved = files.read_json(path)
  fields = config_lib.diff_fields(config_lib.identity(saved), config_lib.identity(config_lib.to_dict(config)))
  if not fields:
    return saved
  if not holds_results(root):
    log.warning("%s: no results yet; adopting the new config (differing fields: %s)", root, ", ".join(fields))
    return None
  raise ConfigMismatch(f"{root} holds results made by a different config; differing fields: {', '.join(fields)}. "
                       "Use another output_dir, or the original config, to resume.")


class RunDir:
  """The RISE loop's run directory: config.json and run.json at the top, one directory per stage with its DONE."""

  def __init__(self, root: str | os.PathLike, config):
    self.root = pathlib.Path(root)
    self.config = config
    self.hash = config_lib.config_hash(config)

  def check(self) -> bool:
    """Whether the directory holds results of this config and needs no rewrite (False: new, nothing in it yet, or
    config.json and run.json are to be written again: lost, or changed in fields no finished or started stage
    depends on, listed in `self.changed`). Raises ConfigMismatch naming each differing field and the stages that
    used it, IntegrityError naming an edited DONE marker. Writes nothing, so a refused config leaves no trace."""
    self.changed: list[str] = []
    if not self.root.is_dir():
      return False
    markers = {stage: read_done(path) for stage, path in done_markers(self.root).items()}
    config_path, run_json = self.root / CONFIG_FILE, self.root / RUN_FILE
    saved = files.read_json(config_path) if config_path.is_file() else None
    current = config_lib.to_dict(self.config)
    changed = None if saved is None else config_lib.diff_fields(config_lib.identity(saved),
                                                                  config_lib.identity(current))
    results = holds_results(self.root)
    if not results and (saved is None or changed):
      if changed:
        log.warning("%s: no results yet; adopting the new config (differing fields: %s)", self.root,
                    ", ".join(changed))
      return False
    if not run_json.is_file():
      if saved is None:
        raise ConfigMismatch(f"{self.root} holds results but neither {CONFIG_FILE} nor {RUN_FILE}: which config "
                             "made them is unknown. Use another output_dir.")
      raise ConfigMismatch(f"{self.root} holds results but no run.json: it is not a RISE run directory (an "
                           "evaluation's?). Use another output_dir.")
    saved_hash = files.read_json(run_json).get("config_hash")
    if changed == [] and saved_hash != self.hash:
      raise ConfigMismatch(
          f"{self.root} was made under config hash {saved_hash}, this config's is {self.hash}, though config.json "
          "names no differing field: the directory predates output_dir leaving the hash (docs/contracts.md) "
          "or config.json was edited. Finish it with the code that made it, or use another output_dir.")
    if not results:
      return True
    used = self._used_changed_fields(markers, changed, saved_hash, current)
    if used:
      listed = "; ".join(f"{field} (used by {', '.join(stages)})" for field, stages in used.items())
      raise ConfigMismatch(f"{self.root} holds results made by a different config; differing fields: {listed}. "
                           "Use another output_dir, or the original values, to resume (a field that only stages "
                           "not yet started use may change).")
    if saved is None:
      log.warning("%s: %s was missing; no finished stage used a field this config changes, rewriting it",
                  self.root, CONFIG_FILE)
      return False  # open() writes config.json and run.json again
    self.changed = changed
    return not changed

  def _used_changed_fields(self, markers: dict[str, dict[str, Any]], changed: list[str] | None, saved_hash,
                           current: dict[str, Any]) -> dict[str, list[str]]:
    """{field: [stage, ...]} of the fields this config changes that a finished stage recorded in its DONE marker
    or a started stage (files but no DONE) depends on. changed: the fields differing from config.json (None: it
    is lost, and run.json's hash stands for the whole config of stages that recorded nothing)."""
    now = config_lib.leaves(current)
    used: dict[str, list[str]] = {}
    unrecorded = [stage for stage, marker in markers.items() if STAGE_FIELDS not in marker]
    for stage, marker in markers.items():
      for field, value in (marker.get(STAGE_FIELDS) or {}).items():
        if now.get(field, _ABSENT) != value:
          used.setdefault(field, []).append(stage)
    started = [s for s in plan_lib.plan(self.config) if s.name not in markers and _holds_files(self.root / s.name)]
    if changed is None:
      if (unrecorded or started) and saved_hash != self.hash:
        raise ConfigMismatch(f"{self.root}/{CONFIG_FILE} is missing and {self.root / RUN_FILE} names config hash "
                             f"{saved_hash}, this config's is {self.hash}: the results of "
                             f"{', '.join(unrecorded + [s.name for s in started])} were made by another config. "
                             "Resume with the original config (it rewrites config.json), or use another output_dir.")
      return used
    for stage in unrecorded:  # a marker from before stages recorded their fields depends on every field
      for field in changed:
        used.setdefault(field, []).append(stage)
    for stage in started:
      fields = plan_lib.stage_fields(self.config, stage)
      for field in changed:
        if field in fields:
          used.setdefault(field, []).append(f"{stage.name} (started; delete it to redo it under the new value)")
    return used

  def open(self) -> None:
    """Check the directory (under the run's lock) and initialise it when it is new, or record the config again
    when it changed in fields no stage that ran depends on (logged, and listed in run.json's config_changes)."""
    if self.check():
      return
    self.root.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"schema": RUN_SCHEMA, "config_hash": self.hash, "versions": provenance.package_versions(),
              "git_commit": provenance.git_commit(), "created": now, "argv": sys.argv}
    if self.changed:
      previous = files.read_json(self.root / RUN_FILE)
      log.warning("%s: config fields changed since the run started: %s; no finished or started stage used them, "
                  "going on", self.root, ", ".join(self.changed))
      record["created"] = previous.get("created", now)
      record["config_changes"] = previous.get("config_changes", []) + [
          {"at": now, "fields": self.changed, "previous_hash": previous.get("config_hash")}]
    current = config_lib.to_dict(self.config)
    current.pop("debug", None)
    files.atomic_write_json(self.root / RUN_FILE, record)
    # written last: its presence means the directory is initialised
    files.atomic_write_json(self.root / CONFIG_FILE, current)

  def stage_dir(self, stage: str) -> pathlib.Path:
    return self.root / stage

  def done(self, stage: str) -> bool:
    return (self.stage_dir(stage) / DONE_FILE).exists()

  def mark_done(self, stage: str, info: dict[str, Any]) -> None:
    marker = {"stage": stage, **info,
              STAGE_FIELDS: plan_lib.stage_fields(self.config, plan_lib.stage_named(stage))}
    marker = json.loads(json.dumps(marker))  # the digest covers what a reader parses (tuples as lists)
    files.atomic_write_json(self.stage_dir(stage) / DONE_FILE, {**marker, DONE_DIGEST: done_digest(marker)})

  def clear_done(self, stage: str) -> None:
    """Reopen a finished stage (one of its outputs was lost): it runs again, resuming from what it kept."""
    (self.stage_dir(stage) / DONE_FILE).unlink(missing_ok=True)

  def info(self, stage: str) -> dict[str, Any]:
    return read_done(self.stage_dir(stage) / DONE_FILE)
