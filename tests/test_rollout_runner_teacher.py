"""The HTTP teacher: a real OpenAI-compatible server on 127.0.0.1 (started here, bounded, stops by itself).

It checks the wire format (what a chat-completions server receives), retries on a 500, a 4xx failing at once,
the on-disk cache avoiding repeat calls, and the teacher serving the last turn of a runner episode, as is or
asked to repair the latest failed attempt (`RepairPromptPolicy`, `collect.teacher.prompt = "repair"`).
"""

import http.server
import json
import pathlib
import threading
import types

import pytest

from rise_jax.rollout.teacher import ChatCompletionsClient, OpenAIChatPolicy, TeacherError
from rise_jax.rollout.policies import RepairPromptPolicy, ScriptedPolicy, TurnRequest, TurnSampling


class _Server:
  """Chat-completions server: answers `f(last user message, choice index)`; fails the first `fail_first` calls.

  Serves at most `max_requests` requests and shuts down after `lifetime_s` whatever happens, so a failing test
  never leaves it running.
  """

  def __init__(self, answer, fail_first=0, status=500, max_requests=64, lifetime_s=60.0):
    self.received = []
    self._answer = answer
    self._fail_left = fail_first
    self._status = status
    self._max = max_requests
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server._lock:
          server.received.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
          fail = server._fail_left > 0
          server._fail_left -= fail
          if len(server.received) >= server._max:
            threading.Thread(target=server.httpd.shutdown, daemon=True).start()
        if fail:
          self._send(server._status, {"error": {"message": "try later"}})
          return
        question = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        choices = [{"index": i, "message": {"role": "assistant", "content": server._answer(question, i)},
                    "finish_reason": "stop"} for i in range(body.get("n", 1))]
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices,
                         "usage": {"prompt_tokens": 11, "completion_tokens": 5 * len(choices)}})

      def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self._lock = threading.Lock()
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self._timer = threading.Timer(lifetime_s, self.httpd.shutdown)
    self._timer.daemon = True

  def __enter__(self):
    self._thread.start()
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()
    self.httpd.shutdown()
    self.httpd.server_close()
    self._thread.join(timeout=5)


def _client(url, tmp_path, **kw):
  return ChatCompletionsClient(url, "teacher-7b", api_key="sk-test", cache_dir=tmp_path / "cache",
                               backoff_s=0.01, sleep=lambda s: None, timeout_s=10, **kw)


MESSAGES = [{"role": "user", "content": "instr"}, {"role": "assistant", "content": "ex"},
            {"role": "user", "content": "What is 2+3?"}]


