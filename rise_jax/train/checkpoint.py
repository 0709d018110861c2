"""orbax checkpoints of the training state: async saves every N steps, keep K, strict sharded restore.

A checkpoint holds two items: `state` (a pytree of global jax arrays: params, optimiser state, step, rng) and
`meta` (JSON: the data position and the fingerprints that must match on resume). Restores go straight into an
abstract target that carries the *current* shardings, so a checkpoint written on one mesh restores onto
another. A checkpoint whose leaves differ from the target (missing or extra) is an error — never a silent
partial restore; one that fails to read (a torn or corrupted latest step) is moved aside to `<step>.unreadable`
with a warning in favour of the previous one (which is why `keep >= 2`), so retraining can save that step again.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"  # `<step>.unreadable`: a step that failed to restore, moved out of orbax's view


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
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front, so a fresh process can read metadata before any save of its own.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Start an (async) save when `step` is due, or always with `force`; returns whether one started."""
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self):
    """Block until every started save is committed."""
    self.manager.wait_until_finished()

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
      return step, restored["state"], restored["meta"]
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
    self.manager.wait_until_finished()
    self.manager.close()


def latest_meta(directory: str | pathlib.Path) -> tuple[int, dict[str, Any]] | None:
  """(step, meta) of the newest checkpoint whose meta reads, without touching its state (None: no checkpoint), so
  a resume can be refused before the model is loaded.

  Files only, no CheckpointManager: a manager creates the directory and syncs the processes, and whether a process
  gets here before or after process 0 has created the directory is a race. With a manager, one process would then
  enter a barrier that the others never reach (a two-process run hung or crashed that way)."""
  directory = pathlib.Path(directory).absolute()
  for step in sorted(ocp.utils.checkpoint_steps(directory), reverse=True):  # finalized steps only
    try:
      return step, ocp.JsonCheckpointHandler().restore(directory / str(step) / "meta", ocp.args.JsonRestore())
    except Exception:  # noqa: BLE001 - a torn step: restore_latest falls back past it too
      continue
  return None
