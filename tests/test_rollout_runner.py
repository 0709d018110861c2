"""The episode runner against scripted policies whose outputs are known: every record is checked against a
hand-built expected log (selection, oracle stops, feedback, degenerate resampling, windows, resume). The runner
streams: each request goes to its turn's policy stream the moment its episode needs it, and records are logged
as episodes finish, so tests compare records by problem id.

The prompt set and problems here are written inside the test, so expected messages are spelled out by hand; the
rewards are the toy grader's paper mode (unparsable -1, wrong 0, right 1), worked out by hand below.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from rise_jax.tasks import graders
from rise_jax.rise import metrics
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.degenerate import degenerate_reason, is_degenerate
from rise_jax.rollout.policies import ScriptedPolicy, TurnSampling
from rise_jax.rollout.runner import Protocol, run_episodes
from rise_jax.tasks.base import Problem

INSTR, EXAMPLE = "Solve. Example: 1+1", "1+1=2"


class _Prompts:
  def initial_messages(self, question):
    return [{"role": "user", "content": INSTR}, {"role": "assistant", "content": EXAMPLE},
            {"role": "user", "content": f"Next: {question}"}]

  def feedback(self, question):
    return f"Wrong. Again: {question}"


class _GraderTask:
  """The runner's view of a task: its name, grading and answer extraction through the real graders."""

  def __init__(self, name="toy"):
    self.name = name

  def grade(self, response, reference, mode):
    return graders.grade(self.name, response, reference, mode)

  def extract_answer(self, response, mode):
    return graders.get_grader(self.name).extract_answer(response, mode)


A = Problem(id="toy/test/0", question="3+4", reference="3+4=7")
B = Problem(id="toy/test/1", question="2+3", reference="2+3=5")
LOOP = "ha " * 151          # one word 151 times: degenerate
LONG = "x" * 301            # one 301-character token: degenerate
SAMPLING = TurnSampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=50)


def _table_policy(table, name="learner"):
  """Scripted policy: table[(problem id, turn, round)] lists the texts of that request's samples."""
  return ScriptedPolicy(lambda request, j: table[(request.key, request.turn, request.round)][j], name=name)


def _run(tmp_path, problems, policy, protocol, name="log.jsonl", batch_size=8):
  path = tmp_path / name
  header = rollout_log.make_header("cfg", "scripted", versions={}, git_commit="abc")
  summary = run_episodes(problems, policy, protocol, path, task=_GraderTask(), prompts=_Prompts(), header=header,
                         batch_size=batch_size, progress=False)
  _, records, torn = rollout_log.read_rollouts(path)
  assert torn == 0
  order = [p.id for p in problems]
  assert sorted(order.index(r["problem_id"]) for r in records) == list(range(len(records)))
  return summary, sorted(records, key=lambda r: order.index(r["problem_id"]))  # the log's order is not a contract


def _cand(text, answer, reward, resamples=0, flagged=None):
  c = {"text": text, "token_ids": None, "logprob_sum": None, "num_tokens": len(text.split()),
       "finish_reason": "stop", "answer": answer, "reward": reward, "resamples": resamples}
  if flagged:
    c.update(flagged_degenerate=True, degenerate_reason=flagged)
  return c


def _turn(t, candidates, chosen, feedback, history, decode, prefill=None, window_applied=False, policy="learner"):
  prefill = history if prefill is None else prefill
  return {"t": t, "policy": policy, "history_tokens": history, "prefill_tokens": prefill, "decode_tokens": decode,
          "window_applied": window_applied, "sampling": SAMPLING.to_dict(), "candidates": candidates,
          "chosen": chosen, "feedback": feedback}


def test_degenerate_rule_matches_reference_thresholds():
  assert not is_degenerate("ha " * 150) and is_degenerate("ha " * 151)
  assert is_degenerate("Ha " * 100 + "HA " * 51)  # case-insensitive, as the reference lowercases
  assert not is_degenerate("x" * 300) and degenerate_reason("a " + "x" * 301) == "long_token"
  assert degenerate_reason(LOOP) == "repeat:ha"
  assert not is_degenerate("")


