"""Resume over damaged files: torn jsonl tails, unreadable checkpoints, missing outputs of finished stages."""

from __future__ import annotations

import json
import pathlib

import pytest

from rise_jax import files


def _lines(*steps: int) -> bytes:
  return b"".join(json.dumps({"step": s, "loss": 1.0}).encode() + b"\n" for s in steps)


TORN_TAILS = [b'{"step": 4, "lo', b"\0\0\0\0\0\0\0\0", b'{"step": 4}' + b"\0" * 3]


@pytest.mark.parametrize("tail", TORN_TAILS, ids=["torn", "nul", "line_then_nul"])
@pytest.mark.parametrize("name", ["metrics.jsonl", "validation.jsonl"])
def test_trainer_logs_resume_over_a_torn_tail(tmp_path, name, tail):
  from rise_jax.train import trainer
  path = tmp_path / name
  path.write_bytes(_lines(1, 2, 3) + tail)
  if name == "metrics.jsonl":
    trainer._MetricsSink(path, 2).close()
  else:
    trainer._ValidationLog(path, 2)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_read_jsonl_counts_a_torn_tail_and_names_a_bad_middle_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(_lines(1, 2) + b'{"step": 3')
  records, torn = files.read_jsonl(path)
  assert [r["step"] for r in records] == [1, 2] and torn == 1
  path.write_bytes(_lines(1) + b"garbage\n" + _lines(2))
  with pytest.raises(files.JsonlError, match=r"metrics.jsonl:2: not valid JSON"):
    files.read_jsonl(path)
  path.write_bytes(_lines(1, 2) + b'{"step": 3}')  # whole, only the newline lost
  assert [r["step"] for r in files.read_jsonl(path)[0]] == [1, 2, 3]


def _save_small(directory: pathlib.Path, step: int):
  import jax.numpy as jnp
  from rise_jax.train import checkpoint as checkpoint_lib
  state = {"w": jnp.arange(1000.0), "step": jnp.int32(step)}
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=2, async_save=False)
  ckpt.save(step, state, {"step": step}, force=True)
  ckpt.close()
  return state


def test_an_unreadable_only_checkpoint_is_moved_aside_so_retraining_can_save_its_step(tmp_path):
  from rise_jax.train import checkpoint as checkpoint_lib
  directory = tmp_path / "ckpt"
  state = _save_small(directory, 2)
  data = [p for p in (directory / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  big = max(data, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:10])
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=2, async_save=False)
  with pytest.warns(RuntimeWarning, match=r"(?s)ckpt/2 is unreadable .*moved to .*2\.unreadable"):
    assert ckpt.restore_latest(checkpoint_lib.abstract_like(state)) is None
  assert ckpt.save(2, state, {"step": 2}, force=True)  # was StepAlreadyExistsError on every rerun
  ckpt.close()
  assert (directory / "2.unreadable").is_dir() and checkpoint_lib.latest_meta(directory)[0] == 2
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=2, async_save=False)
  assert ckpt.steps() == [2] and ckpt.restore_latest(checkpoint_lib.abstract_like(state))[0] == 2
  ckpt.close()


def _smoke_config(out: pathlib.Path):
  from rise_jax.config import finalize
  from rise_jax.pipeline import recipes
  c = recipes.toy_smoke()
  c.output_dir = str(out)
  return finalize(c)


@pytest.mark.parametrize("name", ["config.json", "run.json", "iter_0/eval/DONE"])
def test_a_corrupt_bookkeeping_file_is_named(tmp_path, name):
  from rise_jax.pipeline import plan, rundir, summary
  cfg = _smoke_config(tmp_path / "run")
  run_dir = rundir.RunDir(cfg.output_dir, cfg)
  run_dir.open()
  run_dir.mark_done("iter_0/eval", {"seconds": 1.0})
  (run_dir.root / name).write_text('{"config_hash": "ab')
  with pytest.raises(files.CorruptFileError, match=rf"{run_dir.root / name}: not valid JSON"):
    run_dir.check()
    run_dir.info("iter_0/eval")
    summary.compute_table(plan.plan(cfg), run_dir.root)


def test_an_edited_done_marker_is_refused_naming_it(tmp_path):
  from rise_jax.pipeline import plan, rundir, summary
  cfg = _smoke_config(tmp_path / "run")
  run_dir = rundir.RunDir(cfg.output_dir, cfg)
  run_dir.open()
  run_dir.mark_done("iter_0/eval", {"seconds": 1.0, "decode_tokens": 10})
  marker = run_dir.root / "iter_0" / "eval" / "DONE"
  assert run_dir.info("iter_0/eval")["decode_tokens"] == 10 and run_dir.check()
  record = json.loads(marker.read_text())
  record["decode_tokens"] = 99  # still parses: was trusted, and summed into the run's compute table
  marker.write_text(json.dumps(record))
  for read in (run_dir.check, lambda: run_dir.info("iter_0/eval"),
               lambda: summary.compute_table(plan.plan(cfg), run_dir.root)):
    with pytest.raises(files.IntegrityError, match=rf"{marker}: field 'digest': .*edited after the stage finished; "
                                                   "delete it and re-run"):
      read()
  del record["digest"]  # a marker written before digests is read as it is
  marker.write_text(json.dumps(record))
  assert run_dir.info("iter_0/eval")["decode_tokens"] == 99 and run_dir.check()


