"""File primitives every layer that writes uses (the one copy of each; the run directory's own rules, DONE markers
and config refusal, are `rise_jax.pipeline.rundir`).

- `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json`: written beside the target, fsynced, renamed,
  so a reader (or a resumed run) sees the old file or the new one, never part of one.
- `RunLock`: one writer per run directory. `<dir>/.lock` holds the writer's pid, host and start time under an
  exclusive `flock`; a second writer fails at once naming the holder. A lock left by a dead process (same host,
  pid gone: a SIGKILL skips every cleanup) is taken over; one naming another host is refused (its pid cannot be
  checked from here), and the message says which file to delete if that run is gone.
- `sha256_file` / `verify_sha256`: digests recorded when an artifact is written, checked before it is trusted.
- `read_json`: a bookkeeping file that does not parse is an error naming it, never a bare JSONDecodeError.
- `read_jsonl` / `append_jsonl`: the append-only jsonl files beside the rollout log (metrics.jsonl,
  validation.jsonl) with its crash rule: a torn last line (no newline and not JSON, NUL bytes included) is ignored
  and counted, and the writer's resume truncates it.
- `cli_errors`: how the commands end on these errors and on a full disk: one clear message, last.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import socket
import sys
import tempfile
from typing import Any, Iterator

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_EXIT = 4


class RunDirError(RuntimeError):
  """A run directory cannot be used as asked; the message says why and what to do."""


class RunDirLocked(RunDirError):
  """Another process is writing into the run directory."""


# -- atomic writes ----------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> None:
  """The one JSON writer: indented, keys in the order the code built them (a report's reading order), atomic.
  `allow_nan=False` refuses NaN (metrics use null for "no data")."""
  atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n")


class CorruptFileError(RunDirError):
  """A bookkeeping file of a run directory (config.json, run.json, a DONE marker) does not parse."""


def read_json(path: str | os.PathLike, hint: str = "restore it, or use another output_dir") -> Any:
  """A JSON file's value; a file that does not parse raises CorruptFileError naming it (exit 2 in a command)."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptFileError(f"{path}: not valid JSON ({e}); the file is damaged: {hint}") from None


class IntegrityError(RunDirError):
  """A file no longer matches the digest recorded when it was written; the message names it and what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 23) -> str:
  """The file's sha256, read in 8 MiB chunks (about 1 GiB/s on one core: 13 s for a 7B bf16 export)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, recorded_in: str | os.PathLike, hint: str) -> None:
  """Refuse (IntegrityError) a file whose sha256 is not the one `recorded_in` holds for it."""
  actual = sha256_file(path)
  if actual != expected:
    raise IntegrityError(f"{path}: sha256 {actual[:16]}... differs from {expected[:16]}... recorded in "
                         f"{recorded_in}: the file changed after it was written; {hint}")


# -- append-only jsonl -------------------------------------------------------------------------------------------

class JsonlError(ValueError):
  """A line of an append-only jsonl file other than a torn last one is not a JSON object; names file and line."""


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
  """(records, num_torn_lines) of an append-only jsonl file (none: ([], 0)).

  A crash mid-append leaves an unterminated last line (or NUL bytes where a node crash lost the data): it is
  ignored and counted, as the rollout log does. Any other line that is not a JSON object raises JsonlError.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return [], 0
  *lines, tail = path.read_bytes().split(b"\n")
  num_torn = 0
  if tail.strip(b" \t\r\0"):
    try:
      json.loads(tail)
      lines.append(tail)  # whole, only its newline was lost
    except (json.JSONDecodeError, UnicodeDecodeError):
      num_torn = 1
  elif tail:
    num_torn = 1  # NUL padding after the last newline
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise JsonlError(f"{path}:{number}: not valid JSON ({e}); only a torn last line is ignored") from None
    if not isinstance(record, dict):
      raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    records.append(record)
  return records, num_torn


def rewrite_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
  """Replace the file by `records` atomically (the resume step: lines past it and a torn tail dropped)."""
  atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
  """Append whole lines and fsync them: a crash after this returns loses none of them."""
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


# -- the lock ---------------------------------------------------------------------------------------------------

def _alive(pid: Any) -> bool:
  if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
    return False  # no usable pid (a hand-edited file): os.kill(0 or -1, ...) would address process groups
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _read_holder(fd: int) -> dict[str, Any] | None:
  os.lseek(fd, 0, os.SEEK_SET)
  data = os.read(fd, 4096)
  try:
    holder = json.loads(data) if data.strip() else None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None  # torn by a kill while it was being written: nobody can hold it
  return holder if isinstance(holder, dict) else None


# Why deleting a refused lock is safe once its writer is gone: the file is bookkeeping, not results.
_SAFE_TO_DELETE = ("safe then: the lock file holds only the writer's pid and host, no results, and the run resumes "
                   "from what it kept")


class RunLock:
  """The exclusive writer lock of one run directory (a context manager; released on exit, exceptions included)."""

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    self.path = self.root / LOCK_FILE
    self._fd: int | None = None

  def _refuse(self, holder: dict[str, Any] | None, hint: str) -> RunDirLocked:
    who = "an unknown process" if not holder else (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}")
    return RunDirLocked(f"{self.root} is in use by another run ({who}; lock file {self.path}). {hint}")

  def acquire(self) -> "RunLock":
    self.root.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise self._refuse(holder, "Wait for it to finish, or use another output_dir.") from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
          os.close(fd)
          raise
        # A file system without flock: the pid/host check below is the only guard.
        log.warning("%s: the file system does not support flock (%s); checking the lock's pid only", self.root, e)
      try:  # the holder may have released (unlinked) the file between our open and our flock: lock the new one
        if os.path.samestat(os.fstat(fd), os.stat(self.path)):
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    holder = _read_holder(fd)
    if holder and holder.get("host") != socket.gethostname():
      os.close(fd)
      raise self._refuse(holder, f"Its pid cannot be checked from {socket.gethostname()}: if that run is no "
                                 f"longer running, delete {self.path} and re-run ({_SAFE_TO_DELETE}).")
    if holder and holder.get("pid") != os.getpid() and _alive(holder.get("pid")):
      os.close(fd)  # alive but not holding the flock: a file system without flock, or a reused pid
      raise self._refuse(holder, f"Its pid is alive but holds no lock on the file (a reused pid, or a file system "
                                 f"without flock): if no run is writing here, delete {self.path} and re-run "
                                 f"({_SAFE_TO_DELETE}).")
    if holder:
      log.warning("%s: taking over the lock of pid %s (started %s), which is no longer running", self.root,
                  holder.get("pid"), holder.get("started"))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)  # while still locked: a waiter that opened this file sees it is gone and retries
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# -- how a command ends -----------------------------------------------------------------------------------------

# tensorstore (orbax's writer) raises a ValueError with no errno: 'RESOURCE_EXHAUSTED: ... "<path>": Failed to write
# ... No space left on device [os_error_code='28']'.
_STATUS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_STATUS_PATH = re.compile(r'"(/[^"]+)"')


def _disk_full(exc: BaseException | None) -> OSError | None:
  """The ENOSPC / EDQUOT error behind `exc` (libraries wrap it; tensorstore's status text is read), if any."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
      return exc
    text = str(exc)
    code = _STATUS_ERRNO.search(text)
    if (code and int(code.group(1)) in DISK_FULL) or ("RESOURCE_EXHAUSTED" in text and "No space left" in text):
      number = int(code.group(1)) if code else errno.ENOSPC
      paths = _STATUS_PATH.findall(text)
      return OSError(number, os.strerror(number), paths[-1] if paths else None)
    exc = exc.__cause__ or exc.__context__
  return None


class _DiskFullRecords(logging.Filter):
  """Drops the records background writers log for a full disk (orbax's save threads log each failure, with its
  traceback, from every thread it passes through before the main thread sees it); counted, and the first kept, so
  a full disk that never reaches the command is still reported when it ends."""

  def __init__(self):
    super().__init__()
    self.dropped: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno < logging.ERROR or _disk_full(exc or Exception(record.getMessage())) is None:
      return True
    self.dropped.append(record)
    return False


# The loggers orbax's background save threads report through (absl's Python logger).
_BACKGROUND_LOGGERS = ("absl",)


@contextlib.contextmanager
def cli_errors(command: str, output_dir: str | os.PathLike) -> Iterator[None]:
  """A run-directory error ends the command with its message (exit 2). A full disk ends it with one line, last,
  and no interpreter teardown (whose background writers would bury it under their own failures): exit 4. The
  background writers' own disk-full records are dropped meanwhile (`_DiskFullRecords`); every other record passes."""
  quiet = _DiskFullRecords()
  for name in _BACKGROUND_LOGGERS:
    logging.getLogger(name).addFilter(quiet)
  try:
    yield
    if quiet.dropped:  # a writer hit a full disk the command did not see fail: said, never hidden
      log.error("%d disk-full error(s) were logged by background writers though the command finished; the first: "
                "%s", len(quiet.dropped), quiet.dropped[0].getMessage())
  except RunDirError as e:
    print(f"[{command}] {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 - only a full disk is handled here; the rest propagates unchanged
    full = _disk_full(e)
    if full is None:
      raise
    where = f" while writing {full.filename}" if full.filename else ""
    sys.stdout.flush()
    print(f"[{command}] disk full ({errno.errorcode[full.errno]}: {full.strerror}){where}. Free space under "
          f"{os.path.abspath(output_dir)} and re-run the same command: finished work is kept and the run resumes.",
          file=sys.stderr, flush=True)
    os._exit(DISK_FULL_EXIT)
  finally:
    for name in _BACKGROUND_LOGGERS:
      logging.getLogger(name).removeFilter(quiet)