def test_best_reward_selection_oracle_and_resampling_equal_hand_built_log(tmp_path):
  table = {
      # A, turn 1: unparsable (-1), wrong (0), wrong (0) -> best is the FIRST of the tied zeros, index 1.
      (A.id, 1, 0): ["oops", "=8", "=9"],
      # A, turn 2: right, wrong, right -> first best is index 0; the oracle stops the episode.
      (A.id, 2, 0): ["=7", "=8", "=7"],
      # B, turn 1: sample 2 loops; round 1 redraws it (one sample) and gets a normal answer.
      (B.id, 1, 0): ["=1", "=2", LOOP],
      (B.id, 1, 1): ["=4"],
      # B, turn 2: sample 1 stays degenerate through both resampling rounds: kept and flagged.
      (B.id, 2, 0): ["=6", LONG, "=5"],
      (B.id, 2, 1): [LONG],
      (B.id, 2, 2): [LONG + "!"],
      # B, turn 3 (the last): nothing right.
      (B.id, 3, 0): ["=3", "=3", "nope"],
  }
  policy = _table_policy(table)
  protocol = Protocol.sequential(3, samples=3, select="best_reward", oracle=True, sampling=SAMPLING,
                                 grader="paper", prompt_set="handmade", seed=7, max_resample_rounds=2)
  summary, records = _run(tmp_path, [A, B], policy, protocol)

  proto = {"kind": "sequential", "oracle": True, "window": None, "grader": "paper", "prompt_set": "handmade",
           "select": "best_reward", "seed": 7, "turns": 3, "samples_per_turn": [3, 3, 3], "max_resample_rounds": 2}
  # "Tokens" of a scripted policy without tokenizer are words: history = 3 + 1 + 2 words, +1 answer +3 feedback.
  base_words, turn2_words = 6, 6 + 1 + 3
  fb_a, fb_b = "Wrong. Again: 3+4", "Wrong. Again: 2+3"
  expected_a = {
      "problem_id": A.id, "task": "toy", "reference": "3+4=7", "question": "3+4", "protocol": proto,
      "turns": [
          _turn(1, [_cand("oops", None, -1.0), _cand("=8", "8", 0.0), _cand("=9", "9", 0.0)], 1, fb_a,
                base_words, 3),
          _turn(2, [_cand("=7", "7", 1.0), _cand("=8", "8", 0.0), _cand("=7", "7", 1.0)], 0, None,
                turn2_words, 3),
      ],
      "stop": "oracle_success"}
  expected_b = {
      "problem_id": B.id, "task": "toy", "reference": "2+3=5", "question": "2+3", "protocol": proto,
      "turns": [
          # The resampled draw is logged in place of the loop; prefill and decode count every round (the
          # scripted policy re-reads the whole history each time), the discarded 151 words included.
          _turn(1, [_cand("=1", "1", 0.0), _cand("=2", "2", 0.0), _cand("=4", "4", 0.0, resamples=1)], 0, fb_b,
                base_words, 1 + 1 + 151 + 1, prefill=2 * base_words),
          _turn(2, [_cand("=6", "6", 0.0), _cand(LONG + "!", None, -1.0, resamples=2, flagged="long_token"),
                    _cand("=5", "5", 1.0)], 2, None, turn2_words, 3 + 1 + 1, prefill=3 * turn2_words),
      ],
      "stop": "oracle_success"}
  # B's turn 2 found the right answer at index 2: best_reward picks it and the oracle stops B as well.
  assert records == [expected_a, expected_b]
  assert summary.resamples == 3 and summary.degenerate_kept == 1 and summary.episodes == 2

  # What the policy saw: turn 2 continues from the chosen candidate and the feedback; resampling rounds ask
  # only for the degenerate samples, with the same history.
  seen = [(r.key, r.turn, r.round, r.n, r.messages[3:]) for r in policy.requests]
  expected_requests = [
      (A.id, 1, 0, 3, ()), (B.id, 1, 0, 3, ()),
      (B.id, 1, 1, 1, ()),
      (A.id, 2, 0, 3, ({"role": "assistant", "content": "=8"}, {"role": "user", "content": fb_a})),
      (B.id, 2, 0, 3, ({"role": "assistant", "content": "=1"}, {"role": "user", "content": fb_b})),
      (B.id, 2, 1, 1, ({"role": "assistant", "content": "=1"}, {"role": "user", "content": fb_b})),
      (B.id, 2, 2, 1, ({"role": "assistant", "content": "=1"}, {"role": "user", "content": fb_b})),
  ]
  # Each episode asks as soon as it can: A's turn 2 before B's resampling.
  by_problem = lambda requests: sorted(requests, key=lambda r: r[0])  # stable: each problem's own order kept
  assert by_problem(seen) == by_problem(expected_requests) and seen != expected_requests
  assert policy.released == [A.id, B.id]


