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
