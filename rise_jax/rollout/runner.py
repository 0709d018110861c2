"""The one multi-turn episode runner. RISE's data collection (Algorithm 1) and its evaluation (Algorithm 2) are
this loop with different settings (`rise_jax.rollout.protocol.Protocol`, built by `rise_jax.rise.algorithm`): how many turns, how many samples per turn,
which candidate continues (`best_reward`, first on ties, for collection; `first` for evaluation), whether an oracle
stops a row at its first correct answer, the history window, and per-turn sampling parameters. A parallel
baseline (k first-turn samples) is the same loop with one turn and k samples.

Each episode is a small state machine (`_begin_turn` -> `_absorb` each sampled round -> `_end_turn`), streamed:
up to `batch_size` episodes in flight, each request submitted to its turn's policy stream the moment its episode
needs it, so a conversation's next turn (or resampling round) joins the engine's queue while other episodes are
still on their first turn, and a finished episode's place goes to the next problem; the engine's slots never
wait for a turn to drain. An episode that stops (oracle success, last turn) has its record appended to the
rollout log (contracts §3) and flushed at once, in the order episodes finish. On restart the runner
skips problems already in the log; since every random stream is named by (seed, problem id, turn, resample
round, sample, step), a resumed log holds exactly the records an uninterrupted run would have written.

A grader that raises on a sample never stops the run (a deterministic resume would draw the same sample and stop
again): the sample gets reward 0 and answer null, the error is kept in its `grader_error` field, counted in
`RunSummary.grader_errors` and logged as a warning naming the problem.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator, Sequence

from rise_jax import chat
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.degenerate import degenerate_reason
from rise_jax.rollout.policies import Completion, Policy, Sample, TurnRequest
from rise_jax.rollout.protocol import Protocol

@dataclasses.dataclass
class RunSummary:
  """What a `run_episodes` call did (this call only; problems found in the log are `skipped`)."""
  episodes: int = 0
  skipped: int = 0
  decode_tokens: int = 0
  prefill_tokens: int = 0
  resamples: int = 0
  degenerate_kept: int = 0
  grader_errors: int = 0  # samples graded 0 because the grader raised
  seconds: float = 0.0

  @property
  def problems_per_s(self) -> float:
    return self.episodes / self.seconds if self.seconds > 0 else 0.0

  @property
  def tokens_per_s(self) -> float:
    return self.decode_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class _Episode:
  problem: Any
  messages: list[dict[str, str]]
  turns: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  stop: str | None = None
  # The turn being sampled (set by `_begin_turn`, filled by `_absorb`).
  t: int = 0
  view: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the history the policy saw
  first: Completion | None = None   # the turn's first-round completion
  candidates: list[list] = dataclasses.field(default_factory=list)  # [Sample, resample round, degenerate reason]
  tokens: tuple[int, int] = (0, 0)  # (prefill, decode) of the turn, resampling included
  redo: list[int] = dataclasses.field(default_factory=list)  # candidates the pending resampling round replaces


def run_episodes(problems: Sequence[Any], policies: Policy | Sequence[Policy], protocol: Protocol,
                 log_path, *, task, prompts, header: dict[str, Any], batch_size: int = 32,
                 progress: bool = True, desc: str | None = None) -> RunSummary:
  """Run `protocol` on every problem not yet in the log at `log_path`, appending one record per episode.

  policies: one policy for all turns, or `policies[t]` for turn t+1 (e.g. the teacher at the last turn).
  task: grades and extracts answers (`task.grade(text, reference, mode)`, `task.extract_answer(text, mode)`).
  prompts: the prompt set (`initial_messages(question)`, `feedback(question)`).
  header: the log's header line (`rollout_log.make_header(config_hash, model)`); a log written under another
    config hash is refused rather than resumed.
  """
  if not isinstance(policies, (list, tuple)):
    policies = [policies] * protocol.turns
  policies = list(policies)
  if len(policies) != protocol.turns:
    raise ValueError(f"{len(policies)} policies for {protocol.turns} turns")
  for policy in policies:
    if not callable(getattr(policy, "open_stream", None)):
      raise TypeError(f"policy {getattr(policy, 'name', policy)!r} has no open_stream (see rollout.policies.Policy)")
  ids = [p.id for p in problems]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise ValueError(f"problem id {dup!r} appears more than once: the log is keyed by problem id")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")

  writer = rollout_log.RolloutWriter(log_path, header)
  summary = RunSummary()
  try:
    stale = sorted(writer.existing_seeds() - {protocol.seed})
    if stale:  # a resumed log must hold what one uninterrupted run would have drawn
      raise rollout_log.RolloutLogError(
          f"{log_path}: field 'protocol.seed': the log holds episodes drawn with seed {stale}, this protocol's seed is "
          f"{protocol.seed} (rise_jax.rollout/2 changed rise_jax.evaluate's seeds, docs/contracts.md); use "
          "another output_dir")
    done = set(writer.existing_ids())
    todo = [p for p in problems if p.id not in done]
    summary.skipped = len(problems) - len(todo)
    start = time.perf_counter()
    bar = _progress_bar(len(problems), summary.skipped, desc or f"{protocol.kind} x{protocol.turns}", progress)
    records = _run_streamed(todo, policies, protocol, task, prompts, summary, batch_size)
    try:
      for record in records:
        writer.write(record)
        summary.episodes += 1
        summary.seconds = time.perf_counter() - start
        if bar is not None:
          bar.update(1)
          bar.set_postfix_str(f"{summary.tokens_per_s:.1f} tok/s", refresh=False)
    finally:
      records.close()  # an exception here leaves episodes in flight: their generator frees their state
      if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - start
    if summary.grader_errors:
      logging.warning("%d sample(s) graded 0 because the grader raised: see their `grader_error` in %s",
                      summary.grader_errors, log_path)
  finally:
    writer.close()
  return summary


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="problem", dynamic_ncols=True)


def _run_streamed(problems, policies, protocol: Protocol, task, prompts, summary: RunSummary,
                  in_flight: int) -> Iterator[dict]:
  """Run episodes with up to `in_flight` at once, each request submitted to its turn's policy stream the moment
  the episode needs it; yield each record as soon as its episode stops."""
  distinct_policies = list({id(q): q for q in policies}.values())
  streams = {id(q): q.open_stream(protocol.seed) for q in distinct_policies}
  waiting = iter(problems)
  live: dict[str, _Episode] = {}

  def submit(episode: _Episode, request: TurnRequest) -> None:
    streams[id(policies[request.turn - 1])].submit(request, protocol.sampling[request.turn - 1],
                                                     tag=(episode, request))

  def start_next() -> None:
    problem = next(waiting, None)
    if problem is not None:
      episode = _Episode(problem=problem, messages=list(prompts.initial_messages(problem.question)))
      live[problem.id] = episode
      submit(episode, _begin_turn(episode, protocol))

  try:
    for _ in range(in_flight):
      start_next()
    while live:
      busy = [stream for stream in streams.values() if stream.busy]
      if not busy:
        raise RuntimeError(f"{len(live)} episode(s) in flight but no policy stream has work: a stream lost requests")
      for stream in busy:
        for (episode, request), completion in stream.step():
          policy = policies[request.turn - 1]
          _check_completion(policy, request, completion)
          follow = _absorb(episode, request, completion, protocol, summary)
          if follow is not None:  # a resampling round of degenerate samples
            submit(episode, follow)
          elif _end_turn(episode, policy, protocol, task, prompts, summary):
            del live[episode.problem.id]
            for holder in distinct_policies:
              holder.release([episode.problem.id])
            yield _record(episode, task, protocol)
            start_next()
          else:
            submit(episode, _begin_turn(episode, protocol))
  finally:
    if live:  # an exception (or a closed generator) leaves episodes in flight: free their state
      for holder in distinct_policies:
        holder.release(list(live))


def check_capacity(problems: Sequence[Any], protocol: Protocol, prompts, tokenizer, capacity: int | None, *,
                   what: str, fix: str) -> None:
  """Refuse, before any episode runs, a protocol whose last turn cannot fit a conversation of `capacity` tokens
  for some problem (None: the policy decodes until full, nothing to refuse): its prompt with the earlier turns the
  window keeps, each reply at its max_new_tokens, under the chat template, plus the last reply. Names the problem
  needing the most; mid-run, the overflow would name only a sample's hashed stream."""
  if capacity is None or not problems:
    return
  turns, window = protocol.turns, protocol.window
  kept = turns - 1 if window is None else min(turns - 1, window - 1)  # earlier replies the last prompt shows
  budget = sorted((s.max_new_tokens for s in protocol.sampling[:-1]), reverse=True)[:kept]
  last = protocol.sampling[-1].max_new_tokens
  needs = []
  for problem in problems:
    messages = list(prompts.initial_messages(problem.question))
    for _ in range(turns - 1):  # an empty reply: its content is counted as max_new_tokens below
      messages += [{"role": "assistant", "content": ""},
                   {"role": "user", "content": prompts.feedback(problem.question)}]
    view = chat.window(messages, window) if window else messages
    prompt = chat.rendered_length(tokenizer, view, add_generation_prompt=True)
    needs.append((prompt + sum(budget) + last, prompt, problem.id))
  need, prompt, problem_id = max(needs, key=lambda n: n[0])
  if need > capacity:
    over = sum(n[0] > capacity for n in needs)
    raise ValueError(
        f"{what}: problem {problem_id} needs up to {need} tokens at turn {turns} ({prompt} prompt tokens under the "
        f"chat template with {kept} earlier turn(s) and their feedback in the window, + {len(budget)} earlier "
        f"replies and the last at max_new_tokens {last}), but a conversation holds {capacity} ({over} of "
        f"{len(needs)} problems cannot fit); {fix}")


