"""Policies: whatever answers a turn of a RISE episode, behind one small protocol.

The episode runner (`rise_jax.rollout.runner`) opens a policy's stream (`open_stream(seed) -> PolicyStream`),
submits a `TurnRequest` (n responses wanted for one conversation) the moment an episode needs one, and collects each
`Completion` as it finishes. These kinds implement it:
- `EnginePolicy`: the learner (or a teacher checkpoint) through the continuous-batching engine
  (`rise_jax.sampling.engine`): one queue across turns and episodes, any mix of `n`, a previous turn's cache
  reused through the engine's prefix cache;
- `ReferencePolicy`: the task's reference solutions as the teacher; `RepairPolicy`: the task's correction of the
  failed attempt (`Task.repair`), the reference where it has none;
- `rise_jax.rollout.teacher.OpenAIChatPolicy`: a chat-completions endpoint (GPT-3.5 in the paper);
- `ScriptedPolicy`: a function from request to text, for tests and for replaying known answers;
- `RepairPromptPolicy`: wraps a model or HTTP teacher so that it is asked to repair the latest failed attempt
  (the prompt set's repair template) instead of answering the learner's conversation.
The others answer a batch at once (`sample`); their stream (`InstantStream`) answers everything submitted
since the last step in one `sample` call per sampling setting.

Randomness: a request's stream (the protocol kind), key (the problem id), turn and resample round name its random
stream (`sample_uid`), so a sample never depends on which other problems share its batch, a resumed run redraws
exactly what an uninterrupted one drew, and a parallel run's samples are independent of a sequential run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from rise_jax import chat
from rise_jax.sampling import requests as sampling_requests


@dataclasses.dataclass(frozen=True)
class TurnSampling:
  """Sampling parameters of one turn, as logged in `turns[t].sampling` (contracts §3)."""
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 1000

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TurnRequest:
  """`n` responses wanted for one conversation at one turn.

  key: stable id of the conversation (the problem id); with `turn` and `round` it names the random stream.
  messages: the history the policy sees (already windowed), ending with a user message.
  round: 0 for the first draw; r >= 1 for the r-th resampling of degenerate samples.
  stream: names the protocol drawing (the runner passes its kind), so that a parallel run's first-turn samples
    are independent of a sequential run's first turn on the same prompt and seed.
  """
  key: str
  messages: tuple[dict[str, str], ...]
  n: int
  turn: int
  round: int = 0
  stream: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
  text: str
  finish_reason: str                      # stop | length | cache_full
  num_tokens: int
  token_ids: tuple[int, ...] | None = None  # None for an HTTP teacher
  logprob_sum: float | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
  """A policy's answer to one `TurnRequest`.

  history_tokens: length of the rendered prompt; prefill_tokens: how many of those were actually run through the
  model this time (fewer when a cached conversation was continued; None when unknown, e.g. an HTTP teacher).
  """
  samples: tuple[Sample, ...]
  history_tokens: int
  prefill_tokens: int | None = None


@runtime_checkable
class Policy(Protocol):
  name: str   # logged as turns[t].policy, e.g. "learner@iter_1", "teacher:gpt-3.5-turbo"

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    """One `Completion` per request, in order, each with exactly `request.n` samples."""

  def release(self, keys: Sequence[str]) -> None:
    """The conversations `keys` are over: drop any state (KV caches) held for them."""

  def open_stream(self, seed: int) -> "PolicyStream":
    """A queue that takes requests one at a time and returns their completions as they finish."""


@runtime_checkable
class PolicyStream(Protocol):
  """A policy's open queue: `submit` any time, `step` to advance and collect what finished."""

  def submit(self, request: TurnRequest, sampling: TurnSampling, tag: Any) -> None:
    """Queue `request`; its `Completion` comes back from a later `step` with `tag`."""

  def step(self) -> list[tuple[Any, Completion]]:
    """Advance (e.g. one decode chunk); (tag, completion) of every request finished since the last step."""

  @property
  def busy(self) -> bool:
    """Whether a submitted request has not been returned by `step` yet."""


