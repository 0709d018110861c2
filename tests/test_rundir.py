"""Run-directory primitives: one writer per directory (live, stale and foreign locks), atomic writes, and the one
clear message a command ends with on a full disk."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from rise_jax import files as rundir

REPO = pathlib.Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # reaped: the pid names no process now
  return proc.pid


def _plant(root: pathlib.Path, **holder):
  root.mkdir(parents=True, exist_ok=True)
  (root / rundir.LOCK_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", **holder}))


def test_second_writer_fails_at_once_naming_the_holder_and_the_lock_is_released_on_exceptions(tmp_path):
  with pytest.raises(KeyError):
    with rundir.RunLock(tmp_path):
      holder = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
      assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
      with pytest.raises(rundir.RunDirLocked, match=rf"in use by another run \(pid {os.getpid()} on "
                                                    rf"{socket.gethostname()}, started .*Wait for it to finish"):
        rundir.RunLock(tmp_path).acquire()
      raise KeyError("an exception inside the run")
  assert not (tmp_path / rundir.LOCK_FILE).exists()
  with rundir.RunLock(tmp_path):  # released: the next run takes it
    pass


def test_a_lock_held_by_another_process_refuses(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rise_jax import files as rundir; "
                             "rundir.RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
                             str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(rundir.RunDirLocked, match=rf"pid {holder.pid} on "):
      rundir.RunLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  with rundir.RunLock(tmp_path):  # killed (no cleanup ran): its lock is stale and taken over
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("pid", ["dead", -1, None])
def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog, pid):
  _plant(tmp_path, pid=_dead_pid() if pid == "dead" else pid, host=socket.gethostname())
  with rundir.RunLock(tmp_path):
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert "which is no longer running" in caplog.text
  (tmp_path / rundir.LOCK_FILE).write_bytes(b'{"pid": 12')  # torn by a kill mid-write: taken over as well
  with rundir.RunLock(tmp_path):
    pass


def test_lock_naming_another_host_or_a_live_pid_is_refused_with_what_to_delete(tmp_path):
  _plant(tmp_path, pid=_dead_pid(), host="node-17")
  lock = str(tmp_path / rundir.LOCK_FILE)
  with pytest.raises(rundir.RunDirLocked, match=r"on node-17.*if that run is no longer running, delete") as e:
    rundir.RunLock(tmp_path).acquire()
  assert f"delete {lock} and re-run" in str(e.value)
  assert "holds only the writer's pid and host, no results" in str(e.value)
  _plant(tmp_path, pid=os.getppid(), host=socket.gethostname())  # alive, but not holding the flock
  with pytest.raises(rundir.RunDirLocked, match=rf"pid {os.getppid()}.*a reused pid") as e:
    rundir.RunLock(tmp_path).acquire()
  assert f"delete {lock} and re-run" in str(e.value) and "no results" in str(e.value)
  assert (tmp_path / rundir.LOCK_FILE).exists()  # a refused lock is left as it was


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "a" / "x.json"
  rundir.atomic_write_json(path, {"v": 1})
  assert json.loads(path.read_text()) == {"v": 1}

  def full(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError):
    rundir.atomic_write_json(path, {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1} and os.listdir(path.parent) == ["x.json"]


DISK_FULL_SCRIPT = r"""
import errno, logging, sys
from rise_jax import evaluate
from rise_jax import files as rundir
from rise_jax.config import base_config
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.policies import ScriptedPolicy

def full(self, obj):  # the disk fills while the rollout log is being written
  raise OSError(errno.ENOSPC, "No space left on device")

rollout_log.RolloutWriter._write_line = full
cfg = base_config()
cfg.output_dir, cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k = sys.argv[1], 2, 1, 1
with rundir.cli_errors("rise_jax.evaluate", cfg.output_dir):
  evaluate.evaluate(cfg, policy=ScriptedPolicy(lambda request, j: "=0"), model="scripted", progress=False)