def test_without_oracle_every_turn_gets_failure_feedback_and_true_reward(tmp_path):
  answers = {1: "=7", 2: "=8", 3: "=7"}  # right, wrong, right
  policy = ScriptedPolicy(lambda request, j: answers[request.turn])
  summary, records = _run(tmp_path, [A], policy, Protocol.sequential(3, sampling=SAMPLING, grader="robust"))
  (record,) = records
  assert record["stop"] == "max_turns"
  assert [t["candidates"][t["chosen"]]["reward"] for t in record["turns"]] == [1.0, 0.0, 1.0]
  assert [t["feedback"] for t in record["turns"]] == ["Wrong. Again: 3+4", "Wrong. Again: 3+4", None]
  # The failure message follows the correct first turn as well.
  assert policy.requests[1].messages[-2:] == ({"role": "assistant", "content": "=7"},
                                              {"role": "user", "content": "Wrong. Again: 3+4"})

  # With the oracle, the same script stops at turn 1.
  oracle_policy = ScriptedPolicy(lambda request, j: answers[request.turn])
  _, records = _run(tmp_path, [A], oracle_policy, Protocol.sequential(3, oracle=True, sampling=SAMPLING,
                                                                      grader="robust"), name="oracle.jsonl")
  assert [len(r["turns"]) for r in records] == [1] and records[0]["stop"] == "oracle_success"
  assert len(oracle_policy.requests) == 1


def test_parallel_protocol_is_one_turn_with_k_samples(tmp_path):
  policy = ScriptedPolicy(lambda request, j: f"={j + 5}")
  _, records = _run(tmp_path, [A, B], policy, Protocol.parallel(4, sampling=SAMPLING, grader="robust"))
  assert [[c["answer"] for c in r["turns"][0]["candidates"]] for r in records] == [["5", "6", "7", "8"]] * 2
  assert [[c["reward"] for c in r["turns"][0]["candidates"]] for r in records] == [[0, 0, 1, 0], [1, 0, 0, 0]]
  assert all(r["protocol"]["kind"] == "parallel" and r["turns"][0]["chosen"] == 0 for r in records)
  assert all(r["turns"][0]["feedback"] is None and r["stop"] == "max_turns" for r in records)


def test_rows_leave_the_batch_and_per_turn_policies_and_sampling(tmp_path):
  # A is right at turn 1 (leaves), B never: turn 2 is asked of the second policy, for B only.
  first = ScriptedPolicy(lambda request, j: "=7", name="learner@iter_1")
  last = ScriptedPolicy(lambda request, j: "=5", name="teacher:x")
  hot = TurnSampling(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=20)
  protocol = Protocol.sequential(2, samples=(1, 2), select="best_reward", oracle=True, sampling=(SAMPLING, hot),
                                 grader="robust")
  _, records = _run(tmp_path, [A, B], [first, last], protocol)
  _, logged, _ = rollout_log.read_rollouts(tmp_path / "log.jsonl")
  assert [r["problem_id"] for r in logged] == [A.id, B.id]  # A's record is flushed as soon as it stops
  assert [(r.key, r.turn, r.n) for r in first.requests] == [(A.id, 1, 1), (B.id, 1, 1)]
  assert [(r.key, r.turn, r.n) for r in last.requests] == [(B.id, 2, 2)]
  turn2 = records[1]["turns"][1]
  assert turn2["policy"] == "teacher:x" and turn2["sampling"] == hot.to_dict()
  assert records[1]["stop"] == "oracle_success"