def _begin_turn(episode: _Episode, protocol: Protocol) -> TurnRequest:
  """Start the episode's next turn: its request, over the history as the protocol's window shows it."""
  episode.t += 1
  t = episode.t
  episode.view = chat.window(episode.messages, protocol.window) if protocol.window else list(episode.messages)
  episode.first, episode.candidates, episode.tokens, episode.redo = None, [], (0, 0), []
  return TurnRequest(key=episode.problem.id, messages=tuple(episode.view), n=protocol.samples_per_turn[t - 1],
                     turn=t, stream=protocol.kind)


def _absorb(episode: _Episode, request: TurnRequest, completion: Completion, protocol: Protocol,
            summary: RunSummary) -> TurnRequest | None:
  """Take the completion of the turn's request (round 0) or of a resampling round. Returns the next round's
  request while degenerate samples remain and rounds are left (up to `max_resample_rounds`), else None: the
  turn is sampled."""
  if request.round == 0:
    episode.first = completion
    episode.candidates = [[s, 0, degenerate_reason(s.text)] for s in completion.samples]
    episode.tokens = _tokens(completion)
  else:
    episode.tokens = tuple(a + b for a, b in zip(episode.tokens, _tokens(completion)))
    for j, sample in zip(episode.redo, completion.samples):
      episode.candidates[j] = [sample, request.round, degenerate_reason(sample.text)]
    summary.resamples += len(episode.redo)
  episode.redo = [j for j, cand in enumerate(episode.candidates) if cand[2] is not None]
  if episode.redo and request.round < protocol.max_resample_rounds:
    # The r-th resampling of a row draws len(redo) fresh samples from its own random stream (key, turn, r).
    return dataclasses.replace(request, n=len(episode.redo), round=request.round + 1)
  summary.degenerate_kept += len(episode.redo)
  summary.prefill_tokens += episode.tokens[0]
  summary.decode_tokens += episode.tokens[1]
  return None


