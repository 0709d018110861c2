"""Reading sft/1 records (errors name file, line and field) and the batch plan."""

import json

import numpy as np
import pytest

from rise_jax.train import data as D
from rise_jax.train import loss as L

GOOD = {"id": "a", "weight": 1.5, "messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "x", "train": True}]}


def _write(tmp_path, lines):
  path = tmp_path / "sft.jsonl"
  path.write_text("".join(l + "\n" for l in lines))
  return path


@pytest.mark.parametrize("bad, where, field", [
    ("{not json", 2, "bad JSON"),
    (json.dumps({**GOOD, "messages": [{"content": "q"}, GOOD["messages"][1]]}), 2, "'messages[0].role'"),
    (json.dumps({**GOOD, "weight": -1.0}), 2, "'weight'"),
    ('{"id": "b", "weight": NaN, "messages": []}', 2, "'weight'"),
    ('{"id": "b", "weight": Infinity, "messages": []}', 2, "'weight'"),
    (json.dumps({**GOOD, "id": "huge", "weight": 1e308}), 2, "'weight': must be finite and in [0, 1e+12]"),
    (json.dumps({**GOOD, "weight": "1"}), 2, "'weight'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "id"}), 2, "'id'"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "q", "train": True}]}), 2, "'messages[0].train'"),
])
def test_malformed_record_names_file_line_field(tmp_path, bad, where, field):
  path = _write(tmp_path, [json.dumps(GOOD), bad, json.dumps(GOOD)])
  with pytest.raises(D.RecordError) as e:
    D.read_records(path)
  assert f"{path}:{where}:" in str(e.value) and field in str(e.value)


def test_invalid_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
  with pytest.raises(D.RecordError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column 12\)"):
    D.read_records(path)


def test_reads_good_records_and_in_memory_dicts(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "id": "b", "weight": 0})])
  records = D.read_records(path)
  assert [r.id for r in records] == ["a", "b"] and records[1].where == f"{path}:3"
  assert D.as_records([GOOD])[0].weight == 1.5
  with pytest.raises(D.RecordError, match=r"records\[0\]: field 'weight'"):
    D.as_records([{**GOOD, "weight": float("nan")}])