def test_window_keeps_instruction_question_and_last_pairs(tmp_path):
  policy = ScriptedPolicy(lambda request, j: f"={request.turn}")
  _run(tmp_path, [A], policy, Protocol.sequential(4, window=2, sampling=SAMPLING, grader="robust"))
  fb = {"role": "user", "content": "Wrong. Again: 3+4"}
  head = [{"role": "user", "content": INSTR}, {"role": "assistant", "content": EXAMPLE},
          {"role": "user", "content": "Next: 3+4"}]
  expected = [head, head + [{"role": "assistant", "content": "=1"}, fb],
              head + [{"role": "assistant", "content": "=2"}, fb],
              head + [{"role": "assistant", "content": "=3"}, fb]]
  assert [list(r.messages) for r in policy.requests] == expected


def test_resume_skips_logged_problems_and_equals_uninterrupted(tmp_path):
  problems = [Problem(id=f"toy/test/{i}", question=f"{i}+1", reference=f"{i}+1={i + 1}") for i in range(5)]
  answer = lambda request, j: f"={(len(request.key) * 7 + request.turn + j) % 4}"  # noqa: E731
  protocol = Protocol.sequential(2, samples=2, select="best_reward", oracle=True, sampling=SAMPLING)
  _, full = _run(tmp_path, problems, ScriptedPolicy(answer), protocol, name="full.jsonl", batch_size=2)
  # "Interrupted" run: only the first two problems made it into the log.
  _run(tmp_path, problems[:2], ScriptedPolicy(answer), protocol, name="resumed.jsonl", batch_size=2)
  again = ScriptedPolicy(answer)
  summary, resumed = _run(tmp_path, problems, again, protocol, name="resumed.jsonl", batch_size=3)
  assert summary.skipped == 2 and summary.episodes == 3
  assert {r.key for r in again.requests} == {p.id for p in problems[2:]}
  key = lambda r: r["problem_id"]  # noqa: E731
  assert sorted(resumed, key=key) == sorted(full, key=key)


class _RaisingToyTask(_GraderTask):
  """The toy grader, except that it raises on samples containing "boom" (a grader bug)."""

  def grade(self, response, reference, mode):
    if "boom" in response:
      raise OverflowError("int too large to convert to float")
    return super().grade(response, reference, mode)


def test_a_grader_error_is_a_counted_zero_reward_not_an_abort(tmp_path, caplog):
  policy = _table_policy({(A.id, 1, 0): ["=7 boom", "=8"], (B.id, 1, 0): ["=5", "=4"]})
  protocol = Protocol.sequential(1, samples=2, select="best_reward", sampling=SAMPLING)
  header = rollout_log.make_header("cfg", "scripted", versions={}, git_commit="abc")
  with caplog.at_level("WARNING"):
    summary = run_episodes([A, B], policy, protocol, tmp_path / "log.jsonl", task=_RaisingToyTask(),
                           prompts=_Prompts(), header=header, progress=False)
  _, records, _ = rollout_log.read_rollouts(tmp_path / "log.jsonl")
  a, b = sorted(records, key=lambda r: r["problem_id"])
  boom, other = a["turns"][0]["candidates"]
  assert (boom["reward"], boom["answer"]) == (0.0, None)
  assert boom["grader_error"] == "OverflowError: int too large to convert to float"
  assert "grader_error" not in other and other["reward"] == 0.0 and b["turns"][0]["candidates"][0]["reward"] == 1.0
  assert summary.grader_errors == 1 and summary.episodes == 2
  assert metrics.compute_accounting(records)["grader_errors"] == 1
  assert any(A.id in r.getMessage() and "OverflowError" in r.getMessage() for r in caplog.records)


