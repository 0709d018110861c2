"""Hand-building contracts §3 rollout records for the rollout-log, metrics and report tests.

A turn is given as a list of candidates, each `(answer, reward)` or a dict of candidate fields; everything else
gets plausible defaults so a test states only what it is about.
"""

from __future__ import annotations

from typing import Any, Sequence

from rise_jax.rollout import log as rollout_log


def candidate(answer: str | None, reward: float, *, num_tokens: int = 3, teacher: bool = False,
              **fields) -> dict:
  c = {"text": f"... \\boxed{{{answer}}}" if answer is not None else "no answer",
       "token_ids": None if teacher else list(range(5, 5 + num_tokens)),
       "logprob_sum": None if teacher else -1.5 * num_tokens, "num_tokens": num_tokens,
       "finish_reason": "stop", "answer": answer, "reward": float(reward), "resamples": 0}
  c.update(fields)
  return c


def _as_candidate(c: Any) -> dict:
  return c if isinstance(c, dict) else candidate(*c)


def turn(t: int, candidates: Sequence[Any], *, chosen: int = 0, history_tokens: int = 100,
         feedback: str | None = "The answer is incorrect. Please try again.", **fields) -> dict:
  out = {"t": t, "policy": "learner@iter_1", "history_tokens": history_tokens, "window_applied": False,
         "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64},
         "candidates": [_as_candidate(c) for c in candidates], "chosen": chosen, "feedback": feedback}
  out.update(fields)
  return out


def sequential(problem_id: str, answers: Sequence[tuple[str | None, float]], *, oracle: bool = False,
               seed: int = 0, task: str = "toy", **protocol) -> dict:
  """One sequential episode: turn t's chosen (answer, reward) is answers[t-1]."""
  turns = [turn(i + 1, [a], history_tokens=100 + 50 * i) for i, a in enumerate(answers)]
  stop = "oracle_success" if oracle and answers[-1][1] == 1.0 else "max_turns"
  return record(problem_id, turns, kind="sequential", oracle=oracle, stop=stop, seed=seed, task=task, **protocol)


def parallel(problem_id: str, answers: Sequence[tuple[str | None, float]], *, seed: int = 0,
             task: str = "toy") -> dict:
  """One parallel episode: k first-turn candidates."""
  return record(problem_id, [turn(1, list(answers), feedback=None)], kind="parallel", oracle=False,
                stop="max_turns", seed=seed, task=task)


def record(problem_id: str, episode_turns: list[dict], *, kind: str, oracle: bool, stop: str, seed: int = 0,
           task: str = "toy", **protocol) -> dict:
  p = {"kind": kind, "oracle": oracle, "window": None, "grader": "robust", "prompt_set": "paper",
       "select": "first", "seed": seed}
  p.update(protocol)
  return {"problem_id": problem_id, "task": task, "reference": "#### 0", "protocol": p, "turns": episode_turns,
          "stop": stop}


def header(config_hash: str = "cafe0123") -> dict:
  return rollout_log.make_header(config_hash, {"preset": "toy-llama"}, versions={"rise_jax": "0.1.0"},
                                 git_commit="0" * 40)


def write_log(path, records: Sequence[dict], config_hash: str = "cafe0123"):
  with rollout_log.RolloutWriter(path, header(config_hash), fsync=False) as w:
    for r in records:
      w.write(r)
  return path
