"""The sharded step, the loop, checkpoints and the HF export, in-process on 8 fake CPU devices."""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rise_jax import chat
from rise_jax import sharding as sharding_lib
from rise_jax.models.build import build_model
from rise_jax.train import checkpoint as ckpt_lib
from rise_jax.train import data as data_lib
from rise_jax.train import demo, optim, trainer as trainer_lib
from rise_jax.train import loss as loss_lib

from train_helpers import TINY, optim_cfg, tiny_config


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory):
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  return pathlib.Path(build_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy"))


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir):
  return chat.load_tokenizer(toy_tokenizer_dir, "toy")


@pytest.fixture(scope="session")
def tiny_model():
  """Built once (on one device); the trainer copies it into each test's sharding, leaving it intact."""
  return build_model(TINY, seed=0)


@pytest.fixture(scope="session")
def examples(toy_tokenizer):
  records = data_lib.as_records(demo.demo_records(48, seed=1))
  out, report = data_lib.encode_records(records, toy_tokenizer, max_length=128)
  assert report.kept == 48
  return out


def _run(mesh_shape, model, examples, num_steps=3):
  """3 steps of 16 examples (4 micro-batches) on a mesh; returns losses, first-step grads, params, trainer, state."""
  mesh = sharding_lib.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  steps = data_lib.plan([e.length for e in examples], epochs=1, seed=0, global_batch=16, micro_batch=4,
                        row_multiple=4, max_length=128, packing=False)
  # Adam divides by sqrt(v) + eps: with the recipe's eps=1e-8, rounding-level gradient differences on a
  # near-zero gradient can move a weight by ~lr; eps=1e-6 bounds that amplification for this comparison.
  tx, lr = optim.optimizer(optim_cfg(eps=1e-6), 3)
  trainer = trainer_lib.Trainer(model, mesh, tx, lr)
  state = trainer.initial_state(model, seed=0)
  losses = []
  with jax.set_mesh(mesh):
    batch, stats = trainer.batch(steps[0], examples, "sample_mean")
    grads, _, _ = trainer.loss_and_grads(state.params, batch, jnp.float32(stats.normalizer))
    grads = jax.device_get(grads)
    for s in steps[:num_steps]:
      batch, stats = trainer.batch(s, examples, "sample_mean")
      state, metrics = trainer.step(state, batch, jnp.float32(stats.normalizer))
      losses.append(float(metrics["loss"]))
  return np.array(losses), grads, jax.device_get(state.params), trainer, state, (batch, stats)