def test_a_gsm8k_sample_of_309_nines_is_graded_in_both_modes(tmp_path):
  """309 nines in a box once crashed paper grading and aborted the stage on every resume; both modes grade it."""
  problem = Problem(id="gsm8k/test/0", question="How many ducks?", reference="9 + 9 = 18\n#### 18")
  texts = ["\\boxed{" + "9" * 309 + "}", "The answer is " + "9" * 309 + ".25"]
  for mode in ("paper", "robust"):
    policy = ScriptedPolicy(lambda request, j: texts[j])
    protocol = Protocol.sequential(1, samples=2, sampling=SAMPLING, grader=mode)
    header = rollout_log.make_header("cfg", "scripted", versions={}, git_commit="abc")
    summary = run_episodes([problem], policy, protocol, tmp_path / f"{mode}.jsonl", task=_GraderTask("gsm8k"),
                           prompts=_Prompts(), header=header, progress=False)
    _, (record,), _ = rollout_log.read_rollouts(tmp_path / f"{mode}.jsonl")
    rewards = [c["reward"] for c in record["turns"][0]["candidates"]]
    assert rewards == ([0.0, -1.0] if mode == "paper" else [0.0, 0.0]) and summary.grader_errors == 0


def test_bad_inputs_fail_loudly(tmp_path):
  with pytest.raises(ValueError, match="appears more than once"):
    _run(tmp_path, [A, A], ScriptedPolicy(lambda r, j: "=1"), Protocol.sequential(1))
  short = ScriptedPolicy(lambda r, j: "=1")
  short.sample = lambda requests, sampling, seed: []
  with pytest.raises(RuntimeError, match="answered 0 of 1"):
    _run(tmp_path, [A], short, Protocol.sequential(1), name="short.jsonl")
  with pytest.raises(ValueError, match="window"):
    Protocol.sequential(3, window=0)
  with pytest.raises(ValueError, match="one turn"):
    Protocol(kind="parallel", turns=2, samples_per_turn=(1, 1), select="first", oracle=False, window=None,
             sampling=(SAMPLING, SAMPLING))
  json.dumps(Protocol.sequential(2).log_dict())  # the protocol entry is plain JSON


# ------------------------------------------------------------------------ the learner policy's rendered ids

TOY_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6}


def _toy_ids(*parts):
  """Ids of the char-level toy tokenizer written out by hand: specials by table, a character c is 7 + ord(c) - 32."""
  ids = []
  for part in parts:
    ids.extend([TOY_SPECIALS[part]] if part in TOY_SPECIALS else [7 + ord(c) - 32 for c in part])
  return ids


class _SpyEngine:
  """An engine double recording what `EnginePolicy` submits: the c-th request's sample j answers
  `answer(c, j)` (its ids end with </s>, each token's log-prob -0.5), with `cached(prompt)` of its prompt's
  tokens reported as read from the prefix cache."""

  config = None  # the policy takes its stop ids from the tokenizer

  def __init__(self, tokenizer, answer=lambda call, j: f"={call}{j}", cached=lambda prompt: 0):
    self.tokenizer, self.answer, self.cached = tokenizer, answer, cached
    self.submitted = []  # (seed, engine request)

  def stream(self, seed=0):
    from rise_jax.sampling.requests import SampleResult
    spy, done = self, []

    class _Stream:
      busy = property(lambda _: bool(done))

      def submit(self, request, tag):
        spy.submitted.append((seed, request))
        results = []
        for j in range(request.n):
          ids = spy.tokenizer.encode(spy.answer(len(spy.submitted), j)) + [TOY_SPECIALS["</s>"]]
          results.append(SampleResult(ids, np.full(len(ids), -0.5, np.float32), np.zeros(len(ids), np.float32),
                                      "stop", len(request.prompt), spy.cached(request.prompt)))
        done.append((tag, results))

      def step(self):
        out = list(done)
        done.clear()
        return out

    return _Stream()


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
  from rise_jax import chat
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  return chat.load_tokenizer(build_toy_tokenizer(tmp_path_factory.mktemp("tok") / "toy"), chat_template="toy")