def test_a_truncated_tokenizer_json_is_named(tmp_path):
  from rise_jax.chat import tokenizer as tokenizer_lib
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, ')
  with pytest.raises(tokenizer_lib.TokenizerLoadError, match=rf"{tmp_path / 'tokenizer.json'}: cannot be read"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_run_identity_survives_the_loss_of_config_json(tmp_path):
  from rise_jax.pipeline import rundir
  cfg = _smoke_config(tmp_path / "run")
  first = rundir.RunDir(cfg.output_dir, cfg)
  first.open()
  first.mark_done("iter_0/eval", {"seconds": 1.0})
  (first.root / "config.json").unlink()
  other = _smoke_config(tmp_path / "run")
  other.eval.turns = 3  # was accepted: config.json and run.json rewritten to turns=3 over 2-turn metrics
  with pytest.raises(rundir.ConfigMismatch, match=r"differing fields: eval\.turns \(used by iter_0/eval\)"):
    rundir.RunDir(other.output_dir, other).check()
  assert not (first.root / "config.json").exists()  # a refusal writes nothing
  again = rundir.RunDir(cfg.output_dir, cfg)
  again.open()  # the original config resumes and rewrites config.json
  assert (first.root / "config.json").is_file() and again.check()
  (first.root / "config.json").unlink()
  marker = first.root / "iter_0" / "eval" / "DONE"
  marker.write_text(json.dumps({"stage": "iter_0/eval", "seconds": 1.0}))  # from before markers recorded fields
  with pytest.raises(rundir.ConfigMismatch, match=r"config\.json is missing and .*run\.json names config hash"):
    rundir.RunDir(other.output_dir, other).check()
  (first.root / "run.json").unlink()
  with pytest.raises(rundir.ConfigMismatch, match=r"neither config\.json nor run\.json"):
    rundir.RunDir(cfg.output_dir, cfg).check()


def test_training_records_edited_after_the_data_build_are_refused(tmp_path):
  from rise_jax.rise import dataset
  data = tmp_path / "data"
  data.mkdir()
  sha = dataset.write_records([{"id": "a", "weight": 1.0}], data / dataset.DATA_FILE)
  (data / "manifest.json").write_text(json.dumps({"sha256": sha}))
  dataset.verify_dataset(data, "rebuild it")
  (data / dataset.DATA_FILE).write_text(json.dumps({"id": "a", "weight": 100.0}) + "\n")
  with pytest.raises(files.IntegrityError, match=r"sft\.jsonl: sha256 .* recorded in .*manifest\.json: .*rebuild it"):
    dataset.verify_dataset(data, "rebuild it")


def test_a_flipped_byte_or_a_missing_digest_falls_back_to_the_last_verified_step(tmp_path):
  import jax.numpy as jnp
  from rise_jax.train import checkpoint as checkpoint_lib
  directory = tmp_path / "ckpt"
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.arange(1000.0) + step}, {"step": step}, force=True)
  ckpt.close()
  assert all((directory / str(s) / checkpoint_lib.DIGEST_FILE).is_file() for s in (1, 2, 3))
  data = [p for p in (directory / "3" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  big = max(data, key=lambda p: p.stat().st_size)
  raw = bytearray(big.read_bytes())
  raw[len(raw) // 2] ^= 0x01  # was restored silently: different weights, exit 0
  big.write_bytes(bytes(raw))
  (directory / "2" / checkpoint_lib.DIGEST_FILE).unlink()  # killed before it was hashed
  target = checkpoint_lib.abstract_like({"w": jnp.zeros(1000)})
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=3, async_save=True)
  with pytest.warns(RuntimeWarning) as caught:
    step, state, _ = ckpt.restore_latest(target)
  ckpt.close()
  messages = [str(w.message) for w in caught]
  assert step == 1 and float(state["w"][0]) == 1.0
  assert any(f"{big.relative_to(directory / '3')}: differs" in m and "3.unreadable" in m for m in messages), messages
  assert any("has no rise_digest.json" in m and "2.unreadable" in m for m in messages), messages


def test_a_checkpoint_written_before_digests_is_restored_with_a_warning(tmp_path):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from rise_jax.train import checkpoint as checkpoint_lib
  directory = tmp_path / "ckpt"
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                                  item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
  manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(8)}),
                                          meta=ocp.args.JsonSave({"step": 4})))
  manager.close()
  ckpt = checkpoint_lib.Checkpointer(directory, every=1, keep=2)
  with pytest.warns(RuntimeWarning, match="written before checkpoint digests"):
    step, _, meta = ckpt.restore_latest(checkpoint_lib.abstract_like({"w": jnp.zeros(8)}))
  ckpt.close()
  assert step == 4 and meta == {"step": 4} and checkpoint_lib.latest_meta(directory) == (4, {"step": 4})