def test_sharded_equals_unsharded(tiny_model, examples):
  ref_losses, ref_grads, ref_params, *_ = _run((1, 1, 1), tiny_model, examples)
  for shape in [(1, 4, 2), (2, 2, 2)]:
    losses, grads, params, trainer, state, (batch, stats) = _run(shape, tiny_model, examples)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * 1e-3), params, ref_params)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    print(f"mesh {shape}: max |loss diff| {np.max(np.abs(losses - ref_losses)):.2e}, max |param diff| {worst:.2e}")
    # The sharding is real: parameter specs as the rules say, and the compiled step gathers/reduces over fsdp.
    assert state.params["layers"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert state.params["embedder"].sharding.spec == P("tensor", "fsdp")
    assert state.opt_state[0].mu["layers"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    hlo = trainer.step.lower(state, batch, jnp.float32(stats.normalizer)).compile().as_text()
    assert "all-gather" in hlo and ("reduce-scatter" in hlo or "all-reduce" in hlo)


def test_packed_step_equals_unpacked(tiny_model, toy_tokenizer):
  """The same global batch packed (several examples per row, segment ids, restarting positions) and unpacked
  gives the same loss and gradients: packed examples never attend to each other."""
  records = data_lib.as_records(demo.demo_records(12, seed=4))
  examples, _ = data_lib.encode_records(records, toy_tokenizer, max_length=256)
  mesh = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  out = {}
  for packing in (False, True):
    (step,) = data_lib.plan([e.length for e in examples], epochs=1, seed=0, global_batch=12, micro_batch=6,
                            row_multiple=1, max_length=256, packing=packing)
    tx, lr = optim.optimizer(optim_cfg(), 1)
    trainer = trainer_lib.Trainer(tiny_model, mesh, tx, lr, packing=packing)
    state = trainer.initial_state(tiny_model, seed=0)
    with jax.set_mesh(mesh):
      batch, stats = trainer.batch(step, examples, "self_normalised")
      out[packing] = jax.device_get(trainer.loss_and_grads(state.params, batch, jnp.float32(stats.normalizer)))
    if packing:
      assert max(len(row) for micro in step.rows for row in micro) >= 2
  (g0, l0, s0), (g1, l1, s1) = out[False], out[True]
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(s1["token_weight"], s0["token_weight"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, toy_tokenizer_dir, toy_tokenizer):
  """One uninterrupted single-process train() on 8 devices: the reference for resume and multi-host runs."""
  root = tmp_path_factory.mktemp("reference")
  data = root / "sft.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in demo.demo_records(24, seed=2)))
  cfg = tiny_config(toy_tokenizer_dir, root / "run", profile_steps=(1, 2))
  # Built on the training mesh, as train_worker.py builds it: from jax 0.12 on CPU a normal draw sharded along its
  # minor axis differs from the unsharded draw by an ulp here and there, so a one-device build is another model.
  model = build_model(TINY, mesh=sharding_lib.make_mesh(cfg.mesh.train), seed=0)
  result = trainer_lib.train(cfg, data, root / "run", model=model, tokenizer=toy_tokenizer)
  return cfg, data, result


def test_train_end_to_end_hf_export_and_resume(reference_run, tiny_model, toy_tokenizer):
  """train() writes ckpt/, metrics.jsonl, hf/; transformers loads hf/ to the same logits; a rerun resumes at the
  end; malformed data on the same run directory fails before touching anything."""
  torch = pytest.importorskip("torch")
  import transformers
  cfg, data, result = reference_run
  run = result.out_dir
  assert result.steps == 3 and [m["step"] for m in result.metrics] == [1, 2, 3]
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3] and all(np.isfinite(l["loss"]) for l in lines)
  assert {"tokens_per_s", "tflops_per_s", "grad_norm", "lr", "sum_weights", "accuracy"} <= set(lines[-1])
  assert sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
  assert list((run / "profile").rglob("*.xplane.pb"))  # train.profile_steps=(1, 2) wrote a trace
  ids = np.array([toy_tokenizer.encode("1+2*3=7, 4+5*6=34. Answer")], np.int32)
  ours = np.asarray(result.model(jnp.asarray(ids)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(result.hf_dir), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

  partial = run / ".tmp-hfk3j_x9q2"  # what a kill in the middle of the HF export leaves beside hf/
  (partial / "sub").mkdir(parents=True)
  (partial / "sub" / "model.safetensors").write_bytes(b"half")
  again = trainer_lib.train(cfg, data, run, model=tiny_model, tokenizer=toy_tokenizer)
  assert again.resumed_from == 3 and again.metrics == []
  assert not partial.exists() and again.total_tokens == result.total_tokens > 0
  np.testing.assert_array_equal(np.asarray(again.model.lm_head[...]), np.asarray(result.model.lm_head[...]))

  before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
  bad = run.parent / "bad.jsonl"
  bad.write_text(data.read_text().splitlines()[0] + "\n" + '{"id": "x", "weight": -2, "messages": []}\n')
  with pytest.raises(data_lib.RecordError, match=f"{bad}:2: field 'weight'"):
    trainer_lib.train(cfg, bad, run, model=tiny_model, tokenizer=toy_tokenizer)
  assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_finished_run_refuses_other_optimiser_settings_naming_them(reference_run, tiny_model, toy_tokenizer,
                                                                   monkeypatch):
  """A finished out_dir given another lr is refused (it used to "train" 0 steps and re-export the old weights)."""
  cfg, data, result = reference_run
  other = tiny_config(pathlib.Path(cfg.tokenizer.path), result.out_dir, profile_steps=(1, 2), lr=5e-4,
                      warmup_ratio=0.1)
  before = (result.out_dir / "metrics.jsonl").read_bytes()
  monkeypatch.setattr(trainer_lib, "Trainer", None)  # refused before any model work
  with pytest.raises(ValueError, match=r"ckpt/3 was trained with other settings; differing fields: "
                                       r"train\.lr \(0\.001 there, 0\.0005 now\), train\.warmup_ratio"):
    trainer_lib.train(other, data, result.out_dir, model=tiny_model, tokenizer=toy_tokenizer)
  assert (result.out_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("weights, needle", [
    ((1.0, 1e308), r":2: field 'weight': must be finite and in \[0, 1e\+12\]"),
    ((0.0, 0.0), r": field 'weight': every one of the 2 records has weight 0"),
])
def test_absurd_or_all_zero_weights_fail_before_the_run_directory(tmp_path, toy_tokenizer_dir, weights, needle):
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps({**r, "weight": w}) + "\n"
                          for r, w in zip(demo.demo_records(2, seed=0), weights)))
  with pytest.raises(data_lib.RecordError, match=rf"{data}{needle}"):
    trainer_lib.train(tiny_config(toy_tokenizer_dir, tmp_path / "run"), data, tmp_path / "run")
  assert not (tmp_path / "run").exists()


WORKER = pathlib.Path(__file__).with_name("train_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(spec, devices: int, cache_dir=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if cache_dir is not None:  # a rerun of the same programs loads them instead of compiling again
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish_all(procs, timeout=240):
  """(exit code, output) of every process; past `timeout` all are killed (code None), their output kept."""
  deadline = time.monotonic() + timeout
  finished = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      finished.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
      proc.kill()
      finished.append((None, proc.communicate()[0]))
  return finished


@pytest.mark.timeout(280)
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, reference_run, toy_tokenizer_dir):
  """A run SIGKILLed right after step 2's checkpoint commits, then rerun, ends where the uninterrupted run ends:
  the same loss for every step and the same final parameters."""
  _, data, ref = reference_run
  spec = {"data": str(data), "tokenizer": str(toy_tokenizer_dir), "out_dir": str(tmp_path / "run"),
          "result": str(tmp_path / "killed.json"), "stop_after_step": 2}
  [(code, out)] = _finish_all([_launch(spec, 8, tmp_path / "jax_cache")])
  assert code == -signal.SIGKILL, out[-3000:]
  assert not (tmp_path / "killed.json").exists()
  steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
  [(code, out)] = _finish_all([_launch({**spec, "stop_after_step": None, "result": str(tmp_path / "resumed.json")}, 8,
                                        tmp_path / "jax_cache")])
  assert code == 0, out[-3000:]
  resumed = json.loads((tmp_path / "resumed.json").read_text())
  assert resumed["resumed_from"] == 2 and list(resumed["losses"]) == ["3"]
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [l["loss"] for l in lines] == [m["loss"] for m in ref.metrics]
  np.testing.assert_array_equal(np.asarray(resumed["lm_head"], np.float32), np.asarray(ref.model.lm_head[...]))


@pytest.mark.timeout(280)
def test_two_processes_equal_single_process(tmp_path, reference_run, toy_tokenizer_dir):
  """Two processes x 4 devices on 127.0.0.1 (gloo): disjoint rows that make up each global batch, the same
  losses as one process with 8 devices, and a checkpoint saved and restored across both."""
  _, data, ref = reference_run
  port = _free_port()
  procs = [_launch({"data": str(data), "tokenizer": str(toy_tokenizer_dir), "out_dir": str(tmp_path / "run"),
                    "result": str(tmp_path / f"p{i}.json"), "process_id": i, "num_processes": 2, "port": port,
                    "restore": True}, 4) for i in range(2)]
  finished = _finish_all(procs)
  # Both logs on failure: one process dying or stalling shows up as the other's barrier or heartbeat error.
  assert [code for code, _ in finished] == [0, 0], "\n".join(
      f"--- process {i} (exit {code}):\n{out[-8000:]}" for i, (code, out) in enumerate(finished))
  res = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
  for r in res:
    assert r["process_count"] == 2 and r["num_devices"] == 8 and r["local_devices"] == 4
    ref_losses = [m["loss"] for m in ref.metrics]
    np.testing.assert_allclose([r["losses"][str(s)] for s in (1, 2, 3)], ref_losses, rtol=1e-5)
    assert r["restored_step"] == 3 and r["restored_equal"]
  deltas = [abs(res[0]["losses"][str(s)] - m["loss"]) for s, m in zip((1, 2, 3), ref.metrics)]
  print(f"multi-host max |loss - single-process loss| = {max(deltas):.2e}")
  for (rows0, a0, b0), (rows1, a1, b1) in zip(res[0]["rows"], res[1]["rows"]):
    assert rows0 == rows1 and sorted([(a0, b0), (a1, b1)]) == [(0, rows0 // 2), (rows0 // 2, rows0)]
  np.testing.assert_allclose(np.asarray(res[0]["lm_head"]), np.asarray(ref.model.lm_head[...]), atol=1e-6)


def test_non_finite_loss_stops_without_saving(tmp_path, tiny_model, toy_tokenizer_dir, toy_tokenizer):
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in demo.demo_records(16, seed=3)))
  model = nnx.clone(tiny_model)
  model.final_norm[...] = model.final_norm[...].at[0].set(jnp.nan)
  with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 1"):
    trainer_lib.train(tiny_config(toy_tokenizer_dir, tmp_path / "run"), data, tmp_path / "run", model=model,
                      tokenizer=toy_tokenizer)
  assert not any(p.name.isdigit() for p in (tmp_path / "run" / "ckpt").iterdir())


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_before_training(tmp_path, toy_tokenizer_dir,
                                                                                 toy_tokenizer):
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in demo.demo_records(16, seed=3)))
  small = build_model(dataclasses.replace(TINY, vocab_size=toy_tokenizer.vocab_size - 1), seed=0)
  with pytest.raises(ValueError, match=rf"has {toy_tokenizer.vocab_size} ids but the model's vocab_size is "
                                       rf"{toy_tokenizer.vocab_size - 1}"):  # was: loss is nan at step 1
    trainer_lib.train(tiny_config(toy_tokenizer_dir, tmp_path / "run"), data, tmp_path / "run", model=small,
                      tokenizer=toy_tokenizer)
  assert not (tmp_path / "run" / "ckpt").exists()


def test_latest_meta_reads_files_and_never_syncs_processes(reference_run, monkeypatch, tmp_path):
  """The pre-load resume check runs before process 0 creates ckpt/: a process that saw the directory must not
  enter a barrier the others skip (a two-process run crashed in gloo that way)."""
  from orbax.checkpoint._src.multihost import multihost

  def no_sync(*args, **kwargs):
    raise AssertionError("latest_meta synced the processes")

  monkeypatch.setattr(multihost, "sync_global_processes", no_sync)
  _, _, ref = reference_run
  step, meta = ckpt_lib.latest_meta(ref.hf_dir.parent / "ckpt")
  assert step == 3 and meta["step"] == 3 and meta["total_steps"] == 3
  (tmp_path / "ckpt").mkdir()
  assert ckpt_lib.latest_meta(tmp_path / "ckpt") is None and ckpt_lib.latest_meta(tmp_path / "absent") is None
  assert not (tmp_path / "absent").exists()


def test_checkpoint_strict_tree_and_corrupt_latest_fallback(tmp_path):
  mesh = sharding_lib.make_mesh((1, 8, 1))
  sh = jax.sharding.NamedSharding(mesh, P("fsdp"))
  state = {"params": {"w": jax.device_put(jnp.arange(16.0), sh)}, "step": jnp.int32(0)}
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", every=1, keep=3)
  for step in (1, 2):
    ck.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
  ck.close()
  ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", every=1, keep=3)  # a fresh manager, as after a restart
  step, restored, meta = ck.restore_latest(ckpt_lib.abstract_like(state))
  assert step == 2 and meta == {"step": 2} and restored["params"]["w"].sharding == sh
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(16.0) + 2)
  extra = {**state, "params": {**state["params"], "b": jnp.zeros(3)}}
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"missing leaves \['params/b'\]"):
    ck.restore_latest(ckpt_lib.abstract_like(extra))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="extra leaves"):
    ck.restore_latest(ckpt_lib.abstract_like({"params": state["params"]}))
  # Corrupt every data file of the latest step: the previous one is used, with a warning.
  for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"garbage")
  with pytest.warns(RuntimeWarning, match="unreadable"):
    step, restored, _ = ck.restore_latest(ckpt_lib.abstract_like(state))
  assert step == 1
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(16.0) + 1)
  ck.close()


