"""orbax checkpoints of the training state: async saves every N steps, keep K, strict sharded restore.

A checkpoint holds two items: `state` (a pytree of global jax arrays: params, optimiser state, step, rng) and
`meta` (JSON: the data position and the fingerprints that must match on resume). Restores go straight into an
abstract target that carries the *current* shardings, so a checkpoint written on one mesh restores onto
another. A checkpoint whose leaves differ from the target (missing or extra) is an error — never a silent
partial restore; one that fails to read (a torn or corrupted latest step) is moved aside to `<step>.unreadable`
with a warning in favour of the previous one (which is why `keep >= 2`), so retraining can save that step again.

Integrity: once a save has committed, process 0 writes `<step>/rise_digest.json` (sha256 of every item file) on
a thread while training goes on (the next save, `wait` and `close` join it), so hashing never sits on the step
path and a step is unverified only for the seconds between its commit and its digest. A restore verifies the
digest first: a step whose files differ, or which has no digest (the run stopped before hashing it), is moved
aside and the previous verified step is used, with a warning saying so. A step whose meta lacks `rise_digested`
was written before digests existed: it is restored unverified, with a warning, so a run in flight keeps its work.
"""

from __future__ import annotations

import logging
import pathlib
import threading
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from rise_jax import files

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"  # `<step>.unreadable`: a step that failed to restore, moved out of orbax's view
DIGEST_FILE = "rise_digest.json"   # in a step's directory: sha256 of every file of its `state` and `meta` items
DIGESTED_ITEMS = ("state", "meta")
COMMIT_MARKER = "commit_success.txt"  # orbax's, in a finalized step directory
DIGESTED_KEY = "rise_digested"  # in a step's meta from the save on: a step without it predates digests


class DigestMismatchError(OSError):
  """A checkpoint step's files differ from the digest written after its save committed."""


