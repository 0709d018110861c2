"""Where a command's log records go: a readable terminal, and everything in a file of the run directory.

The terminal shows warnings and errors only (jax, orbax and absl log thousands of INFO lines: checkpoint-manager
set-ups, handler registries), unless absl's own `--verbosity` flag asks for more (`--verbosity=0`: INFO,
`--verbosity=1`: DEBUG). The file gets INFO and finer from process start: records logged before the run
directory is known (imports, config validation) wait in memory and are written once `to_file` names it.
`announce` prints a line for the person at the terminal (a stage starting or finishing) and files it too.
"""

from __future__ import annotations

import logging
import logging.handlers
import pathlib

from absl import flags
from absl import logging as absl_logging

LOG_NAME = "run.log"
_log = logging.getLogger("rise_jax")
_buffer: logging.handlers.MemoryHandler | None = None


class _NotForConsole(logging.Filter):
  """Drops records already printed by `announce`, so --verbosity=0 does not show them twice."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not getattr(record, "announced", False)


def console_level() -> int:
  """WARNING unless --verbosity was given on the command line; then absl's mapping (0 INFO, 1 DEBUG, ...)."""
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    return logging.WARNING
  verbosity = absl_logging.get_verbosity()
  return absl_logging.converter.absl_to_standard(verbosity) if verbosity <= 1 else logging.DEBUG - (verbosity - 1)


def setup() -> None:
  """Call once, first thing in a command's main (absl flags parsed): quiet terminal, records buffered for the file."""
  global _buffer
  console = console_level()
  handler = absl_logging.get_absl_handler()
  handler.setLevel(console)
  handler.addFilter(_NotForConsole())
  root = logging.getLogger()
  root.setLevel(min(console, logging.INFO))  # the file records INFO even when the terminal shows less
  logging.captureWarnings(True)  # Python warnings reach the terminal (WARNING) and the file alike
  _buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
  root.addHandler(_buffer)


def to_file(directory: str | pathlib.Path) -> pathlib.Path:
  """Append every record (from process start on) to directory/run.log; returns its path."""
  global _buffer
  path = pathlib.Path(directory) / LOG_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  file_handler = logging.FileHandler(path, encoding="utf-8")
  file_handler.setFormatter(absl_logging.PythonFormatter())
  root = logging.getLogger()
  if _buffer is not None:
    _buffer.setTarget(file_handler)
    _buffer.flush()
    root.removeHandler(_buffer)
    _buffer.close()
    _buffer = None
  root.addHandler(file_handler)
  return path


def announce(message: str) -> None:
  """A line for the terminal (stdout) that the log file records too."""
  print(message, flush=True)
  _log.info(message, extra={"announced": True})