def test_window_seen_by_the_engine_on_rendered_ids(tmp_path, toy_tokenizer):
  from rise_jax.rollout.policies import EnginePolicy, sample_uid
  from rise_jax.tasks.prompts import get_prompt_set

  spy = _SpyEngine(toy_tokenizer)
  policy = EnginePolicy(spy, toy_tokenizer)
  prompts = get_prompt_set("toy")
  header = rollout_log.make_header("cfg", "spy", versions={}, git_commit="abc")
  protocol = Protocol.sequential(4, window=3, sampling=SAMPLING, grader="robust", seed=3)
  run_episodes([A], policy, protocol, tmp_path / "w.jsonl", task=_GraderTask(), prompts=prompts, header=header,
               progress=False)
  head = ("<s>", "<|user|>", prompts.instruction, "<|end|>", "<|assistant|>", prompts.example_answer, "</s>",
          "<|user|>", prompts.problem("3+4"), "<|end|>")
  fb = prompts.feedback("3+4")

  def pair(answer):
    return ("<|assistant|>", answer, "</s>", "<|user|>", fb, "<|end|>")

  # W = 3: the head, then at most the last 2 (attempt, feedback) pairs; turn 4 drops the first attempt.
  expected = [_toy_ids(*head, "<|assistant|>"),
              _toy_ids(*head, *pair("=10"), "<|assistant|>"),
              _toy_ids(*head, *pair("=10"), *pair("=20"), "<|assistant|>"),
              _toy_ids(*head, *pair("=20"), *pair("=30"), "<|assistant|>")]
  submitted = [request for _, request in spy.submitted]
  assert [list(r.prompt) for r in submitted] == expected
  assert [r.uid for r in submitted] == [sample_uid(A.id, t, 0, "sequential") for t in range(1, 5)]
  assert all(seed == 3 for seed, _ in spy.submitted)
  assert all(r.stop_ids == (TOY_SPECIALS["</s>"],) and r.n == 1 for r in submitted)  # the default stop
  assert [(r.max_new_tokens, r.temperature, r.top_p, r.top_k) for r in submitted] == [(50, 1.0, 1.0, 0)] * 4
  _, (record,), _ = rollout_log.read_rollouts(tmp_path / "w.jsonl")
  assert [t["window_applied"] for t in record["turns"]] == [False, False, False, True]
  assert [t["history_tokens"] for t in record["turns"]] == [len(ids) for ids in expected]
  cand = record["turns"][0]["candidates"][0]
  assert cand["token_ids"] == _toy_ids("=10", "</s>") and cand["num_tokens"] == 4 and cand["logprob_sum"] == -2.0
  assert cand["text"] == "=10" and cand["finish_reason"] == "stop"  # the stop token is not text


def test_the_next_turn_extends_the_chosen_candidates_ids(tmp_path, toy_tokenizer):
  """The engine policy holds no conversation state: turn 2's prompt holds turn 1's prompt and the chosen
  sample's ids (its </s> included) verbatim, so the engine's content-addressed prefix cache continues that
  conversation, and the log's prefill_tokens are the history less what the engine read from its cache."""
  from rise_jax.rollout.policies import EnginePolicy
  from rise_jax.tasks.prompts import get_prompt_set

  # TurnRequest 1 (turn 1): samples "=8", "=7" (right), "=7"; best_reward continues sample 1 into turn 2 (no oracle).
  spy = _SpyEngine(toy_tokenizer, answer=lambda call, j: ["=8", "=7", "=7"][j] if call == 1 else f"={j}",
                   cached=lambda prompt: len(prompt) // 3)
  header = rollout_log.make_header("cfg", "spy", versions={}, git_commit="abc")
  protocol = Protocol.sequential(2, samples=3, select="best_reward", sampling=SAMPLING, grader="robust")
  run_episodes([A], EnginePolicy(spy, toy_tokenizer), protocol, tmp_path / "c.jsonl", task=_GraderTask(),
               prompts=get_prompt_set("toy"), header=header, progress=False)
  turn1_prompt, turn2_prompt = (list(r.prompt) for _, r in spy.submitted)
  chosen = turn1_prompt + _toy_ids("=7", "</s>")
  assert turn2_prompt[:len(chosen)] == chosen and len(turn2_prompt) > len(chosen)
  _, (record,), _ = rollout_log.read_rollouts(tmp_path / "c.jsonl")
  t1, t2 = record["turns"]
  assert t1["chosen"] == 1 and t1["history_tokens"] == len(turn1_prompt)
  assert t2["history_tokens"] == len(turn2_prompt)
  assert [t["prefill_tokens"] for t in record["turns"]] == [len(p) - len(p) // 3 for p in (turn1_prompt,
                                                                                             turn2_prompt)]