class InstantStream:
  """The stream of a policy that answers a batch at once (the reference teacher, an HTTP teacher, a script):
  everything submitted since the last `step` is answered there, in one `policy.sample` call per sampling
  setting, so an HTTP teacher still sends a turn's requests concurrently."""

  def __init__(self, policy, seed: int):
    self.policy = policy
    self.seed = seed
    self._queued: list[tuple[TurnRequest, TurnSampling, Any]] = []

  def submit(self, request: TurnRequest, sampling: TurnSampling, tag: Any) -> None:
    self._queued.append((request, sampling, tag))

  def step(self) -> list[tuple[Any, Completion]]:
    queued, self._queued = self._queued, []
    done = []
    for sampling in dict.fromkeys(s for _, s, _ in queued):
      batch = [(r, tag) for r, s, tag in queued if s == sampling]
      completions = self.policy.sample([r for r, _ in batch], sampling, self.seed)
      if len(completions) != len(batch):
        raise RuntimeError(f"policy {self.policy.name!r} answered {len(completions)} of {len(batch)} requests")
      done += [(tag, c) for (_, tag), c in zip(batch, completions)]
    return done

  @property
  def busy(self) -> bool:
    return bool(self._queued)


def sample_uid(key: str, turn: int, round_: int = 0, stream: str = "") -> int:
  """A stable 31-bit id for (stream, conversation, turn, resample round): the engine's per-request random stream."""
  digest = hashlib.blake2b(f"{stream}\x1f{key}\x1f{turn}\x1f{round_}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


class ScriptedPolicy:
  """Answers from a function `respond(request, sample_index) -> text`; records every request it saw.

  "Tokens" are whitespace-separated words (history and response lengths), and `token_ids` is None.
  """

  def __init__(self, respond: Callable[[TurnRequest, int], str], name: str = "scripted", finish_reason: str = "stop"):
    self.name = name
    self._respond = respond
    self._finish_reason = finish_reason
    self.requests: list[TurnRequest] = []
    self.released: list[str] = []

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    del sampling, seed  # a script is deterministic by construction
    out = []
    for request in requests:
      self.requests.append(request)
      history_tokens = sum(len(m["content"].split()) for m in request.messages)
      texts = [self._respond(request, j) for j in range(request.n)]
      samples = tuple(Sample(text=t, finish_reason=self._finish_reason, num_tokens=len(t.split())) for t in texts)
      out.append(Completion(samples=samples, history_tokens=history_tokens, prefill_tokens=history_tokens))
    return out

  def release(self, keys: Sequence[str]) -> None:
    self.released.extend(keys)

  def open_stream(self, seed: int) -> InstantStream:
    return InstantStream(self, seed)


class ReferencePolicy:
  """The task's reference solutions as the teacher: distillation from ground truth (the toy's scratchpads).

  Every sample of a request is the problem's reference text, whatever the history; `references` maps the
  conversation key (the problem id) to it. A key without a reference is an error naming it. Tokens are counted
  as whitespace-separated words, as for a scripted policy: the text was never sampled, so it has no token ids.
  """

  def __init__(self, references: dict[str, str], name: str = "teacher:reference"):
    self.name = name
    self._references = references

  def reply(self, request: TurnRequest) -> str:
    """The text of every sample of `request`."""
    if request.key not in self._references:
      raise KeyError(f"{self.name}: no reference solution for problem {request.key!r}")
    return self._references[request.key]

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    del sampling, seed  # the reference is fixed
    out = []
    for request in requests:
      text = self.reply(request)
      history_tokens = sum(len(m["content"].split()) for m in request.messages)
      sample = Sample(text=text, finish_reason="stop", num_tokens=len(text.split()))
      out.append(Completion(samples=(sample,) * request.n, history_tokens=history_tokens, prefill_tokens=0))
    return out

  def release(self, keys: Sequence[str]) -> None:
    del keys  # stateless

  def open_stream(self, seed: int) -> InstantStream:
    return InstantStream(self, seed)


class RepairPolicy(ReferencePolicy):
  """A correction of a failed attempt as the teacher: `repair(key, attempt)` (the task's `Task.repair`) keeps the
  attempt's right steps and fixes its first wrong one, tried on the attempts the request shows, latest first (a
  retry the model could not yet write, e.g. unparsable, is passed over for the one before it). Where none can be
  repaired, or there is no attempt (turn 1, a window of 1), the reply is the reference solution, counted in
  `fallbacks` (of `requests`). Deterministic and instant like `ReferencePolicy`, whose shape it shares."""

  def __init__(self, references: dict[str, str], repair: Callable[[str, str], str | None],
               name: str = "teacher:repair"):
    super().__init__(references, name=name)
    self._repair = repair
    self.requests = 0
    self.fallbacks = 0

  def reply(self, request: TurnRequest) -> str:
    repaired = next((r for r in (self._repair(request.key, a) for a in reversed(chat.attempts(request.messages)))
                     if r is not None), None)
    self.requests += 1
    self.fallbacks += repaired is None
    return super().reply(request) if repaired is None else repaired


class RepairPromptPolicy:
  """A teacher (`inner`: a checkpoint or an HTTP endpoint) asked to repair the latest failed attempt.

  Each request's messages become one user turn, `repair(question, attempt)` (the prompt set's `PromptSet.repair`)
  of the problem (`questions`: problem id -> question) and the last of `chat.attempts(request.messages)`; key,
  turn, round and stream are kept, so random streams and an HTTP teacher's cache stay per problem and draw.
  A request that shows no attempt (turn 1, a window of 1) goes to `inner` unchanged, counted in `fallbacks` (of
  `requests`).
  """

  def __init__(self, inner, repair: Callable[[str, str], str], questions: dict[str, str]):
    self.inner = inner
    self.name = f"{inner.name}+repair_prompt"
    self._repair = repair
    self._questions = questions
    self.requests = 0
    self.fallbacks = 0

  def prompted(self, request: TurnRequest) -> TurnRequest:
    """`request` as `inner` receives it (counted)."""
    tried = chat.attempts(request.messages)
    self.requests += 1
    self.fallbacks += not tried
    if not tried:
      return request
    if request.key not in self._questions:
      raise KeyError(f"{self.name}: no question for problem {request.key!r}")
    content = self._repair(self._questions[request.key], tried[-1])
    return dataclasses.replace(request, messages=({"role": "user", "content": content},))

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    return self.inner.sample([self.prompted(r) for r in requests], sampling, seed)

  def release(self, keys: Sequence[str]) -> None:
    self.inner.release(keys)

  def open_stream(self, seed: int) -> _RepairPromptStream:
    return _RepairPromptStream(self, self.inner.open_stream(seed))


class _RepairPromptStream:
  """`RepairPromptPolicy`'s stream: the inner policy's, submitted the repair prompt."""

  def __init__(self, policy: RepairPromptPolicy, inner):
    self.policy = policy
    self.inner = inner

  def submit(self, request: TurnRequest, sampling: TurnSampling, tag: Any) -> None:
    self.inner.submit(self.policy.prompted(request), sampling, tag)

  def step(self) -> list[tuple[Any, Completion]]:
    return self.inner.step()

  @property
  def busy(self) -> bool:
    return self.inner.busy


class EnginePolicy:
  """The learner (or a teacher checkpoint) through the continuous-batching engine (`rise_jax.sampling.engine`).

  Conversations are rendered here through the chat template (`rise_jax.chat.render`), so the ids the model sees
  are exactly the template's, and submitted as token ids with per-request random streams (`sample_uid`); stop
  ids default to `requests.default_stop_ids` (the tokenizer's EOS and generation_config.json's). `open_stream`
  keeps one engine queue open across turns (the runner's streamed episodes); `sample` runs one batch through a
  fresh queue. Reuse of a previous turn's cache is the engine's business (its prefix cache reports
  `cached_tokens`); the policy holds no per-conversation state.
  """

  def __init__(self, engine, tokenizer, *, name: str = "learner", stop_token_ids=None, generation_config=None):
    self.engine = engine
    self.tokenizer = tokenizer
    self.name = name
    ids = (sampling_requests.default_stop_ids(engine.config, tokenizer, generation_config)
           if stop_token_ids is None else stop_token_ids)
    self.stop_ids = tuple(dict.fromkeys(int(i) for i in ids))
    if len(self.stop_ids) > sampling_requests.STOP_SLOTS:  # refused now, not at the first request mid-run
      raise ValueError(f"EnginePolicy {name}: {len(self.stop_ids)} stop ids {self.stop_ids}; the engine takes at "
                       f"most {sampling_requests.STOP_SLOTS}")

  @property
  def capacity(self) -> int | None:
    """Tokens one conversation may hold when an overflow raises (None: "report" decodes until full)."""
    return self.engine.capacity if self.engine.on_overflow == "raise" else None

  def sample(self, requests: Sequence[TurnRequest], sampling: TurnSampling, seed: int) -> list[Completion]:
    stream = _EngineQueue(self, self.engine.stream(seed))
    for i, request in enumerate(requests):
      stream.submit(request, sampling, tag=i)
    out: list[Completion | None] = [None] * len(requests)
    while stream.busy:
      for i, completion in stream.step():
        out[i] = completion
    return out

  def open_stream(self, seed: int) -> _EngineQueue:
    """The engine's queue kept open: requests rendered and submitted one at a time (see `PolicyStream`)."""
    return _EngineQueue(self, self.engine.stream(seed))

  def release(self, keys: Sequence[str]) -> None:
    del keys  # nothing held: the engine's cache is content-addressed and evicts least-recently-used blocks itself

  def update_params(self, model) -> None:
    """New weights for the same engine (its compiled programs kept, its prefix cache emptied)."""
    self.engine.update_params(model)


class _EngineQueue:
  """`EnginePolicy`'s stream: a runner `TurnRequest` rendered to token ids and submitted to an `EngineStream`."""

  def __init__(self, policy: EnginePolicy, stream):
    self.policy = policy
    self.stream = stream

  def submit(self, request: TurnRequest, sampling: TurnSampling, tag: Any) -> None:
    ids = list(chat.render(self.policy.tokenizer, list(request.messages), add_generation_prompt=True).ids)
    uid = sample_uid(request.key, request.turn, request.round, request.stream)
    self.stream.submit(sampling_requests.Request(ids, uid=uid, n=request.n, max_new_tokens=sampling.max_new_tokens,
                                                 temperature=sampling.temperature, top_k=sampling.top_k,
                                                 top_p=sampling.top_p, stop_ids=self.policy.stop_ids),
                       tag=(tag, len(ids)))

  def step(self) -> list[tuple[Any, Completion]]:
    out = []
    for (tag, history_tokens), results in self.stream.step():
      text = lambda s: sampling_requests.reply_text(self.policy.tokenizer, s.token_ids, s.finish_reason)
      samples = tuple(_sample(s.token_ids, text(s), s.finish_reason, s.logprobs) for s in results)
      cached = min(s.cached_tokens for s in results)  # the samples of a request share its prompt
      out.append((tag, Completion(samples=samples, history_tokens=history_tokens,
                                  prefill_tokens=history_tokens - cached)))
    return out

  @property
  def busy(self) -> bool:
    return self.stream.busy


def _sample(token_ids, text: str, finish_reason: str, logprobs) -> Sample:
  """A model sample as the runner logs it: ids as ints, log-probabilities summed in float64."""
  token_ids = tuple(int(t) for t in token_ids)
  logprob_sum = float(np.sum(logprobs, dtype=np.float64)) if logprobs is not None else None
  return Sample(text=text, finish_reason=finish_reason, num_tokens=len(token_ids), token_ids=token_ids,
                logprob_sum=logprob_sum)
