"""The trainer's TensorBoard output: the scalars in the event file equal the metrics.jsonl records.

The event file is read back without tensorboardX's writer code: TFRecord framing (length, crc, payload, crc)
parsed by hand and each payload decoded as a TensorBoard `Event` protobuf.
"""

import json
import pathlib
import struct

import pytest

from rise_jax.train import trainer

from tensorboardX.proto import event_pb2  # a dependency of rise_jax (install_requires)


def _scalars(tb_dir: pathlib.Path) -> dict[tuple[str, int], float]:
  out = {}
  (events,) = sorted(tb_dir.glob("events.out.tfevents.*"))
  data = events.read_bytes()
  at = 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    payload = data[at + 12:at + 12 + length]  # skip the length's crc
    at += 12 + length + 4                      # and the payload's
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      out[(value.tag, event.step)] = value.simple_value
  return out


def test_metrics_reach_tensorboard_and_match_jsonl(tmp_path):
  sink = trainer._MetricsSink(tmp_path / "metrics.jsonl", resume_step=0)
  assert sink.tb is not None
  records = [{"step": 1, "loss": 2.5, "lr": 1e-3, "examples": 8},
             {"step": 2, "loss": 2.25, "lr": 2e-3, "examples": 8, "note": "not a number: not logged"}]
  sink.write(records)
  sink.tb.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == records
  scalars = _scalars(tmp_path / "tb")
  expected = {(f"train/{k}", r["step"]): float(v) for r in records for k, v in r.items()
              if k != "step" and isinstance(v, (int, float))}
  assert scalars.keys() == expected.keys()
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6), key


def test_resume_truncates_jsonl_past_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
  trainer._MetricsSink(path, resume_step=2).tb.close()
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
