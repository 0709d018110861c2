"""`python -m rise_jax.evaluate` end to end: a tiny random model on the toy task, through the real CLI.

One uninterrupted run is checked for a valid log, a written report and metric values recomputed here from the
log by the paper's definitions. A second run is SIGKILLed after at least one episode is flushed, left with a torn
half-written line (as a kill mid-write leaves it), and resumed: its logs must hold exactly the uninterrupted
run's records, but for the prefill counts, which depend on what the engine's prefix cache held in each process.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from rise_jax.rollout import log as rollout_log

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROBLEMS, TURNS, K = 6, 3, 3


def _args(out):
  return [sys.executable, "-m", "rise_jax.evaluate", "--config=configs/eval_toy.py", f"--config.output_dir={out}",
          f"--config.task.test_size={NUM_PROBLEMS}", f"--config.eval.turns={TURNS}", f"--config.eval.parallel_k={K}",
          "--config.sampling.max_new_tokens=8", "--config.sampling.max_cache_length=256",
          "--config.sampling.batch_size=2", "--config.mesh.sample=(1,1,1)"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  # One CPU device (not the test session's 8 fake ones) and a compilation cache shared by the runs.
  e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return e


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
  out = tmp_path_factory.mktemp("eval") / "run"
  proc = subprocess.run(_args(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_help_exits_zero():
  proc = subprocess.run([sys.executable, "-m", "rise_jax.evaluate", "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "--config" in proc.stdout


@pytest.mark.timeout(300)
def test_end_to_end_log_report_and_metrics(uninterrupted):
  out = uninterrupted
  _, seq, torn = rollout_log.read_rollouts(out / "rollouts.jsonl")  # validates every record
  _, par, _ = rollout_log.read_rollouts(out / "rollouts_parallel.jsonl")
  assert torn == 0 and len(seq) == len(par) == NUM_PROBLEMS
  # No oracle: every episode runs all turns, the failure message after each but the last.
  for r in seq:
    assert r["stop"] == "max_turns" and len(r["turns"]) == TURNS
    assert [t["feedback"] is None for t in r["turns"]] == [False] * (TURNS - 1) + [True]
    assert all(len(t["candidates"]) == 1 and t["chosen"] == 0 for t in r["turns"])
    # Later turns continue the KV cache: only part of the history is prefilled again.
    assert r["turns"][0]["prefill_tokens"] == r["turns"][0]["history_tokens"]
    assert all(t["prefill_tokens"] < t["history_tokens"] for t in r["turns"][1:])
  assert all(len(r["turns"]) == 1 and len(r["turns"][0]["candidates"]) == K for r in par)
  # The parallel run draws its own random numbers: its first sample is not the sequential run's first turn.
  first_turn = {r["problem_id"]: r["turns"][0]["candidates"][0]["token_ids"] for r in seq}
  assert all(r["turns"][0]["candidates"][0]["token_ids"] != first_turn[r["problem_id"]] for r in par)
  for name in ("metrics.json", "report.md", "throughput.json", "config.json"):
    assert (out / name).is_file(), name
  assert list(out.glob("*.png"))
  metrics = json.loads((out / "metrics.json").read_text())

  # The paper's definitions, recomputed from the logs (correct means reward == 1).
  def right(c):
    return c["reward"] == 1.0

  chosen = [[right(t["candidates"][t["chosen"]]) for t in r["turns"]] for r in seq]
  samples = [[right(c) for c in r["turns"][0]["candidates"]] for r in par]
  assert metrics["m1@t1"] == pytest.approx(sum(c[0] for c in chosen) / NUM_PROBLEMS)
  assert metrics[f"p1@t{TURNS}"] == pytest.approx(sum(any(c) for c in chosen) / NUM_PROBLEMS)
  assert metrics[f"p{K}@t1"] == pytest.approx(sum(any(s) for s in samples) / NUM_PROBLEMS)
  assert metrics["per_turn_accuracy"] == pytest.approx([sum(c[t] for c in chosen) / NUM_PROBLEMS
                                                        for t in range(TURNS)])
  # Invariants within one run.
  assert metrics[f"p1@t{TURNS}"] >= metrics["m1@t1"] and metrics[f"p{K}@t1"] >= metrics[f"m{K}@t1"]
  assert metrics["num_problems"] == NUM_PROBLEMS
  throughput = json.loads((out / "throughput.json").read_text())
  assert throughput["sequential"]["episodes"] == NUM_PROBLEMS
  assert throughput["sequential"]["decode_tokens"] == sum(c["num_tokens"] for r in seq for t in r["turns"]
                                                          for c in t["candidates"])


def _pop_logprob_sums(records) -> list[float]:
  """Take the candidates' log-prob sums out of the records: float32 sums depend on the batch a row was sampled in
  (a resumed chunk holds fewer rows; tests/test_run.py rounds them for the same reason), the tokens do not."""
  return [c.pop("logprob_sum") for r in records for t in r["turns"] for c in t["candidates"]]


def _pop_prefill_tokens(records) -> list[tuple[int, int]]:
  """Take each turn's prefill_tokens out of the records: (prefill_tokens, history_tokens) per turn."""
  return [(t.pop("prefill_tokens"), t["history_tokens"]) for r in records for t in r["turns"]]