def test_truncation_drops_oldest_attempts_and_reports_cut_spans(toy_tokenizer):
  """Over-long history loses its oldest (attempt, feedback) pairs, keeping instruction, example and question; a
  trained reply that still does not fit is counted and reported (or raises), never silently dropped."""
  head = demo.demo_records(1, seed=0)[0]["messages"][:3]
  pairs = []
  for i in range(6):
    pairs += [{"role": "assistant", "content": f"attempt {i} " + "x" * 20}, {"role": "user", "content": "Wrong."}]
  long_history = {"id": "long", "weight": 1.0,
                  "messages": head + pairs + [{"role": "assistant", "content": "final", "train": True}]}
  too_long = {"id": "cut", "weight": 1.0, "messages": head + [{"role": "assistant", "content": "y" * 300}]}
  records = data_lib.as_records([long_history, too_long])
  examples, report = data_lib.encode_records(records, toy_tokenizer, max_length=128)
  assert [e.id for e in examples] == ["long"] and report.skipped == {"truncated": ["cut (records[1])"]}
  text = toy_tokenizer.decode(examples[0].input_ids.tolist())
  assert all(m["content"] in text for m in head) and "attempt 5" in text and "attempt 0" not in text
  assert examples[0].length <= 128
  with pytest.raises(data_lib.RecordError, match=r"records\[1\]: record 'cut'"):
    data_lib.encode_records(records, toy_tokenizer, max_length=128, on_truncation="raise")