def _end_turn(episode: _Episode, policy: Policy, protocol: Protocol, task, prompts, summary: RunSummary) -> bool:
  """Grade the sampled turn, log it and extend the conversation with the chosen reply and the failure message;
  True when the episode stopped."""
  turn = _score_turn(episode, policy, protocol, task, prompts)
  summary.grader_errors += sum("grader_error" in c for c in turn["candidates"])
  episode.turns.append(turn)
  if episode.stop is not None:
    return True
  episode.messages += [{"role": "assistant", "content": turn["candidates"][turn["chosen"]]["text"]},
                       {"role": "user", "content": turn["feedback"]}]
  return False


def _check_completion(policy: Policy, request: TurnRequest, completion: Completion) -> None:
  if len(completion.samples) != request.n:
    raise RuntimeError(f"policy {policy.name!r} gave {len(completion.samples)} samples for {request.key!r} "
                       f"turn {request.turn}, {request.n} requested")


def _tokens(c: Completion) -> tuple[int, int]:
  """(prefill, decode) tokens of one completion; a policy that cannot tell what it prefilled re-prefilled all."""
  prefill = c.history_tokens if c.prefill_tokens is None else c.prefill_tokens
  return prefill, sum(s.num_tokens for s in c.samples)


def _score_turn(episode: _Episode, policy: Policy, protocol: Protocol, task, prompts) -> dict[str, Any]:
  """Grade every candidate of the sampled turn, pick the continuing one, decide whether the episode stops; the
  turn's log entry."""
  problem, t, tokens = episode.problem, episode.t, episode.tokens
  logged = []
  for sample, resamples, reason in episode.candidates:
    logged.append(_candidate(sample, resamples, reason, task, problem, protocol.grader))
  rewards = [c["reward"] for c in logged]
  chosen = rewards.index(max(rewards)) if protocol.select == "best_reward" else 0
  if protocol.oracle and rewards[chosen] == 1.0:
    episode.stop = "oracle_success"
  elif t == protocol.turns:
    episode.stop = "max_turns"
  return {
      "t": t,
      "policy": policy.name,
      "history_tokens": episode.first.history_tokens,
      "prefill_tokens": tokens[0],
      "decode_tokens": tokens[1],
      "window_applied": len(episode.view) != len(episode.messages),
      "sampling": protocol.sampling[t - 1].to_dict(),
      "candidates": logged,
      "chosen": chosen,
      # Without an oracle the failure message follows every turn, whatever the true reward.
      "feedback": None if episode.stop is not None else prompts.feedback(problem.question),
  }