def test_reads_parquet_with_row_numbers(tmp_path):
  import datasets
  bad = {**GOOD, "id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}
  datasets.Dataset.from_list([GOOD, {**GOOD, "id": "c"}]).to_parquet(str(tmp_path / "ok.parquet"))
  records = D.read_records(tmp_path / "ok.parquet")
  assert [r.id for r in records] == ["a", "c"] and records[0].messages[1]["train"] is True
  datasets.Dataset.from_list([GOOD, bad]).to_parquet(str(tmp_path / "bad.parquet"))
  with pytest.raises(D.RecordError, match=r"bad.parquet:row 1: field 'messages\[1\].role'"):
    D.read_records(tmp_path / "bad.parquet")


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    mask = np.zeros(n, np.float32)
    mask[rng.integers(0, n):] = 1
    out.append(D.Example(f"e{i}", float(rng.uniform(0.1, 3)), rng.integers(3, 50, n).astype(np.int32),
                         rng.integers(3, 50, n).astype(np.int32), mask))
  return out


@pytest.mark.parametrize("packing", [False, True])
def test_plan_covers_every_example_once_per_epoch(packing):
  lengths = list(np.random.default_rng(1).integers(3, 60, 37))
  kw = dict(seed=3, global_batch=8, micro_batch=2, row_multiple=4, max_length=64, packing=packing)
  steps = D.plan(lengths, epochs=2, **kw)
  assert steps == D.plan(lengths, epochs=2, **kw)                         # same on every host
  assert steps != D.plan(lengths, epochs=2, **{**kw, "seed": 4})
  for epoch in range(2):
    ids = [i for s in steps if s.epoch == epoch for i in s.example_ids]
    assert sorted(ids) == list(range(37))
  for s in steps:
    num_micro, rows, length = s.shape
    assert num_micro == 4 and rows % 4 == 0 and length <= 64
    assert all(sum(lengths[i] for i in row) <= length for micro in s.rows for row in micro)
    assert len(s.example_ids) <= 8


@pytest.mark.parametrize("per_octave", [1, 2, 4, 8])
def test_bucket_length_is_the_smallest_grid_length_that_fits(per_octave):
  """Against the grid written out: per octave (2^k, 2^(k+1)], lengths 2^k + j 2^k / per_octave (multiples of 8,
  at least 16), capped at max_length; 1 per octave is the power-of-two rule."""
  grid = [16]
  for k in range(4, 11):
    spacing = max(2 ** k // per_octave, 8)
    grid += [2 ** k + spacing * j for j in range(1, 2 ** k // spacing + 1)]
  for n in range(1, 1025):
    want = min(g for g in grid if g >= n)
    assert D.bucket_length(n, 2048, per_octave) == want, n
    assert D.bucket_length(n, 100, per_octave) == min(want, 100)
  if per_octave == 1:
    assert [D.bucket_length(n, 2048) for n in (1, 17, 33, 65, 129)] == [16, 32, 64, 128, 256]
  # The padding a step pays is bounded: < 2x with powers of two, < 1 + 1/per_octave above the floor.
  assert max(D.bucket_length(n, 4096, per_octave) / n for n in range(64, 2049)) <= 1 + 1 / per_octave + 1e-9


def test_plan_pads_each_step_to_its_bucket():
  lengths = [33] * 16 + [166] * 16
  for per_octave, want in ((1, {64, 256}), (4, {40, 192})):
    steps = D.plan(lengths, epochs=1, seed=0, global_batch=16, micro_batch=16, row_multiple=1, max_length=256,
                   packing=False, buckets_per_octave=per_octave)
    assert {s.length for s in steps} == want


def test_packed_batch_weights_equal_unpacked_estimator():
  """Materialised packed rows give the same loss weights per example as one example per row."""
  examples = _examples([5, 9, 4, 7, 3, 6])
  lengths = [e.length for e in examples]
  kw = dict(seed=0, global_batch=6, micro_batch=3, row_multiple=1, max_length=16)
  for estimator in L.ESTIMATORS:
    sums = {}
    for packing in (False, True):
      (step,) = D.plan(lengths, epochs=1, packing=packing, **kw)
      b = D.materialize(step, examples, estimator, slice(None))
      per_example = {}
      for m, micro in enumerate(step.rows):
        for r, row in enumerate(micro):
          for s, e in enumerate(row, 1):
            sel = b["segment_ids"][m, r] == s
            np.testing.assert_array_equal(b["input_ids"][m, r][sel], examples[e].input_ids)
            np.testing.assert_array_equal(b["positions"][m, r][sel], np.arange(examples[e].length))
            per_example[e] = b["weights"][m, r][sel]
      sums[packing] = per_example
    for e in range(6):
      np.testing.assert_allclose(sums[True][e], sums[False][e], rtol=1e-6)
    stats = D.step_stats(step, examples, estimator)
    assert stats.examples == 6 and stats.normalizer == pytest.approx(L.normalizer(
        estimator, [x.weight for x in examples], [x.loss_mask.sum() for x in examples]), rel=1e-12)


def test_chunk_plan_calls_cover_steps_in_order_and_end_at_boundaries_and_shape_changes():
  rows = (((0,),),)
  steps = [D.StepPlan(0, rows, n) for n in [32] * 7 + [64] * 2 + [32] * 11]  # 20 steps, shape changes at 7, 9
  calls = D.chunk_plan(steps, 0, 4, boundaries=[6, 12, 18])
  # Runs [0, 6) [6, 7) [7, 9) [9, 12) [12, 18) [18, 20), cut into 4 steps or powers of two (few programs).
  assert [(c.start, c.stop) for c in calls] == [(0, 4), (4, 6), (6, 7), (7, 9), (9, 11), (11, 12), (12, 16),
                                                (16, 18), (18, 20)]
  for c in calls:
    assert len({steps[i].shape for i in c}) == 1
  # A run resumed at a boundary (a checkpoint step) makes the calls the uninterrupted run made from there.
  assert D.chunk_plan(steps, 12, 4, boundaries=[6, 12, 18]) == calls[6:]
  assert D.chunk_plan(steps, 20, 4, boundaries=[]) == []
  assert [len(c) for c in D.chunk_plan(steps, 0, 1, boundaries=[])] == [1] * 20


def test_prefetch_yields_in_order_ahead_and_raises_where_produce_failed():
  import threading
  from rise_jax.train.prefetch import prefetch
  produced = []
  ahead = threading.Event()

  def produce(i):
    produced.append(i)
    if i == 2:
      ahead.set()
    if i == 5:
      raise KeyError(i)
    return i * 10

  it = prefetch(range(8), produce, depth=2)
  assert next(it) == 0
  assert ahead.wait(5)                   # item 2 was produced while the consumer held item 0
  assert [next(it) for _ in range(4)] == [10, 20, 30, 40]
  with pytest.raises(KeyError):
    next(it)
  assert produced == list(range(6))      # nothing after the failure

  it = prefetch(range(100), lambda i: i, depth=1)
  assert next(it) == 0
  it.close()                             # the consumer leaving early stops the thread
  assert not any(t.name == "rise_jax-prefetch" for t in threading.enumerate())


def test_cli_help_exits_zero():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "rise_jax.train", "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "--config" in out.stdout + out.stderr