@pytest.mark.timeout(60)
def test_retries_500_then_caches(tmp_path):
  with _Server(lambda q, i: f"answer {i} to {q}", fail_first=2) as server:
    client = _client(server.url, tmp_path)
    reply = client.complete(MESSAGES, n=2, temperature=0.7, top_p=0.9, max_tokens=64)
    assert reply.texts == ("answer 0 to What is 2+3?", "answer 1 to What is 2+3?")
    assert len(server.received) == 3  # two 500s, then success
    sent = server.received[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["auth"] == "Bearer sk-test"
    assert sent["body"] == {"model": "teacher-7b", "messages": MESSAGES, "n": 2, "temperature": 0.7,
                            "top_p": 0.9, "max_tokens": 64}
    # Same prompt, model and params: served from disk, even by a fresh client (a resumed run).
    again = _client(server.url, tmp_path).complete(MESSAGES, n=2, temperature=0.7, top_p=0.9, max_tokens=64)
    assert again.texts == reply.texts and again.cached
    assert len(server.received) == 3
    # Any change of the key (params, draw) is a new request.
    client.complete(MESSAGES, n=2, temperature=1.0, top_p=0.9, max_tokens=64)
    client.complete(MESSAGES, n=2, temperature=0.7, top_p=0.9, max_tokens=64, draw="1")
    assert len(server.received) == 5


@pytest.mark.timeout(60)
def test_client_error_is_not_retried_and_retries_are_bounded(tmp_path):
  with _Server(lambda q, i: "x", fail_first=100, status=400) as server:
    with pytest.raises(TeacherError, match="HTTP 400"):
      _client(server.url, tmp_path).complete(MESSAGES)
    assert len(server.received) == 1
  with _Server(lambda q, i: "x", fail_first=100, status=503) as server:
    with pytest.raises(TeacherError, match="after 3 attempts"):
      _client(server.url, tmp_path, max_retries=2).complete(MESSAGES)
    assert len(server.received) == 3


@pytest.mark.timeout(60)
def test_policy_sends_one_request_per_sample_and_logs_usage(tmp_path):
  with _Server(lambda q, i: f"{q[::-1]}") as server:
    policy = OpenAIChatPolicy(_client(server.url, tmp_path), max_concurrency=4)
    requests = [TurnRequest(key=f"p{i}", messages=tuple(MESSAGES[:2] + [{"role": "user", "content": f"q{i}"}]),
                            n=1 + i % 2, turn=2) for i in range(5)]
    out = policy.sample(requests, TurnSampling(temperature=0.5, max_new_tokens=32), seed=0)
    assert [[s.text for s in c.samples] for c in out] == [[f"{i}q"] * (1 + i % 2) for i in range(5)]
    assert all(s.token_ids is None and s.num_tokens == 5 for c in out for s in c.samples)
    assert [c.history_tokens for c in out] == [11] * 5
    assert policy.name == "teacher:teacher-7b"
    assert len(server.received) == 7 and all(r["body"]["n"] == 1 for r in server.received)
    assert {r["body"]["temperature"] for r in server.received} == {0.5}
    # A second pass (a resumed run) is served from the cache entirely.
    policy.sample(requests, TurnSampling(temperature=0.5, max_new_tokens=32), seed=0)
    assert len(server.received) == 7 and policy.client.num_cache_hits == 7


@pytest.mark.timeout(60)
def test_teacher_serves_the_last_turn_of_an_episode(tmp_path):
  from rise_jax.tasks.prompts import get_prompt_set
  from rise_jax.tasks import get_task
  from rise_jax.rollout import log as rollout_log
  from rise_jax.rollout.policies import ScriptedPolicy
  from rise_jax.rollout.runner import Protocol, run_episodes

  task = get_task("toy", test_size=3, dev_size=0)
  problems = task.load("test")
  prompts = get_prompt_set("toy")
  answers = {prompts.feedback(p.question): p.reference for p in problems}  # the teacher knows the scratchpads
  learner = ScriptedPolicy(lambda request, j: "=0", name="learner@iter_0")
  protocol = Protocol.sequential(2, samples=(1, 2), select="best_reward", oracle=True,
                                 sampling=(TurnSampling(max_new_tokens=16), TurnSampling(temperature=0.3)),
                                 grader="robust")
  header = rollout_log.make_header("cfg", "learner", versions={}, git_commit="abc")
  with _Server(lambda q, i: answers[q], fail_first=1) as server:
    teacher = OpenAIChatPolicy(_client(server.url, tmp_path), max_concurrency=2)
    run_episodes(problems, [learner, teacher], protocol, tmp_path / "a.jsonl", task=task, prompts=prompts,
                 header=header, progress=False)
    assert len(server.received) == 1 + 3 * 2  # one 500, then one request per sample
    # The teacher sees the learner's failed attempt and the feedback, in the chat-completions message format.
    sent = server.received[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[3]["content"] == "=0"
    # Collecting the same episodes again (a resumed or repeated run) is served from the cache.
    run_episodes(problems, [learner, teacher], protocol, tmp_path / "b.jsonl", task=task, prompts=prompts,
                 header=header, progress=False)
    assert len(server.received) == 7
  _, records, _ = rollout_log.read_rollouts(tmp_path / "a.jsonl")
  _, again, _ = rollout_log.read_rollouts(tmp_path / "b.jsonl")
  assert records == again
  for r in records:
    last = r["turns"][1]
    assert last["policy"] == "teacher:teacher-7b" and last["sampling"]["temperature"] == 0.3
    assert [(c["token_ids"], c["num_tokens"], c["reward"]) for c in last["candidates"]] == [(None, 5, 1.0)] * 2
    assert last["history_tokens"] == 11 and r["stop"] == "oracle_success"


# -- the teacher asked to repair the latest failed attempt -----------------------------------------------------
PAPER_JSON = pathlib.Path(__file__).resolve().parents[1] / "rise_jax" / "tasks" / "prompts" / "paper.json"


def _toy_episodes_setup():
  from rise_jax.tasks import get_task
  from rise_jax.tasks.prompts import get_prompt_set
  task = get_task("toy", test_size=3, dev_size=0)
  return task, task.load("test"), get_prompt_set("paper")


def _wrong_learner():
  """A learner whose attempts differ per problem and turn, all wrong (no toy answer is negative)."""
  return ScriptedPolicy(lambda request, j: f"{request.key} try {request.turn}: =-{request.turn}",
                        name="learner@iter_0")


def _repair_message(question, attempt):
  """The paper set's repair template filled in from the JSON file itself."""
  template = json.loads(PAPER_JSON.read_text(encoding="utf-8"))["repair"]
  return template.replace("{question}", question).replace("{attempt}", attempt)


def _run(tmp_path, problems, policies, protocol, task, prompts, name="a.jsonl"):
  from rise_jax.rollout import log as rollout_log
  from rise_jax.rollout.runner import run_episodes
  header = rollout_log.make_header("cfg", "learner", versions={}, git_commit="abc")
  run_episodes(problems, policies, protocol, tmp_path / name, task=task, prompts=prompts, header=header,
               progress=False)
  return rollout_log.read_rollouts(tmp_path / name)[1]


def _chosen(turn):
  return turn["candidates"][turn["chosen"]]["text"]


@pytest.mark.timeout(60)
def test_a_repair_prompted_teacher_sees_the_problem_and_the_latest_attempt_and_is_the_target(tmp_path):
  from rise_jax.pipeline import recipes, stages
  from rise_jax.rollout.runner import Protocol
  task, problems, prompts = _toy_episodes_setup()
  learner = _wrong_learner()
  inner = ScriptedPolicy(lambda request, j: f"{by_id[request.key].reference} ({j})", name="teacher:scripted")
  by_id = {p.id: p for p in problems}
  teacher = RepairPromptPolicy(inner, prompts.repair, {p.id: p.question for p in problems})
  protocol = Protocol.sequential(3, samples=(1, 1, 2), oracle=True, grader="robust", prompt_set="paper")
  records = _run(tmp_path, problems, [learner, learner, teacher], protocol, task, prompts)
  assert teacher.name == "teacher:scripted+repair_prompt" and (teacher.requests, teacher.fallbacks) == (3, 0)
  seen = {r.key: r for r in inner.requests}
  c = recipes.toy()
  c.rise.single_turn_control = False
  stages._build(types.SimpleNamespace(prompts=prompts, tokenizer=None), c, records, tmp_path / "out", 1)
  data = [json.loads(line) for line in (tmp_path / "out" / "data" / "sft.jsonl").read_text().splitlines()]
  for r in records:
    latest = _chosen(r["turns"][1])  # the learner's second (latest) failed attempt, as logged
    assert latest.startswith(f"{r['problem_id']} try 2") and _chosen(r["turns"][0]) != latest
    request = seen[r["problem_id"]]
    assert request.turn == 3 and request.round == 0 and request.stream == "sequential" and request.n == 2
    assert request.messages == ({"role": "user", "content": _repair_message(r["question"], latest)},)
    assert r["question"] in request.messages[0]["content"] and latest in request.messages[0]["content"]
    last = r["turns"][2]
    assert last["policy"] == "teacher:scripted+repair_prompt"
    assert [c_["text"] for c_ in last["candidates"]] == [f"{r['reference']} (0)", f"{r['reference']} (1)"]
    # The training record: the learner's own conversation, then the teacher's reply as the target.
    [record] = [d for d in data if d["id"] == f"{r['problem_id']}#iter1#t3"]
    assert record["messages"][-1] == {"role": "assistant", "content": _chosen(last), "train": True}
    assert record["messages"][2]["content"].endswith(r["question"])
    assert [m["content"] for m in record["messages"][3:-1:2]] == [_chosen(r["turns"][0]), latest]


@pytest.mark.timeout(60)
def test_an_http_teacher_is_sent_the_repair_prompt(tmp_path):
  from rise_jax.rollout.runner import Protocol
  task, problems, prompts = _toy_episodes_setup()
  answers = {}
  with _Server(lambda q, i: answers.get(q, "no repair prompt")) as server:
    teacher = RepairPromptPolicy(OpenAIChatPolicy(_client(server.url, tmp_path), max_concurrency=2),
                                 prompts.repair, {p.id: p.question for p in problems})
    protocol = Protocol.sequential(2, samples=(1, 1), oracle=True, grader="robust", prompt_set="paper")
    learner = _wrong_learner()
    # The learner's attempts are known before the run (a script): the prompts the server must see.
    for p in problems:
      answers[_repair_message(p.question, f"{p.id} try 1: =-1")] = p.reference
    records = _run(tmp_path, problems, [learner, teacher], protocol, task, prompts)
    sent = [r["body"]["messages"] for r in server.received]
    assert sorted(m[0]["content"] for m in sent) == sorted(answers) and all(len(m) == 1 for m in sent)
    assert all(m[0]["role"] == "user" for m in sent)
  for r in records:
    assert _chosen(r["turns"][0]) == f"{r['problem_id']} try 1: =-1"
    assert r["turns"][1]["candidates"][0]["text"] == r["reference"] and r["turns"][1]["candidates"][0]["reward"] == 1.0


@pytest.mark.timeout(60)
def test_a_repair_prompted_teacher_shown_no_attempt_gets_the_conversation_counted_as_a_fallback(tmp_path):
  from rise_jax.rollout.runner import Protocol
  task, problems, prompts = _toy_episodes_setup()
  inner = ScriptedPolicy(lambda request, j: "=-5", name="teacher:scripted")
  teacher = RepairPromptPolicy(inner, prompts.repair, {p.id: p.question for p in problems})
  # A window of 1 hides every attempt from the second turn; a first turn has none.
  windowed = Protocol.sequential(2, window=1, grader="robust", prompt_set="paper")
  _run(tmp_path, problems, [_wrong_learner(), teacher], windowed, task, prompts)
  assert (teacher.requests, teacher.fallbacks) == (3, 3)
  assert [r.messages for r in inner.requests] == [tuple(prompts.initial_messages(p.question)) for p in problems]
  _run(tmp_path, problems[:1], teacher, Protocol.sequential(1, grader="robust", prompt_set="paper"), task, prompts,
       name="b.jsonl")
  assert (teacher.requests, teacher.fallbacks) == (4, 4)
  assert inner.requests[-1].messages == tuple(prompts.initial_messages(problems[0].question))
