"""Rollout log (contracts §3): round trip, resume, torn last lines, and the promised errors on bad input."""

import copy
import json

import pytest

from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.log import RolloutLogError, RolloutWriter, read_rollouts, validate_record

import rollout_builders as rb

pytestmark = pytest.mark.timeout(30)


def _records():
  return [rb.sequential("toy/test/0", [("3", 0.0), ("4", 1.0)]),
          rb.sequential("toy/test/1", [("7", 1.0)], oracle=True),
          rb.parallel("toy/test/0", [("4", 1.0), (None, 0.0), rb.candidate("4", 1.0, teacher=True)])]


def test_round_trip_keeps_header_and_records(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  header, records, torn = read_rollouts(path)
  assert torn == 0
  assert header == rb.header() | {"created": header["created"]}
  assert records == _records()
  lines = path.read_bytes().split(b"\n")
  assert len(lines) == 5 and lines[-1] == b""  # header + 3 records, each newline-terminated
  assert json.loads(lines[0])["schema"] == "rise_jax.rollout/2"


def test_header_has_contract_fields():
  h = rollout_log.make_header("abc", "llama")
  assert set(h) == set(rollout_log.HEADER_FIELDS)
  assert h["versions"]["jax"]  # filled from the environment


def test_torn_last_line_is_ignored_and_counted(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  whole = path.read_bytes()
  path.write_bytes(whole + json.dumps(_records()[0]).encode()[:57])
  header, records, torn = read_rollouts(path)
  assert torn == 1 and len(records) == 3


def test_whole_last_record_without_newline_is_kept(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  path.write_bytes(path.read_bytes().rstrip(b"\n"))
  _, records, torn = read_rollouts(path)
  assert torn == 0 and len(records) == 3


def test_resume_truncates_torn_line_and_appends(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records()[:2])
  long_torn = json.dumps(rb.sequential("toy/test/9", [("x" * 3000, 0.0)]))[:2500]  # longer than what follows
  path.write_bytes(path.read_bytes() + long_torn.encode())
  with RolloutWriter(path, rb.header(), fsync=False) as w:
    assert w.num_torn_lines == 1
    assert w.existing_ids() == {"toy/test/0", "toy/test/1"}
    assert len(w) == 2
    w.write(_records()[2])
    assert w.count("toy/test/0") == 2
  _, records, torn = read_rollouts(path)
  assert torn == 0 and records == _records()


def test_resume_after_lost_newline_appends_on_a_new_line(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records()[:2])
  path.write_bytes(path.read_bytes().rstrip(b"\n"))
  with RolloutWriter(path, rb.header(), fsync=False) as w:
    w.write(_records()[2])
  assert read_rollouts(path)[1] == _records()


def test_resume_keeps_original_header(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", [])
  original = read_rollouts(path)[0]
  later = rb.header() | {"created": "2099-01-01T00:00:00+00:00"}
  with RolloutWriter(path, later, fsync=False) as w:
    assert w.header == original
  assert read_rollouts(path)[0] == original


def test_resume_under_another_config_is_refused(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  with pytest.raises(RolloutLogError, match=r"r.jsonl:1: field 'config_hash'.*cafe0123.*beef"):
    RolloutWriter(path, rb.header("beef"))


def test_malformed_line_inside_the_log_names_file_and_line(tmp_path):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  lines = path.read_text().split("\n")
  lines[2] = lines[2][:40]  # a terminated, broken line is corruption, not a torn write
  path.write_text("\n".join(lines))
  with pytest.raises(RolloutLogError, match=r"r.jsonl:3: not valid JSON"):
    read_rollouts(path)


def test_missing_header_and_wrong_schema(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(RolloutLogError, match=r"empty.jsonl:1: no header"):
    read_rollouts(empty)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rb.header() | {"schema": "rise_jax.rollout/0"}) + "\n")
  with pytest.raises(RolloutLogError, match=r"bad.jsonl:1: field 'schema'"):
    read_rollouts(bad)
  no_hash = tmp_path / "no_hash.jsonl"
  h = rb.header()
  del h["config_hash"]
  no_hash.write_text(json.dumps(h) + "\n")
  with pytest.raises(RolloutLogError, match=r"no_hash.jsonl:1: field 'config_hash': missing"):
    read_rollouts(no_hash)


@pytest.mark.parametrize("mutate, field, msg", [
    (lambda r: r.pop("problem_id"), "problem_id", "missing"),
    (lambda r: r["protocol"].pop("kind"), "protocol.kind", "missing"),
    (lambda r: r["protocol"].update(kind="beam"), "protocol.kind", "one of"),
    (lambda r: r["turns"][1]["candidates"][0].pop("reward"), "turns[1].candidates[0].reward", "missing"),
    (lambda r: r["turns"][1]["candidates"][0].update(reward="1"), "turns[1].candidates[0].reward", "number"),
    (lambda r: r["turns"][0]["candidates"][0].update(num_tokens=9), "turns[0].candidates[0].num_tokens",
     "token_ids has 3"),
    (lambda r: r["turns"][0]["candidates"][0].update(finish_reason="eos"), "turns[0].candidates[0].finish_reason",
     "one of"),
    (lambda r: r["turns"][0].update(chosen=1), "turns[0].chosen", "index into the 1"),
    (lambda r: r["turns"][1].update(t=3), "turns[1].t", "turn number 2"),
    (lambda r: r["turns"][0]["sampling"].pop("top_p"), "turns[0].sampling.top_p", "missing"),
    (lambda r: r.update(turns=[]), "turns", "non-empty"),
    (lambda r: r.update(stop="done"), "stop", "one of"),
    (lambda r: r.update(stop="oracle_success"), "stop", "oracle"),
])
def test_bad_record_names_line_and_field(tmp_path, mutate, field, msg):
  path = rb.write_log(tmp_path / "r.jsonl", _records())
  lines = path.read_text().splitlines()
  bad = json.loads(lines[1])
  mutate(bad)
  lines[1] = json.dumps(bad)
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(RolloutLogError, match=rf"r.jsonl:2: field '{__import__('re').escape(field)}': .*{msg}"):
    read_rollouts(path)


def test_oracle_consistency_checks():
  ok = rb.sequential("p", [("1", 0.0), ("2", 1.0)], oracle=True)
  validate_record(ok, "x")
  went_on = rb.sequential("p", [("1", 1.0), ("2", 0.0)], oracle=True)
  with pytest.raises(RolloutLogError, match="continued past a correct turn"):
    validate_record(went_on, "x")
  no_stop = copy.deepcopy(ok)
  no_stop["stop"] = "max_turns"
  with pytest.raises(RolloutLogError, match="must stop with 'oracle_success'"):
    validate_record(no_stop, "x")
  two_turn_parallel = rb.parallel("p", [("1", 0.0)])
  two_turn_parallel["turns"].append(rb.turn(2, [("1", 0.0)]))
  with pytest.raises(RolloutLogError, match="parallel episode has exactly one turn"):
    validate_record(two_turn_parallel, "x")


def test_writer_refuses_a_bad_record_before_writing(tmp_path):
  path = tmp_path / "r.jsonl"
  with RolloutWriter(path, rb.header(), fsync=False) as w:
    bad = _records()[0]
    del bad["stop"]
    with pytest.raises(RolloutLogError, match=r"r.jsonl:2 \(record to write\): field 'stop': missing"):
      w.write(bad)
    assert len(w) == 0
  assert read_rollouts(path)[1] == []


def test_optional_fields_are_checked_when_present():
  r = rb.sequential("p", [("1", 0.0)])
  r["turns"][0]["prefill_tokens"] = 12
  r["turns"][0]["decode_tokens"] = None  # unknown (a teacher)
  validate_record(r, "x")
  r["turns"][0]["decode_tokens"] = -1
  with pytest.raises(RolloutLogError, match=r"turns\[0\].decode_tokens"):
    validate_record(r, "x")


def test_teacher_candidate_may_lack_token_ids_and_count():
  r = rb.sequential("p", [("1", 0.0)])
  r["turns"][0]["candidates"][0].update(token_ids=None, num_tokens=None, logprob_sum=None)
  validate_record(r, "x")
  r["turns"][0]["candidates"][0]["token_ids"] = [1]
  with pytest.raises(RolloutLogError, match=r"num_tokens.*null while token_ids"):
    validate_record(r, "x")


def test_writer_completes_a_partial_header_and_requires_hash(tmp_path):
  with RolloutWriter(tmp_path / "a.jsonl", {"config_hash": "h", "model": "m"}, fsync=False):
    pass
  header = read_rollouts(tmp_path / "a.jsonl")[0]
  assert header["schema"] == rollout_log.SCHEMA and header["config_hash"] == "h" and header["created"]
  with pytest.raises(RolloutLogError, match=r"field 'config_hash': missing"):
    RolloutWriter(tmp_path / "b.jsonl", {"model": "m"})


def test_a_torn_header_starts_the_log_over(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_bytes(json.dumps(rb.header(), separators=(",", ":")).encode()[:45])
  with RolloutWriter(path, rb.header(), fsync=False) as w:
    assert w.num_torn_lines == 1 and len(w) == 0
    w.write(_records()[0])
  header, records, torn = read_rollouts(path)
  assert torn == 0 and records == _records()[:1] and header["config_hash"] == rb.header()["config_hash"]


def test_an_unrelated_file_is_never_overwritten(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("my notes, no newline")
  with pytest.raises(RolloutLogError, match="notes.txt:1: no header"):
    RolloutWriter(path, rb.header())
  assert path.read_text() == "my notes, no newline"