"""


def test_disk_full_ends_the_command_with_one_clear_message_last(tmp_path):
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(out)], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == rundir.DISK_FULL_EXIT, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("[rise_jax.evaluate] disk full (ENOSPC: No space left on device)") and str(out) in last
  assert "Traceback" not in proc.stderr and "re-run the same command" in last
  assert not (out / rundir.LOCK_FILE).exists()  # the lock was released on the way out


TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{d}/ckpt/1.orbax-'
                    'checkpoint-tmp/state/ocdbt.process_0/": Failed writing: "{d}/ckpt/1.orbax-checkpoint-tmp/state/'
                    'ocdbt.process_0/d/e386": Failed to write 215776 bytes to file 4: No space left on device '
                    "[os_error_code='28']")
TENSORSTORE_SCRIPT = r"""
import sys
from rise_jax import files
with files.cli_errors("rise_jax.run", sys.argv[1]):
  try:
    raise ValueError(sys.argv[2])  # what orbax's async save raises at the next wait: no errno
  except ValueError as e:
    raise RuntimeError("checkpoint save failed") from e
"""


def test_a_full_disk_under_tensorstore_exits_4_naming_the_file(tmp_path):
  message = TENSORSTORE_FULL.format(d=tmp_path)
  proc = subprocess.run([sys.executable, "-c", TENSORSTORE_SCRIPT, str(tmp_path), message], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == rundir.DISK_FULL_EXIT, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("[rise_jax.run] disk full (ENOSPC: No space left on device) while writing "
                         f"{tmp_path}/ckpt/1.orbax-checkpoint-tmp/state/ocdbt.process_0/d/e386"), last
  assert "Traceback" not in proc.stderr
  other = subprocess.run([sys.executable, "-c", TENSORSTORE_SCRIPT, str(tmp_path), "RESOURCE_EXHAUSTED: out of "
                          "memory allocating 2 GiB"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert other.returncode == 1 and "Traceback" in other.stderr  # not a disk: propagates unchanged


ORBAX_FULL_SCRIPT = r"""
import sys
import jax.numpy as jnp
from rise_jax import files
from rise_jax.train import checkpoint as checkpoint_lib
with files.cli_errors("rise_jax.train", sys.argv[1]):
  ckpt = checkpoint_lib.Checkpointer(sys.argv[1] + "/ckpt", every=1, keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.arange(1_000_000.0) + step}, {"step": step}, force=True)  # 4 MB on a 2 MB disk
  ckpt.close()
"""


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                         capture_output=True).returncode != 0:
    pytest.skip("mounting a 2 MB tmpfs needs root")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_an_orbax_save_ends_with_the_one_clear_line_alone(small_disk):
  out = small_disk / "run"
  proc = subprocess.run([sys.executable, "-c", ORBAX_FULL_SCRIPT, str(out)], cwd=REPO, capture_output=True,
                        text=True, timeout=240, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == rundir.DISK_FULL_EXIT, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  # was: 4 ERROR records with tracebacks here (about 27 in a training run) from orbax's save threads
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("[rise_jax.train] disk full (ENOSPC: No space left on device) while writing "
                             f"{out}/ckpt/1.orbax-checkpoint-tmp/")


def test_background_disk_full_records_are_dropped_and_other_errors_pass(caplog):
  import errno
  import logging
  absl = logging.getLogger("absl")
  full = OSError(errno.ENOSPC, "No space left on device")
  with rundir.cli_errors("rise_jax.train", "/tmp/out"):
    absl.error("save thread failed", exc_info=(OSError, full, None))
    absl.error('RESOURCE_EXHAUSTED: Error writing "w/0": No space left on device [os_error_code=\'28\']')
    absl.error("a real error in the save thread")
    absl.warning("a warning about no space left on device is not an error")
  messages = [r.getMessage() for r in caplog.records]
  assert "save thread failed" not in messages and not any(m.startswith("RESOURCE_EXHAUSTED") for m in messages)
  assert "a real error in the save thread" in messages and any(m.startswith("a warning") for m in messages)
  # the command finished though a writer hit the full disk: said once, not hidden
  assert any(m.startswith("2 disk-full error(s) were logged by background writers") for m in messages)
  absl.error("save thread failed", exc_info=(OSError, full, None))  # outside a command: untouched
  assert caplog.records[-1].getMessage() == "save thread failed"