@pytest.mark.parametrize("which", ["toy", "llama2"])
def test_loss_mask_decodes_to_trained_message(which, toy_tokenizer, request):
  """targets[loss_mask == 1] is exactly the trained assistant message plus its end-of-turn token (Llama 2's
  template closes a reply with " </s>": the space is the template's, before the end-of-turn token)."""
  if which == "toy":
    tok, end = toy_tokenizer, "</s>"
  else:
    tok, end = chat.load_tokenizer(request.getfixturevalue("llama2_tokenizer_model"), "llama2"), " </s>"
  record = demo.demo_records(4, seed=0)[0]
  assert len(record["messages"]) == 6  # two attempts: only the last one is trained
  record["messages"][-1]["content"] = "2*3=6, then 1+6=7. Answer: 7"
  (ex,), _ = data_lib.encode_records(data_lib.as_records([record]), tok, max_length=512)
  trained = ex.targets[ex.loss_mask == 1]
  assert tok.decode(trained.tolist()) == record["messages"][-1]["content"] + end
  assert trained[-1] in tok.eos_token_ids
  idx = np.nonzero(ex.loss_mask)[0]
  assert np.all(np.diff(idx) == 1) and idx[-1] == len(ex.targets) - 1  # one contiguous span, the last message


def test_steps_per_call_equals_one_step_per_call(tiny_model, examples):
  """Three optimiser steps in one scanned device call give the losses and parameters of three separate calls
  (one step each); the first loss is the reference loss from full logits."""
  mesh = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  lengths = [e.length for e in examples]
  steps = data_lib.plan(lengths, epochs=1, seed=0, global_batch=16, micro_batch=16, row_multiple=1,
                        max_length=128, packing=False)
  tx, lr = optim.optimizer(optim_cfg(eps=1e-6), 3)  # eps as in _run: rounding-level differences stay small
  trainer = trainer_lib.Trainer(tiny_model, mesh, tx, lr)
  with jax.set_mesh(mesh):
    state = trainer.initial_state(tiny_model, seed=0)
    batch, stats = trainer.batch(steps[0], examples, "sample_mean")
    logits = trainer.model(state)(batch["input_ids"][0])
    mask = np.asarray(batch["weights"][0]) > 0
    weights = np.array([examples[i].weight for i in steps[0].example_ids])
    ref_first, _ = loss_lib.weighted_nll(logits, batch["targets"][0], mask, weights, "sample_mean")
    single = []
    for s in steps:
      batch, stats = trainer.batch(s, examples, "sample_mean")
      state, metrics = trainer.step(state, batch, jnp.float32(stats.normalizer))
      single.append(float(metrics["loss"]))
    single_params = jax.device_get(state.params)
    call_batch, normalizers, call_stats = trainer.call_batch(steps, examples, "sample_mean")
    assert call_batch["input_ids"].shape == (3, 1, 16, 128)
    state = trainer.steps(trainer.initial_state(tiny_model, seed=0), call_batch, normalizers)[0]
    state2, metrics = trainer.steps(trainer.initial_state(tiny_model, seed=0), call_batch, normalizers)
  np.testing.assert_allclose(single[0], float(ref_first), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), single, rtol=1e-5)
  assert [s.examples for s in call_stats] == [len(s.example_ids) for s in steps]
  assert int(state2.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), jax.device_get(state2.params),
               single_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(state2.params))