@pytest.mark.timeout(300)
def test_resume_after_sigkill_equals_uninterrupted(uninterrupted, tmp_path, env):
  out = tmp_path / "run"
  log = out / "rollouts.jsonl"
  proc = subprocess.Popen(_args(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_bytes().count(b"\n") >= 2):  # header + at least one episode
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, "no episode flushed in time"
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait(timeout=30)
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL  # killed, not finished
  _, before, _ = rollout_log.read_rollouts(log)
  assert len(before) >= 1
  # What a kill in the middle of a write leaves behind, in the log that was being written when it came.
  parallel = out / "rollouts_parallel.jsonl"
  torn_log = log if len(before) < NUM_PROBLEMS or not parallel.is_file() else parallel
  with open(torn_log, "ab") as f:
    f.write(b'{"problem_id": "toy/test/5", "task": "to')

  resumed = subprocess.run(_args(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for name in ("rollouts.jsonl", "rollouts_parallel.jsonl"):
    _, got, torn = rollout_log.read_rollouts(out / name)
    _, want, _ = rollout_log.read_rollouts(uninterrupted / name)
    assert torn == 0
    key = lambda r: r["problem_id"]  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    got_sums, want_sums = _pop_logprob_sums(got), _pop_logprob_sums(want)
    # prefill_tokens count what this process's prefix cache did not hold; a resumed process starts empty.
    got_prefill, want_prefill = _pop_prefill_tokens(got), _pop_prefill_tokens(want)
    assert all(p <= h for p, h in got_prefill + want_prefill), name
    assert got == want, name  # every token, text, reward and other count exactly
    assert got_sums == pytest.approx(want_sums, rel=1e-6), name
  # The resumed process skipped what was already logged and ran the rest.
  throughput = json.loads((out / "throughput.json").read_text())
  assert throughput["sequential"]["skipped"] == len(before)
  assert throughput["sequential"]["episodes"] == NUM_PROBLEMS - len(before)


def _eval_toy_config(tmp_path):
  """configs/eval_toy.py writing into tmp_path/run."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("eval_toy", REPO / "configs" / "eval_toy.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.output_dir = str(tmp_path / "run")
  return cfg


def test_evaluate_protocols_draws_and_self_refine_with_a_scripted_learner(tmp_path):
  """The whole evaluate flow in-process (no model): which protocols run, on which prompts, into which files, and
  the metrics they give, with a learner whose answers are known."""
  from rise_jax import evaluate
  from rise_jax.tasks.prompts import get_prompt_set
  from rise_jax.rollout.policies import ScriptedPolicy

  cfg = _eval_toy_config(tmp_path)
  cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k, cfg.eval.draws = 4, 2, 3, 2
  cfg.eval.self_refine = True
  references = {}

  def respond(request, j):
    right = references[request.key].split("=")[-1]
    if request.messages[0]["content"] == get_prompt_set("self_refine").instruction:
      return f"={right}"                          # Self-Refine prompts: always right
    if request.stream == "parallel":
      return f"={right}" if j == 1 else "=0"      # one right sample of three; the vote picks "0"
    return "=0" if request.turn == 1 else f"={right}"  # sequential: wrong, then right

  from rise_jax.tasks import task_from_config
  references.update({p.id: p.reference for p in task_from_config(cfg.task).load("test")})
  learner = ScriptedPolicy(respond, name="scripted")
  metrics = evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)

  out = tmp_path / "run"
  seeds = {}
  for name in ("rollouts.jsonl", "rollouts_draw1.jsonl", "rollouts_parallel.jsonl", "self_refine/rollouts.jsonl"):
    _, records, _ = rollout_log.read_rollouts(out / name)
    assert len(records) == 4, name
    seeds[name] = {(r["protocol"]["kind"], r["protocol"]["prompt_set"], r["protocol"]["seed"]) for r in records}
  # The one evaluation seed rule (rise.algorithm.eval_seed, the RISE loop's): draw d seed + 1 + 2d, parallel seed + 2.
  assert seeds == {"rollouts.jsonl": {("sequential", "toy", 1)}, "rollouts_draw1.jsonl": {("sequential", "toy", 3)},
                   "rollouts_parallel.jsonl": {("parallel", "toy", 2)},
                   "self_refine/rollouts.jsonl": {("sequential", "self_refine", 1)}}
  # Sequential: wrong then right, no oracle; majority over turns ties 1-1 and `earliest` picks the wrong one.
  assert metrics["m1@t1"] == 0.0 and metrics["p1@t2"] == 1.0 and metrics["m1@t2"] == 0.0
  assert metrics["per_turn_accuracy"] == [0.0, 1.0]
  assert metrics["p3@t1"] == 1.0 and metrics["m3@t1"] == 0.0
  refine = json.loads((out / "self_refine" / "metrics.json").read_text())
  assert refine["m1@t1"] == 1.0 and refine["per_turn_accuracy"] == [1.0, 1.0]
  assert (out / "report.md").is_file() and (out / "self_refine" / "report.md").is_file()
  written = json.loads((out / "metrics.json").read_text())
  assert written["throughput"]["parallel"]["episodes"] == 4
  assert written["sampling"]["parallel"] == {"candidates": 12, "stop": 12, "length": 0, "cache_full": 0,
                                             "resamples": 0, "flagged_degenerate": 0}
  assert written["sampling"]["sequential"]["candidates"] == 2 * 4 * 2  # two draws of 4 problems x 2 turns
  assert "## Sampling" in (out / "report.md").read_text()
  # SCoRe's metrics from the no-oracle logs of both draws: every episode goes wrong -> right.
  assert written["score"]["num_episodes"] == [8] and written["score"]["delta_i_to_c"] == [1.0]
  assert written["score"]["delta_c_to_i"] == [0.0] and written["score"]["delta_t1_t2"] == [1.0]


@pytest.mark.parametrize("oracle", [False, True])
def test_scores_metrics_come_from_the_sequential_log_without_oracle_only(tmp_path, oracle):
  """With `eval.oracle` the only sequential log stops at the first correct turn: no SCoRe metrics from it."""
  from rise_jax import evaluate
  from rise_jax.rollout.policies import ScriptedPolicy

  cfg = _eval_toy_config(tmp_path)
  cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k, cfg.eval.oracle = 4, 3, 2, oracle
  # Turn 1 right only for some problems, then always right: no-oracle i->c is the problems wrong at turn 1.
  from rise_jax.tasks import task_from_config
  problems = task_from_config(cfg.task).load("test")
  references = {p.id: p.reference.split("=")[-1] for p in problems}
  first_right = {p.id for p in problems[:1]}
  learner = ScriptedPolicy(lambda r, j: f"={references[r.key]}" if r.turn > 1 or r.key in first_right else "=0",
                           name="scripted")
  evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  written = json.loads((tmp_path / "run" / "metrics.json").read_text())
  md = (tmp_path / "run" / "report.md").read_text()
  if oracle:
    assert written["score"]["available"] is False and "oracle" in written["score"]["reason"]
    assert "not available (the sequential log used an oracle" in md
  else:
    assert written["score"]["delta_i_to_c"] == [0.75, 0.0] and written["score"]["delta_c_to_i"] == [0.0, 0.0]
    assert written["score"]["acc_t1"] == [0.25, 1.0] and written["sources"]["score"].endswith("rollouts.jsonl")
    assert "| t1->t2 | 4 |" in md


@pytest.mark.slow
@pytest.mark.parametrize("task,source", [("gsm8k", "gsm8k/test.jsonl"), ("math", "math/test.jsonl")])
def test_local_hf_checkpoint_on_local_data(tmp_path, shared_dir, llama2_tokenizer_model, task, source):
  """A local HF checkpoint (tiny, random, Llama-2 vocabulary) on the local GSM8K / MATH files, from the CLI."""
  from fixtures_models import save_tiny_llama

  ckpt = save_tiny_llama(tmp_path / "ckpt", vocab_size=32000, max_position_embeddings=2048)
  config = "configs/eval_gsm8k.py" if task == "gsm8k" else "configs/eval_math.py"
  args = [sys.executable, "-m", "rise_jax.evaluate", f"--config={config}", f"--config.model.hf_path={ckpt}",
          f"--config.tokenizer.path={llama2_tokenizer_model.parent}", "--config.tokenizer.chat_template=llama2",
          f"--config.task.test_source={shared_dir / 'data' / source}", "--config.task.test_size=3",
          "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.eval.turns=2",
          "--config.eval.parallel_k=2", "--config.sampling.max_new_tokens=8", "--config.sampling.max_cache_length=1024",
          f"--config.output_dir={tmp_path / 'out'}", "--config.mesh.sample=(1,1,1)"]
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, records, _ = rollout_log.read_rollouts(tmp_path / "out" / "rollouts.jsonl")
  assert sorted(r["problem_id"] for r in records) == [f"{task}/test/{i}" for i in range(3)]  # logged as they end
  assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_problems"] == 3


def test_eval_split_dev_evaluates_the_dev_problems(tmp_path):
  """`eval.split="dev"` (for tuning) evaluates exactly the task's dev problems, which are disjoint from test."""
  from rise_jax import evaluate
  from rise_jax.rollout.policies import ScriptedPolicy
  from rise_jax.tasks import task_from_config

  cfg = _eval_toy_config(tmp_path)
  cfg.task.dev_size, cfg.eval.turns, cfg.eval.parallel_k, cfg.eval.split = 6, 1, 1, "dev"
  task = task_from_config(cfg.task)
  dev, test = {p.id for p in task.load("dev")}, {p.id for p in task.load("test")}
  assert len(dev) == 6 and not dev & test
  evaluate.evaluate(cfg, policy=ScriptedPolicy(lambda request, j: "=0", name="scripted"), model="scripted",
                    progress=False)
  _, records, _ = rollout_log.read_rollouts(tmp_path / "run" / "rollouts.jsonl")
  assert {r["problem_id"] for r in records} == dev


def test_an_evaluation_whose_turns_cannot_fit_the_cache_is_refused_before_any_episode_naming_the_problem(tmp_path):
  from rise_jax import evaluate
  from rise_jax.rollout.policies import ScriptedPolicy

  class Capped(ScriptedPolicy):
    capacity = 200  # a sampler's min(max_cache_length, max_position_embeddings) with on_overflow="raise"

  cfg = _eval_toy_config(tmp_path)
  cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k, cfg.sampling.max_new_tokens = 3, 5, 1, 24
  learner = Capped(lambda request, j: "=0", name="scripted")
  # was: the sampler's overflow at turn 4 or 5, naming a hashed sample stream, after turns 1-3 were logged
  with pytest.raises(ValueError, match=r"evaluation \(sequential, config field sampling\.max_cache_length\): "
                                       r"problem toy/test/\d+ needs up to \d+ tokens at turn 5 \(\d+ prompt tokens "
                                       r".*4 earlier turn\(s\).*but a conversation holds 200 \(\d of 3 problems"):
    evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  assert not (tmp_path / "run" / "rollouts.jsonl").exists()
  cfg.eval.window = 2  # the window keeps one earlier turn: it fits
  evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  assert (tmp_path / "run" / "metrics.json").is_file()


def _files(root: pathlib.Path):
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*")
                if p.is_file())


def test_changed_config_is_refused_before_anything_is_written(tmp_path):
  """Logs sampled at temperature 1.0 are never left under a config.json saying 0.5."""
  from rise_jax import evaluate
  from rise_jax import files
  from rise_jax.pipeline import rundir
  from rise_jax.rollout.policies import ScriptedPolicy

  cfg = _eval_toy_config(tmp_path)
  cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k = 2, 1, 1
  learner = ScriptedPolicy(lambda request, j: "=0", name="scripted")
  evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  before = _files(tmp_path / "run")
  cfg.sampling.temperature = 0.5
  with pytest.raises(rundir.ConfigMismatch, match=r"differing fields: sampling\.temperature\."):
    evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  assert _files(tmp_path / "run") == before
  with files.RunLock(tmp_path / "run"):  # a second writer is refused too, before it writes
    cfg.sampling.temperature = 1.0
    with pytest.raises(files.RunDirLocked, match="is in use by another run"):
      evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)


@pytest.mark.parametrize("engine, resumes", [("paged", True), ("static", False)])
def test_a_log_begun_while_a_retired_field_existed_resumes_only_at_the_value_the_code_now_means(
    tmp_path, engine, resumes):
  """Logs written while `sampling.engine` was a field carry a hash that included it; "paged" is what every run
  does now, so such a log resumes, while one hashed with "static" (a removed generator) stays refused."""
  import hashlib
  from rise_jax import config as config_lib
  from rise_jax import evaluate
  from rise_jax.rollout.policies import ScriptedPolicy

  cfg = _eval_toy_config(tmp_path)
  cfg.task.test_size, cfg.eval.turns, cfg.eval.parallel_k = 3, 1, 1
  learner = ScriptedPolicy(lambda request, j: "=0", name="scripted")
  evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
  run = tmp_path / "run"
  # The hash as the code of that time wrote it: sha256 of the identity fields with the field still in (and
  # without the fields added since, which `identity` drops at the value that means the old code).
  saved = config_lib.identity(json.loads((run / "config.json").read_text()))
  assert "toy_form" not in saved["task"]
  saved["sampling"]["engine"] = engine
  old = hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:16]
  log = run / "rollouts.jsonl"
  header, *records = log.read_text().splitlines()
  header = json.loads(header) | {"config_hash": old}
  log.write_text("\n".join([json.dumps(header), *records[:1]]) + "\n")  # one problem logged, two to go
  if resumes:
    evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
    got_header, got, _ = rollout_log.read_rollouts(log)
    assert got_header["config_hash"] == old and len(got) == 3
  else:
    with pytest.raises(rollout_log.RolloutLogError, match="config_hash"):
      evaluate.evaluate(cfg, policy=learner, model="scripted", progress=False)