def test_collection_with_window_one_and_the_reference_teacher(tmp_path):
  # Algorithm 1 for a learner that cannot read a history yet: every learner attempt sees only the head (an
  # independent first-turn sample), the reference solution is the last turn, and the record keeps the history.
  from rise_jax.rise import conversion as collect
  from rise_jax.rollout.policies import ReferencePolicy
  learner = ScriptedPolicy(lambda request, j: {1: "3+4=8", 2: "3+4=6"}[request.turn])
  teacher = ReferencePolicy({A.id: A.reference, B.id: B.reference})
  protocol = Protocol.sequential(3, select="best_reward", oracle=True, window=1, sampling=SAMPLING, grader="robust")
  _, records = _run(tmp_path, [A], [learner, learner, teacher], protocol)
  head = _Prompts().initial_messages(A.question)
  assert [list(r.messages) for r in learner.requests] == [head, head]  # turn 2 saw no attempt
  assert [t["candidates"][0]["text"] for t in records[0]["turns"]] == ["3+4=8", "3+4=6", "3+4=7"]
  assert [t["candidates"][0]["reward"] for t in records[0]["turns"]] == [0.0, 0.0, 1.0]
  assert records[0]["turns"][2]["policy"] == "teacher:reference"
  conv = collect.convert_rollouts(records, lambda pid: head, collect.ConversionOptions())
  fb = {"role": "user", "content": "Wrong. Again: 3+4"}
  last = conv.records[-1]["messages"]
  assert last[3:] == [{"role": "assistant", "content": "3+4=8"}, fb, {"role": "assistant", "content": "3+4=6"}, fb,
                      {"role": "assistant", "content": "3+4=7", "train": True}]
  with pytest.raises(KeyError, match="no reference solution for problem 'toy/test/9'"):
    teacher.sample([type(learner.requests[0])(key="toy/test/9", messages=tuple(head), n=1, turn=1)], SAMPLING, 0)


def test_the_repair_teacher_corrects_the_attempt_it_sees_and_falls_back_to_the_reference(tmp_path):
  # The toy's repair at the improvement turn: a right product is kept as written and the sum fixed; an attempt of
  # no known shape, or one the window hides, gets the reference solution, counted.
  from rise_jax.rollout.policies import RepairPolicy
  from rise_jax.tasks import get_task
  toy = get_task("toy", test_size=20, dev_size=5)
  reference = "3*4=12,25+12=37"
  problems = [Problem(id=f"toy/train/{i}", question="25+3*4", reference=reference) for i in range(2)]
  attempts = {"toy/train/0": "4*3=12,25+12=38", "toy/train/1": "oops"}
  learner = ScriptedPolicy(lambda request, j: attempts[request.key])
  for window, texts, fallbacks in [(None, ["4*3=12,25+12=37", reference], 1), (1, [reference, reference], 2)]:
    teacher = RepairPolicy({p.id: p.reference for p in problems},
                           lambda key, attempt: toy.repair("25+3*4", attempt, reference))
    protocol = Protocol.sequential(2, samples=(1, 2), select="best_reward", oracle=True, window=window,
                                   sampling=SAMPLING, grader="robust")
    _, records = _run(tmp_path, problems, [learner, teacher], protocol, name=f"w{window}.jsonl")
    assert [r["turns"][1]["policy"] for r in records] == ["teacher:repair"] * 2
    assert [[c["text"] for c in r["turns"][1]["candidates"]] for r in records] == [[t, t] for t in texts]
    assert [[c["reward"] for c in r["turns"][1]["candidates"]] for r in records] == [[1.0, 1.0]] * 2
    assert (teacher.requests, teacher.fallbacks) == (2, fallbacks)