def test_validation_scores_every_n_steps_stops_at_the_threshold_and_resume_keeps_the_stop(
    tmp_path, tiny_model, toy_tokenizer_dir, toy_tokenizer):
  """Validation every 2 steps of 6; the score crosses stop_at at step 4: training stops there, the export is the
  step-4 model the score saw, validation.jsonl has steps 2 and 4, and a rerun resumes at 4 without training."""
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in demo.demo_records(48, seed=3)))
  cfg = tiny_config(toy_tokenizer_dir, tmp_path / "run", ckpt_every=100)
  seen = []

  def score(model):  # a deterministic function of the weights; crosses 0.5 after the second validation
    seen.append(np.asarray(model.lm_head[...]).copy())
    return 0.25 * len(seen)

  v = trainer_lib.Validation(every=2, score=score, stop_at=0.5)
  result = trainer_lib.train(cfg, data, tmp_path / "run", model=tiny_model, tokenizer=toy_tokenizer, validation=v)
  assert result.steps == 6 and result.stopped_early_at == 4 and len(seen) == 2
  assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
  lines = [json.loads(l) for l in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
  assert [(l["step"], l["score"], l["stop"]) for l in lines] == [(2, 0.25, False), (4, 0.5, True)]
  np.testing.assert_array_equal(np.asarray(result.model.lm_head[...]), seen[-1])
  assert not np.array_equal(seen[0], seen[1])  # training went on between the validations

  again = trainer_lib.train(cfg, data, tmp_path / "run", model=tiny_model, tokenizer=toy_tokenizer, validation=v)
  assert again.resumed_from == 4 and again.stopped_early_at == 4 and again.metrics == [] and len(seen) == 2
  np.testing.assert_array_equal(np.asarray(again.model.lm_head[...]), seen[-1])
