"""What an episode is: turns, samples per turn, which candidate continues, oracle stop, history window, per-turn
sampling, seed. The runner (`rise_jax.rollout.runner`) executes a `Protocol`; which protocols RISE runs, and with
which seeds, is `rise_jax.rise.algorithm`'s business."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from rise_jax.rollout.policies import TurnSampling

KINDS = ("sequential", "parallel")
SELECTIONS = ("first", "best_reward")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What an episode is. Sequences (`samples_per_turn`, `sampling`) have one entry per turn."""
  kind: str
  turns: int
  samples_per_turn: tuple[int, ...]
  select: str
  oracle: bool
  window: int | None
  sampling: tuple[TurnSampling, ...]
  grader: str = "paper"
  prompt_set: str = "paper"
  seed: int = 0
  max_resample_rounds: int = 3

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Protocol.kind {self.kind!r} is not one of {KINDS}")
    if self.select not in SELECTIONS:
      raise ValueError(f"Protocol.select {self.select!r} is not one of {SELECTIONS}")
    if self.turns < 1:
      raise ValueError(f"Protocol.turns must be >= 1, got {self.turns}")
    if len(self.samples_per_turn) != self.turns or len(self.sampling) != self.turns:
      raise ValueError(f"Protocol: samples_per_turn ({len(self.samples_per_turn)}) and sampling "
                       f"({len(self.sampling)}) need one entry per turn ({self.turns})")
    if any(n < 1 for n in self.samples_per_turn):
      raise ValueError(f"Protocol.samples_per_turn must be >= 1, got {self.samples_per_turn}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"Protocol.window must be None or >= 1, got {self.window}")
    if self.kind == "parallel" and self.turns != 1:
      raise ValueError("a parallel protocol has exactly one turn (k samples of it)")
    if self.max_resample_rounds < 0:
      raise ValueError(f"Protocol.max_resample_rounds must be >= 0, got {self.max_resample_rounds}")

  @classmethod
  def sequential(cls, turns: int, *, samples: int | Sequence[int] = 1, select: str = "first",
                 oracle: bool = False, window: int | None = None,
                 sampling: TurnSampling | Sequence[TurnSampling] = TurnSampling(), **kwargs) -> Protocol:
    return cls(kind="sequential", turns=turns, samples_per_turn=_per_turn(samples, turns, "samples"),
               select=select, oracle=oracle, window=window, sampling=_per_turn(sampling, turns, "sampling"),
               **kwargs)

  @classmethod
  def parallel(cls, k: int, *, sampling: TurnSampling = TurnSampling(), **kwargs) -> Protocol:
    return cls(kind="parallel", turns=1, samples_per_turn=(k,), select="first", oracle=False, window=None,
               sampling=(sampling,), **kwargs)

  def log_dict(self) -> dict[str, Any]:
    """`record["protocol"]` (contracts §3, plus turns / samples / resample rounds)."""
    return {"kind": self.kind, "oracle": self.oracle, "window": self.window, "grader": self.grader,
            "prompt_set": self.prompt_set, "select": self.select, "seed": self.seed, "turns": self.turns,
            "samples_per_turn": list(self.samples_per_turn), "max_resample_rounds": self.max_resample_rounds}


def _per_turn(value, turns: int, what: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != turns:
      raise ValueError(f"{what}: {len(value)} entries for {turns} turns")
    return tuple(value)
  return (value,) * turns