def _candidate(sample: Sample, resamples: int, reason: str | None, task, problem, grader: str) -> dict:
  answer, reward, error = _graded(task, sample.text, problem, grader)
  out = {
      "text": sample.text,
      "token_ids": None if sample.token_ids is None else [int(i) for i in sample.token_ids],
      "logprob_sum": None if sample.logprob_sum is None else float(sample.logprob_sum),
      "num_tokens": sample.num_tokens,
      "finish_reason": sample.finish_reason,
      "answer": answer,
      "reward": reward,
      "resamples": resamples,
  }
  if error is not None:
    out["grader_error"] = error
  if reason is not None:  # still degenerate after the last resampling round: kept, flagged
    out["flagged_degenerate"] = True
    out["degenerate_reason"] = reason
  return out


def _graded(task, text: str, problem, grader: str) -> tuple[str | None, float, str | None]:
  """(answer, reward, error) of one sample; a grader exception is reward 0 with the error, never an abort."""
  try:
    return task.extract_answer(text, grader), float(task.grade(text, problem.reference, grader)), None
  except Exception as e:  # noqa: BLE001 - any grader bug must cost one sample, not the run
    error = f"{type(e).__name__}: {str(e)[:200]}"
    logging.warning("grader error on problem %s (%s grading, %d-character sample): %s; reward 0", problem.id,
                    grader, len(text), error)
    return None, 0.0, error


def _record(episode: _Episode, task, protocol: Protocol) -> dict[str, Any]:
  p = episode.problem
  return {"problem_id": p.id, "task": task.name, "reference": p.reference, "question": p.question,
          "protocol": protocol.log_dict(), "turns": episode.turns, "stop": episode.stop}