def step_digest(step_dir: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of the step's item files (the files a restore reads)."""
  return {str(p.relative_to(step_dir)): files.sha256_file(p)
          for item in DIGESTED_ITEMS for p in sorted((step_dir / item).rglob("*")) if p.is_file()}


def verify_step(step_dir: pathlib.Path) -> bool:
  """True when the step matches its digest; False when it has none (the run stopped before hashing it).
  Raises DigestMismatchError naming the first file that differs."""
  path = step_dir / DIGEST_FILE
  if not path.is_file():
    return False
  recorded = files.read_json(path)
  actual = step_digest(step_dir)
  for name in sorted(set(recorded) | set(actual)):
    if recorded.get(name) != actual.get(name):
      what = "missing" if name not in actual else ("not in the digest" if name not in recorded else "differs")
      raise DigestMismatchError(f"{step_dir / name}: {what} from {path} (the file changed after the save)")
  return True


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not match what the run expects (missing or extra leaves)."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _paths(tree) -> set[str]:
  """Leaf paths as 'a/b/0/c', the same whether a node is a dataclass, a namedtuple or the dict/list orbax reads."""
  return {"/".join(_key_name(k) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """One run's `ckpt/` directory."""

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int, async_save: bool = True):
    if keep < 2:
      raise ValueError(f"keep={keep}: keep at least 2 checkpoints so a torn latest one can fall back")
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self._digest_thread: threading.Thread | None = None
    self._committed = threading.Event()
    self._digest_error: BaseException | None = None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front, so a fresh process can read metadata before any save of its own.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Start an (async) save when `step` is due, or always with `force`; returns whether one started."""
    meta = {**meta, DIGESTED_KEY: True}
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
      self._finish_digest()  # orbax's save waited for the previous commit, so its digest thread can finish
      if jax.process_index() == 0:
        self._committed = threading.Event()
        self._digest_thread = threading.Thread(target=self._digest, args=(step, self._committed), daemon=True,
                                               name=f"ckpt-digest-{step}")
        self._digest_thread.start()
    return saved

  def _digest(self, step: int, committed: threading.Event):
    """Hash the step as soon as its commit shows (the final directory with orbax's commit marker), or once the
    training thread knows it committed. No orbax call here: its barriers must stay on the training thread."""
    step_dir = self.directory / str(step)
    try:
      while not (step_dir.is_dir() and (step_dir / COMMIT_MARKER).is_file()):
        if committed.wait(0.2):
          break
      if step_dir.is_dir():  # absent: the save failed (raised on the training thread) or max_to_keep removed it
        files.atomic_write_json(step_dir / DIGEST_FILE, step_digest(step_dir))
    except BaseException as e:  # noqa: BLE001 - reported on the training thread at the next join
      self._digest_error = e

  def _finish_digest(self):
    """Tell the digest thread its step committed, wait for it, and raise what it raised."""
    if self._digest_thread is not None:
      self._committed.set()
      self._digest_thread.join()
      self._digest_thread = None
    if self._digest_error is not None:
      error, self._digest_error = self._digest_error, None
      raise error

  def wait(self):
    """Block until every started save is committed and hashed."""
    self.manager.wait_until_finished()
    self._finish_digest()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _check_tree(self, step: int, target: Any):
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      raise OSError(f"checkpoint step {step} has no readable state metadata")
    have, want = _paths(saved), _paths(target)
    if have != want:
      missing, extra = sorted(want - have), sorted(have - want)
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match the training state: missing leaves {missing[:5]}"
          f"{' ...' if len(missing) > 5 else ''}, extra leaves {extra[:5]}{' ...' if len(extra) > 5 else ''}")

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) from the newest readable checkpoint, restored into `target` (abstract, sharded).

    None when there is none. Raises `CheckpointMismatchError` for a tree mismatch; falls back, with a warning,
    past checkpoints that fail to read.
    """
    self.manager.reload()
    for step in reversed(self.steps()):
      try:
        if not verify_step(self.directory / str(step)):
          if _read_meta(self.directory / str(step)).get(DIGESTED_KEY):
            raise DigestMismatchError(f"{self.directory / str(step)} has no {DIGEST_FILE} (the run stopped before "
                                      "hashing it): unverified")
          warnings.warn(f"checkpoint {self.directory}/{step} was written before checkpoint digests: restoring it "
                        "unverified", RuntimeWarning, stacklevel=2)
        self._check_tree(step, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable; try the previous
        aside = self._move_aside(step)
        warnings.warn(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: {str(e)[:300]}); "
                      f"moved to {aside} and falling back to the previous one", RuntimeWarning, stacklevel=2)
        continue
      meta = dict(restored["meta"])
      meta.pop(DIGESTED_KEY, None)
      return step, restored["state"], meta
    return None

  def _move_aside(self, step: int) -> pathlib.Path:
    """Rename an unreadable step out of the manager's view (kept for inspection): retraining then saves that step
    again instead of failing with StepAlreadyExistsError."""
    aside = self.directory / f"{step}{UNREADABLE_SUFFIX}"
    n = 1
    while aside.exists():
      aside, n = self.directory / f"{step}{UNREADABLE_SUFFIX}.{n}", n + 1
    try:
      (self.directory / str(step)).rename(aside)
    except FileNotFoundError:
      pass  # another process of the run moved it first
    self.manager.reload()
    return aside

  def close(self):
    self.wait()
    self.manager.close()


def _read_meta(step_dir: pathlib.Path) -> dict[str, Any]:
  return ocp.JsonCheckpointHandler().restore(step_dir / "meta", ocp.args.JsonRestore())


def latest_meta(directory: str | pathlib.Path) -> tuple[int, dict[str, Any]] | None:
  """(step, meta) of the newest checkpoint whose meta reads, without touching its state (None: no checkpoint), so
  a resume can be refused before the model is loaded.

  Files only, no CheckpointManager: a manager creates the directory and syncs the processes, and whether a process
  gets here before or after process 0 has created the directory is a race. With a manager, one process would then
  enter a barrier that the others never reach (a two-process run hung or crashed that way)."""
  directory = pathlib.Path(directory).absolute()
  for step in sorted(ocp.utils.checkpoint_steps(directory), reverse=True):  # finalized steps only
    try:
      meta = _read_meta(directory / str(step))
      meta.pop(DIGESTED_KEY, None)
      return step, meta
    except Exception:  # noqa: BLE001 - a torn step: restore_latest falls back past it too
      continue
  return None