def test_the_repair_teacher_passes_over_a_retry_it_cannot_repair_for_the_attempt_before_it(tmp_path):
  # Turn 1 is a repairable slip, turn 2 unparsable (a boosted model cannot yet write a retry): the teacher repairs
  # turn 1's attempt instead of giving the reference.
  from rise_jax.rollout.policies import RepairPolicy
  from rise_jax.tasks import get_task
  toy = get_task("toy", test_size=20, dev_size=5)
  reference = "3*4=12,25+12=37"
  problems = [Problem(id="toy/train/0", question="25+3*4", reference=reference)]
  learner = ScriptedPolicy(lambda request, j: {1: "4*3=12,25+12=38", 2: "=7=="}[request.turn])
  teacher = RepairPolicy({p.id: p.reference for p in problems},
                         lambda key, attempt: toy.repair("25+3*4", attempt, reference))
  protocol = Protocol.sequential(3, samples=(1, 1, 1), select="best_reward", oracle=True, window=None,
                                 sampling=SAMPLING, grader="robust")
  _, records = _run(tmp_path, problems, [learner, learner, teacher], protocol)
  assert [c["text"] for c in records[0]["turns"][2]["candidates"]] == ["4*3=12,25+12=37"]
  assert (teacher.requests, teacher.fallbacks) == (1, 0)


def test_collection_without_oracle_keeps_a_right_answer_after_the_failure_message(tmp_path):
  # collect.oracle=False (algorithm.collection_protocol): a right first answer is followed by the failure message, as
  # at test time without an oracle, and best-of-N at turn 2 yields a record that keeps the right answer after it.
  from rise_jax.pipeline import recipes
  from rise_jax.rise import algorithm, conversion
  c = recipes.toy()
  c.collect.oracle = False
  c.collect.improvement_samples = 2
  protocol = algorithm.collection_protocol(c)
  assert protocol.oracle is False and protocol.turns == 2
  answers = {1: ["3+4=7"], 2: ["3+4=6", "3+4=7"]}  # turn 2: a wrong and a right candidate
  learner = ScriptedPolicy(lambda request, j: answers[request.turn][j])
  _, records = _run(tmp_path, [A], learner, dataclasses.replace(protocol, sampling=(SAMPLING, SAMPLING)))
  assert [t["candidates"][t["chosen"]]["text"] for t in records[0]["turns"]] == ["3+4=7", "3+4=7"]
  head = _Prompts().initial_messages(A.question)
  conv = conversion.convert_rollouts(records, lambda pid: head, conversion.ConversionOptions(criteria="all", dedupe=False))
  assert len(conv.records) == 2  # the prefixes ending at turns 1 and 2
  last = max(conv.records, key=lambda r: len(r["messages"]))
  assert last["messages"][len(head):] == [{"role": "assistant", "content": "3+4=7"},
                                          {"role": "user", "content": "Wrong. Again: 3+4"},
                                          {"role": "assistant", "content": "3+4=7", "train": True}]
  assert last["weight"] == pytest.approx(math.exp(1 / 0.4))
  # The reference's dedupe drops a repeated answer, so keeping one needs collect.dedupe=False.
  assert len(conversion.convert_rollouts(records, lambda pid: head, conversion.ConversionOptions(dedupe=True)).records) == 1
  # The default (Algorithm 1) stops at the first success: one turn, one record.
  c.collect.oracle = True
  _, records = _run(tmp_path, [A], learner, dataclasses.replace(algorithm.collection_protocol(c), sampling=(SAMPLING,) * 2),
                    name="oracle.jsonl")
  assert len(records[0]["turns"]) == 1
