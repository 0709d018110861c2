"""`python -m rise_jax.run` end to end on the smoke config, and resuming it.

The smoke run (configs/toy_smoke.py: every stage of the toy experiment on a dozen problems) runs once per
session; the resume test interrupts a second run of the same config inside collection (stop hook), inside
training (the trainer's real SIGKILL after a checkpoint commit) and between stages, re-runs the command after
each interruption, and requires the finished run's artifacts to equal the uninterrupted run's (timestamps and
paths aside). Both share one XLA compilation cache, so only the first run pays for compilation.
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from rise_jax import config as config_lib
from rise_jax.pipeline import loop, plan, recipes, rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE_STAGES = ["iter_0/collect", "iter_0/train", "iter_0/eval", "iter_1/collect", "iter_1/train", "iter_1/eval",
                "iter_1/control/train", "iter_1/control/eval", "iter_2/collect", "iter_2/train", "iter_2/eval",
                "iter_2/control/train", "iter_2/control/eval"]


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


def run_smoke(out_dir: pathlib.Path, cache: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
  # One CPU device, as on a real machine (the test session's 8 fake devices would shard the toy model 8 ways).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  cmd = [sys.executable, "-m", "rise_jax.run", "--config=configs/toy_smoke.py", f"--config.output_dir={out_dir}",
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)


_PROGRESS_BAR = re.compile(r"\d+%\|")  # a tqdm bar redraw: "train:  50%|#####     | 1/2 [...]"
_ABSL_INFO = re.compile(r"^I\d{4} ", re.M)  # an absl-formatted INFO record: "I1130 22:53:57.354638 ..."


def terminal_lines(proc: subprocess.CompletedProcess) -> list[str]:
  """What a person sees on the terminal, progress bars aside: non-empty stdout and stderr lines."""
  lines = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
  return [line for line in lines if line.strip() and not _PROGRESS_BAR.search(line)]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, xla_cache):
  out = tmp_path_factory.mktemp("smoke") / "run"
  proc = run_smoke(out, xla_cache)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return out, proc


def test_plan_lists_every_stage_of_the_smoke_config():
  assert [s.name for s in plan.plan(recipes.toy_smoke())] == SMOKE_STAGES
  # The default evaluates the boost and the last iteration (and its control) only.
  assert [s.name for s in plan.plan(recipes.toy()) if s.kind == "eval"] == [
      "iter_0/eval", "iter_3/eval", "iter_3/control/eval"]
  c = recipes.toy()
  c.rise.iterations, c.rise.boost, c.rise.single_turn_control, c.rise.evaluate = 2, False, False, "all"
  c.rise.data, c.rise.init_from = "accumulated", "previous"
  assert [s.name for s in plan.plan(c)] == ["iter_0/eval", "iter_1/collect", "iter_1/train", "iter_1/eval",
                                            "iter_2/collect", "iter_2/train", "iter_2/eval"]
  assert plan.init_stage(c, 2) == "iter_1/train" and plan.init_stage(c, 1) is None
  assert plan.data_stages(c, 2) == ["iter_1/collect", "iter_2/collect"]
  c.rise.init_from, c.rise.data = "base", "current"
  assert plan.init_stage(c, 2) is None and plan.data_stages(c, 2) == ["iter_2/collect"]


@pytest.mark.parametrize("text, parsed", [("iter_1/collect:5", ("iter_1/collect", 5)),
                                          ("iter_1/control/eval:done", ("iter_1/control/eval", None))])
def test_stop_after_parses(text, parsed):
  stop = plan.StopAfter.parse(text)
  assert (stop.stage, stop.units) == parsed


@pytest.mark.parametrize("bad", ["collect", "iter_1/train:x", ":3"])
def test_stop_after_rejects_malformed(bad):
  with pytest.raises(ValueError, match="debug.stop_after"):
    plan.StopAfter.parse(bad)


def test_run_dir_refuses_another_config_naming_fields(tmp_path):
  from rise_jax.config import finalize
  a = finalize(recipes.toy_smoke())
  rundir.RunDir(tmp_path, a).open()
  rundir.RunDir(tmp_path, a).open()  # the same config resumes
  b = recipes.toy_smoke()
  b.collect.tau, b.train.lr = 0.9, 5e-4
  b.debug.stop_after = "iter_1/train:1"  # debug fields do not count
  rundir.RunDir(tmp_path, finalize(b)).open()  # no results yet: nothing can be mislabelled, the new config is adopted
  rundir.RunDir(tmp_path, a).open()
  rundir.RunDir(tmp_path, a).mark_done("iter_0/collect", {"records": 3})
  config_before = (tmp_path / "config.json").read_bytes()
  with pytest.raises(rundir.ConfigMismatch, match=r"differing fields: collect\.tau \(used by iter_0/collect\)\."):
    rundir.RunDir(tmp_path, finalize(b)).open()
  assert (tmp_path / "config.json").read_bytes() == config_before
  c = recipes.toy_smoke()
  c.debug.stop_after = "iter_1/train:1"
  rundir.RunDir(tmp_path, finalize(c)).open()
  assert json.loads((tmp_path / "run.json").read_text())["config_hash"] == config_lib.config_hash(a)
  (tmp_path / "run.json").unlink()  # e.g. rise_jax.run pointed at an evaluation's directory
  with pytest.raises(rundir.ConfigMismatch, match="not a RISE run directory"):
    rundir.RunDir(tmp_path, a).open()


def test_a_config_change_no_finished_stage_used_goes_on_and_one_it_used_is_refused(tmp_path, caplog):
  from rise_jax.config import finalize

  def config(**fields):
    c = recipes.toy_smoke()
    for name, value in fields.items():
      section, _, field = name.rpartition("__")
      (c[section] if section else c)[field] = value
    return finalize(c)

  a = config()
  first = rundir.RunDir(tmp_path, a)
  first.open()
  first.mark_done("iter_0/collect", {"records": 3})  # the boost data: collect.*, sampling.*, rise.boost_*, ...
  marker = json.loads((tmp_path / "iter_0" / "collect" / "DONE").read_text())
  assert marker["config_fields"]["collect.tau"] == a.collect.tau and "eval.turns" not in marker["config_fields"]
  assert "output_dir" not in marker["config_fields"] and "rise.iterations" not in marker["config_fields"]
  b = config(eval__turns=3, train__lr=5e-4, rise__iterations=5, train__log_every=7)  # no finished stage used them
  rundir.RunDir(tmp_path, b).open()  # was refused: "holds results made by a different config"
  assert "config fields changed since the run started: eval.turns, rise.iterations, train.log_every, train.lr" \
      in caplog.text
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["config_hash"] == config_lib.config_hash(b) and json.loads((tmp_path / "config.json").read_text())[
      "eval"]["turns"] == 3
  assert run["config_changes"][-1]["previous_hash"] == config_lib.config_hash(a)
  assert rundir.RunDir(tmp_path, b).check()  # resumed under b from now on
  c = config(eval__turns=3, train__lr=5e-4, rise__iterations=5, collect__tau=0.9, sampling__top_k=5)
  with pytest.raises(rundir.ConfigMismatch, match=r"differing fields: collect\.tau \(used by iter_0/collect\); "
                                                  r"sampling\.top_k \(used by iter_0/collect\)\."):
    rundir.RunDir(tmp_path, c).open()
  (tmp_path / "iter_0" / "train").mkdir(parents=True)  # started, not finished: its checkpoints hold lr = 5e-4
  (tmp_path / "iter_0" / "train" / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(rundir.ConfigMismatch, match=r"train\.lr \(used by iter_0/train \(started; delete it"):
    rundir.RunDir(tmp_path, config(eval__turns=3, rise__iterations=5)).open()
  rundir.RunDir(tmp_path, config(eval__turns=4, train__lr=5e-4, rise__iterations=5)).open()  # not started: goes on


@pytest.mark.timeout(300)
def test_smoke_run_end_to_end(smoke_run):
  out, proc = smoke_run
  assert "wall time:" in proc.stdout and "| iter_1 RISE |" in proc.stdout
  for stage in SMOKE_STAGES:
    assert (out / stage / "DONE").is_file(), stage
  for stage in ("iter_0/eval", "iter_1/eval", "iter_1/control/eval"):
    metrics = json.loads((out / stage / "metrics.json").read_text())
    assert metrics["num_problems"] == 12 and 0 <= metrics["m1@t1"] <= metrics["p1@t2"] <= 1
  data = [json.loads(line) for line in (out / "iter_1/collect/data/sft.jsonl").read_text().splitlines()]
  control = [json.loads(line) for line in (out / "iter_1/collect/control/data/sft.jsonl").read_text().splitlines()]
  assert len(data) == len(control) > 0
  assert all(len(c["messages"]) == 4 for c in control)  # instruction, example answer, problem, trained answer
  assert max(len(d["messages"]) for d in data) >= 4
  # Iteration 2's records are the learner's own samples, so their re-tokenisation is checked against the sampled ids.
  summary = json.loads((out / "iter_2/collect/summary.json").read_text())
  assert summary["token_drift"]["measured"] > 0 and summary["weight_table"]["1.0"] == pytest.approx(12.182494)
  top = json.loads((out / "summary.json").read_text())
  assert [r["iteration"] for r in top["compute"]] == [0, 1, 2]
  assert top["compute"][1]["decode_tokens"] > 0 and top["compute"][1]["train_tokens"] > 0
  assert (out / "accuracy_vs_turn.png").is_file() and (out / "summary.md").is_file()
  assert (out / "iter_1/train/hf/config.json").is_file()
  # Iteration 1 distils from the reference solutions (learner attempts drawn without history); iteration 2 is
  # self-distillation with the whole history, as rise.iteration_overrides says.
  logs = {t: [json.loads(line) for line in (out / f"iter_{t}/collect/rollouts.jsonl").read_text().splitlines()[1:]]
          for t in (1, 2)}
  last = [r["turns"][-1] for r in logs[1] if len(r["turns"]) == 4]
  assert last and all(t["policy"] == "teacher:reference" and t["candidates"][0]["reward"] == 1.0 for t in last)
  assert all(t["window_applied"] for r in logs[1] for t in r["turns"][1:3])
  assert {t["policy"] for r in logs[2] for t in r["turns"]} == {"learner@iter_1"}
  assert not any(t["window_applied"] for r in logs[2] for t in r["turns"])
  assert (out / "iter_1/train/validation.jsonl").exists() is False and (out / "iter_0/train/validation.jsonl").exists()


def test_smoke_run_terminal_is_quiet_and_the_log_file_has_everything(smoke_run):
  out, proc = smoke_run
  terminal = terminal_lines(proc)
  # 8 stages x (start, finish) + the summary tables and paths; the INFO flood (orbax, absl) stays in the file.
  assert len(terminal) < 100, "\n".join(terminal)
  assert sum("[rise_jax.run] " in line for line in terminal) == 2 * len(SMOKE_STAGES)
  assert not _ABSL_INFO.search(proc.stderr) and re.search(r"^wall time: \d+\.\d s$", proc.stdout, re.M)
  log = (out / "run.log").read_text()
  assert "[rise_jax.run] iter_1/control/eval: done in" in log and "wall time:" in log
  assert len(_ABSL_INFO.findall(log)) > len(terminal)  # the INFO records the terminal did not show
  assert "CheckpointManager" in log and re.search(r"step 4/4 \| loss ", log)  # orbax's and the trainer's


def _digest(run_dir: pathlib.Path) -> dict[str, str]:
  """A hash of every result artifact, normalised for what legitimately differs between two runs: rollout-log
  headers (creation time), record order within a log (episodes finish in chunk order), paths and timings."""
  out = {}
  for path in sorted(run_dir.rglob("*")):
    rel = str(path.relative_to(run_dir))
    if not path.is_file() or "/ckpt/" in rel or "/tb/" in rel or rel.startswith(("tokenizer", "run.json")):
      continue  # TensorBoard event files are named by time and host (their scalars are metrics.jsonl's)
    if path.name in ("DONE", "summary.md", "report.md", "metrics.jsonl", "data_report.json", "run.log",
                     "throughput.json") or \
        path.suffix == ".png":
      continue  # timings and logs, or renderings of the JSON compared below
    if path.suffix == ".jsonl" and "rollouts" in path.name:
      records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
      for r in records:
        for t in r["turns"]:
          for c in t["candidates"]:
            # float32 sums depend on the batch a row was sampled in (a resumed chunk differs); tokens do not.
            if c["logprob_sum"] is not None:  # None: a teacher's text (the reference) was never sampled
              c["logprob_sum"] = round(c["logprob_sum"], 3)
      lines = sorted(json.dumps(r, sort_keys=True) for r in records)
      out[rel] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    elif path.suffix == ".json":
      obj = json.loads(path.read_text())
      for key in ("sources", "compute", "created", "num_torn_lines", "output_dir", "throughput"):
        obj.pop(key, None) if isinstance(obj, dict) else None
      out[rel] = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    else:
      out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@pytest.mark.timeout(300)
def test_interrupted_run_resumes_to_identical_artifacts(smoke_run, tmp_path, xla_cache):
  reference, _ = smoke_run
  out = tmp_path / "run"
  proc = run_smoke(out, xla_cache, "--config.debug.stop_after=iter_1/collect:5")  # inside collection
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "re-run the same command to resume" in proc.stdout
  assert (out / "iter_0/eval/DONE").exists() and not (out / "iter_1/collect/DONE").exists()
  assert len((out / "iter_1/collect/rollouts.jsonl").read_text().splitlines()) == 1 + 5
  proc = run_smoke(out, xla_cache, "--config.debug.stop_after=iter_1/train:2")  # SIGKILL after step 2's ckpt
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert (out / "iter_1/collect/DONE").exists() and not (out / "iter_1/train/DONE").exists()
  proc = run_smoke(out, xla_cache, "--config.debug.stop_after=iter_1/eval:done", "--verbosity=0")  # between stages
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert _ABSL_INFO.search(proc.stderr)  # absl's own --verbosity flag brings the INFO records back
  assert json.loads((out / "iter_1/train/DONE").read_text())["resumed_from"] == 2
  assert (out / "iter_1/eval/DONE").exists() and not (out / "iter_1/control/train/DONE").exists()
  proc = run_smoke(out, xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "iter_0/train: done (skipped)" in proc.stdout
  log = (out / "run.log").read_text()  # every invocation appended to the same log
  assert log.count("re-run the same command to resume") == 2 and "iter_0/train: done (skipped)" in log
  mine, theirs = _digest(out), _digest(reference)
  assert sorted(mine) == sorted(theirs)
  assert {k for k in mine if mine[k] != theirs[k]} == set()
  # The compute table counts every invocation's tokens, not only the last one's.
  tokens = lambda run: [(r["decode_tokens"], r["train_tokens"])  # noqa: E731
                        for r in json.loads((run / "summary.json").read_text())["compute"]]
  assert tokens(out) == tokens(reference)
  assert not list(out.rglob(".lock"))  # the killed invocations' locks were taken over, then released


@pytest.mark.timeout(300)
def test_a_finished_stage_with_a_lost_output_is_recomputed(smoke_run, tmp_path, xla_cache):
  import shutil
  reference, _ = smoke_run
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  (out / "iter_1/eval/metrics.json").unlink()  # was a TypeError in the summary on every rerun
  proc = run_smoke(out, xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"iter_1/eval: marked done but {out}/iter_1/eval/metrics.json is missing; recomputing" in proc.stdout
  assert "iter_1/train: done (skipped)" in proc.stdout
  summary = lambda run: json.loads((run / "summary.json").read_text())  # noqa: E731
  assert summary(out)["metrics"] == summary(reference)["metrics"]


@pytest.mark.timeout(300)
def test_tampered_weights_and_training_records_are_refused_naming_the_file(smoke_run, tmp_path, xla_cache):
  import shutil
  reference, _ = smoke_run
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  weights = out / "iter_1/train/hf/model.safetensors"
  data = bytearray(weights.read_bytes())
  data[len(data) // 2] ^= 0x01  # one flipped bit was evaluated, and trained on, without a warning
  weights.write_bytes(bytes(data))
  shutil.rmtree(out / "iter_1/eval")
  proc = run_smoke(out, xla_cache)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert f"{weights}: sha256" in last and "iter_1/train/DONE" in last and "export it again" in last, last
  assert not (out / "iter_1/eval/DONE").exists()
  shutil.rmtree(out / "iter_1/train/hf")  # as the message says: re-exported from the last checkpoint
  records = out / "iter_2/collect/data/sft.jsonl"
  lines = [json.loads(line) for line in records.read_text().splitlines()]
  lines[0]["weight"] *= 100
  records.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
  (out / "iter_2/train/DONE").unlink()
  proc = run_smoke(out, xla_cache)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "iter_1/train: marked done but" in proc.stdout and "iter_1/eval: done in" in proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert f"{records}: sha256" in last and "manifest.json" in last, last
  assert json.loads((out / "iter_1/eval/metrics.json").read_text())["m1@t1"] == json.loads(
      (reference / "iter_1/eval/metrics.json").read_text())["m1@t1"]


def test_help_exits_zero():
  proc = subprocess.run([sys.executable, "-m", "rise_jax.run", "--help"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and "--config" in proc.stdout


def test_loop_learner_honours_sampling_on_overflow(tmp_path, monkeypatch):
  """The loop's learner is built with `sampling.on_overflow` (it once got the generator's default, "raise")."""
  import types

  import rise_jax.pipeline.resources
  from rise_jax.config import finalize
  from rise_jax.models.configs import get_preset
  from rise_jax.pipeline.resources import Resources

  built = {}

  def fake_engine(model, **options):
    built.update(options)
    return types.SimpleNamespace(config=model.config)

  monkeypatch.setattr(rise_jax.pipeline.resources, "Engine", fake_engine)  # where learner looks it up
  c = recipes.toy_smoke()
  c.output_dir, c.sampling.on_overflow = str(tmp_path), "report"
  Resources(finalize(c), tmp_path).learner(types.SimpleNamespace(config=get_preset("toy-llama").config), name="learner")
  assert built["on_overflow"] == "report" and built["max_seq_len"] == c.sampling.max_cache_length


def test_output_dir_spelling_and_moves_do_not_change_the_run(tmp_path, monkeypatch):
  """The same directory as absolute, ./x, x/, or moved elsewhere resumes (output_dir is not part of the identity)."""
  from rise_jax.config import finalize

  def opened(output_dir):
    c = recipes.toy_smoke()
    c.output_dir = output_dir
    run_dir = rundir.RunDir(output_dir, finalize(c))
    run_dir.open()
    return run_dir

  monkeypatch.chdir(tmp_path)
  first = opened(str(tmp_path / "x"))
  (tmp_path / "x" / "iter_0" / "eval").mkdir(parents=True)
  (tmp_path / "x" / "iter_0" / "eval" / "DONE").write_text("{}\n")  # results: a mismatch would be refused
  for spelling in ("./x", "x/", "x"):
    assert opened(spelling).hash == first.hash
  (tmp_path / "x").rename(tmp_path / "moved")
  assert opened(str(tmp_path / "moved")).done("iter_0/eval")


def _smoke_config(tmp_path, **fields):
  from rise_jax.config import finalize
  c = recipes.toy_smoke()
  c.output_dir = str(tmp_path / "run")
  for dotted, value in fields.items():
    section, name = dotted.split(".")
    c[section][name] = value
  return finalize(c)


def test_a_run_initialises_distributed_and_validates_once(tmp_path, monkeypatch):
  """Once per process, by the loop: the train stage hands the trainer the validated config."""
  from rise_jax.train import trainer
  calls = {"initialize_distributed": 0, "validate": 0}
  init, validate = trainer.initialize_distributed, config_lib.validate

  def counted_init(cfg):
    calls["initialize_distributed"] += 1
    return init(cfg)

  def counted_validate(cfg, **kwargs):
    calls["validate"] += kwargs.get("_per_iteration", True)  # not validate's own per-iteration recursion
    return validate(cfg, **kwargs)

  monkeypatch.setattr(trainer, "initialize_distributed", counted_init)
  monkeypatch.setattr(loop, "initialize_distributed", counted_init)  # the loop's own name for it
  monkeypatch.setattr(config_lib, "validate", counted_validate)
  cfg = _smoke_config(tmp_path, **{"rise.boost_validate_every": None, "rise.boost_stop_accuracy": None,
                                   "debug.stop_after": "iter_0/train:done"})
  with pytest.raises(plan.StopRequested, match="stopped after iter_0/train"):
    loop.run(cfg, log=lambda line: None)
  assert (tmp_path / "run" / "iter_0" / "train" / "DONE").is_file()
  assert calls == {"initialize_distributed": 1, "validate": 1}


def test_run_refuses_a_locked_directory_at_once(tmp_path):
  from rise_jax import files
  cfg = _smoke_config(tmp_path)
  with files.RunLock(tmp_path / "run"):
    with pytest.raises(files.RunDirLocked, match=rf"{tmp_path / 'run'} is in use by another run \(pid {os.getpid()}"):
      loop.run(cfg)
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("fields, needle", [
    ({"task.name": "gsm8k", "task.train_source": "missing/train.jsonl"}, r"task\.train_source"),
    ({"model.preset": "no-such-model"}, r"model\.preset"),
    ({"task.name": "tyo"}, r"task\.name"),
    ({"mesh.train": (3, 1, 1)}, r"mesh\.train"),
])
def test_config_problems_are_reported_before_the_run_directory_exists(tmp_path, fields, needle):
  with pytest.raises(ValueError, match=needle):
    loop.run(_smoke_config(tmp_path, **fields))
  assert not (tmp_path / "run").exists()


def test_an_empty_train_file_fails_before_the_run_directory_exists(tmp_path):
  train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
  train.write_text("")
  test.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
  cfg = _smoke_config(tmp_path, **{"task.name": "gsm8k", "task.train_source": str(train),
                                   "task.test_source": str(test), "task.dev_size": 0,
                                   "rise.boost_validate_every": None, "rise.boost_stop_accuracy": None})
  with pytest.raises(ValueError, match=rf"{train}: holds no records"):
    loop.run(cfg)
  assert not (tmp_path / "run").exists()
