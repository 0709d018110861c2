"""RISE's Algorithms 1 and 2 (Qu et al., "Recursive Introspection", NeurIPS 2024), as settings of the episode
engine (`rise_jax.rollout`) and the rules that turn episodes into weighted training data.

Symbols (docs/rise.md): a problem x with reference answer y*; the state at turn t is
s_t = [x, y_1, f_1, ..., y_{t-1}, f_{t-1}]; the action y_t ~ pi(. | s_t) is a full response; f_t the fixed
"incorrect, try again" feedback; r_t = r(x, y_t) in {0, 1} (-1 for an unparsable GSM8K answer under the paper's
grader); K the collection turns, N the samples per turn; tau the temperature of reward-weighted regression.

Algorithm 1, iteration T (`collection_protocol`, then `rise_jax.rise.conversion` applies the rules below):
  for every training x: roll out pi_{T-1} for turns 1..K-1 (N samples a turn, the best-reward one continues, first
  on ties), turn K is the improvement turn (best-of-N from pi_{T-1}: self-distillation; or a teacher:
  distillation); stop at the first success.
  D_T = the prefixes [x, y_1, f_1, ..., y_i] of the deduplicated actions (`dedupe_actions`) kept under the
  `criteria` (`keep_prefix`), weighted w_i = exp(r_i / tau) (`example_weight`);
  pi_T = argmax sum_i w_i log pi(y_i | prefix_i), trained from pi_0 or pi_{T-1} (`training_start`) on D_T or
  D_1..D_T (`training_data`).
Algorithm 2 (`evaluation_protocols`): sequential: turns 1..k, one sample each, f_t after every turn whatever r_t
  (no oracle: m1@tk votes over y_1..y_k; p1@tk reads the same log), the history window W; parallel: k first-turn
  samples (mk@t1, pk@t1). One seed rule (`eval_seed`) for every command that evaluates.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from rise_jax.config import CRITERIA, WEIGHTINGS
from rise_jax.rollout.policies import TurnSampling
from rise_jax.rollout.protocol import Protocol

SELF_REFINE_PROMPT_SET = "self_refine"  # the Self-Refine prompting baseline: Algorithm 2 with other feedback


# -- Algorithm 1: the episode and the data rules --------------------------------------------------------------

def turn_sampling(config, teacher: bool = False) -> TurnSampling:
  """Sampling of a learner turn (`sampling`), or of the teacher's turn (its own temperature and token limit)."""
  s, t = config.sampling, config.collect.teacher
  if teacher:
    return TurnSampling(temperature=t.temperature, top_p=1.0, top_k=0, max_new_tokens=t.max_tokens)
  return TurnSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)


def collection_protocol(config) -> Protocol:
  """Algorithm 1's episode: turns 1..K-1 with N = `samples_per_turn` samples from pi_{T-1}, turn K with
  `improvement_samples` from the improvement policy; the best reward continues; stop at the first success (an
  oracle, as the reference's collection does), or with `collect.oracle=False` run all K turns with the failure
  message after every one, the condition the model meets at test time without an oracle. `collect.window` limits
  the history the policies see."""
  co = config.collect
  learner = turn_sampling(config)
  last = turn_sampling(config, teacher=co.improvement == "teacher")
  samples = (co.samples_per_turn,) * (co.turns - 1) + (co.improvement_samples,)
  return Protocol.sequential(co.turns, samples=samples, select="best_reward", oracle=co.oracle, window=co.window,
                             sampling=(learner,) * (co.turns - 1) + (last,), grader=config.task.grader,
                             prompt_set=config.task.prompt_set, seed=config.seed,
                             max_resample_rounds=co.max_resample_rounds)


def boost_protocol(config, teacher: bool) -> Protocol:
  """The boost's data (before iteration 1): one turn, best of `improvement_samples` from the improvement policy,
  kept when correct."""
  co = config.collect
  return Protocol.sequential(1, samples=co.improvement_samples, select="best_reward", oracle=True,
                             sampling=turn_sampling(config, teacher), grader=config.task.grader,
                             prompt_set=config.task.prompt_set, seed=config.seed,
                             max_resample_rounds=co.max_resample_rounds)


def keep_prefix(rewards: Sequence[float], i: int, criteria: str) -> bool:
  """Whether the prefix ending at action y_i (0-based, after dedupe) enters D_T: `all` every i; `better` i = 0 or
  r_i > r_{i-1}; `best` i = 0 or r_i >= r_j for all j < i; `success` only r_i = 1."""
  r = rewards[i]
  if criteria == "success":
    return r == 1.0
  if i == 0 or criteria == "all":
    return True
  if criteria == "better":
    return r > rewards[i - 1]
  if criteria == "best":
    return all(r >= rewards[j] for j in range(i))
  raise ValueError(f"criteria {criteria!r} is not one of {CRITERIA}")


def dedupe_actions(actions: list) -> tuple[list, int, int]:
  """Drop empty actions and repeats of an earlier action (compared stripped; each action has `.text`), each
  with the feedback after it.

  As in the reference, removing y_i also removes f_i, so a later kept action follows the feedback of the previous
  *kept* action: the history of every later prefix changes. Returns (kept, duplicates, empties).
  """
  seen, kept, duplicates, empties = set(), [], 0, 0
  for action in actions:
    key = action.text.strip()
    if not key:
      empties += 1
    elif key in seen:
      duplicates += 1
    else:
      seen.add(key)
      kept.append(action)
  return kept, duplicates, empties


def example_weight(reward: float, weighting: str = "exp", tau: float = 0.4) -> float:
  """Reward-weighted regression: w = exp(r / tau) (the reference), or w = 1 for plain SFT (`uniform`)."""
  if weighting == "uniform":
    return 1.0
  if weighting != "exp":
    raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
  return math.exp(reward / tau)


def reward_range(task: str, grader: str) -> tuple[float, ...]:
  """The values r can take: the reference's GSM8K grader gives -1 to an unparsable answer."""
  return (-1.0, 0.0, 1.0) if grader == "paper" and task == "gsm8k" else (0.0, 1.0)


def weight_table(rewards: Iterable[float], weighting: str, tau: float) -> dict[str, float]:
  """r -> w, for the dataset summary (keys as strings for JSON)."""
  return {repr(float(r)): example_weight(float(r), weighting, tau) for r in sorted(set(rewards))}


# -- the iteration schedule ------------------------------------------------------------------------------------

def training_start(config, iteration: int) -> int | None:
  """The iteration whose model pi_T is trained from: None for the boost (T = 0, from the base model itself);
  0 (pi_0: the base model, boosted when `rise.boost`) for T = 1 or `rise.init_from = base`; else T - 1."""
  if iteration == 0:
    return None
  if iteration == 1 or config.rise.init_from == "base":
    return 0
  return iteration - 1


def training_data(config, iteration: int) -> list[int]:
  """The iterations whose data D_t train pi_T: D_T alone (`rise.data = current`) or D_1..D_T (`accumulated`);
  the boost (T = 0) trains on its own data."""
  if iteration == 0:
    return [0]
  first = 1 if config.rise.data == "accumulated" else iteration
  return list(range(first, iteration + 1))


# -- Algorithm 2: evaluation -----------------------------------------------------------------------------------

def eval_seed(seed: int, kind: str, draw: int = 0) -> int:
  """The one evaluation seed rule: sequential draw d samples with seed + 1 + 2d, the parallel run with seed + 2.

  Collection samples with `seed` itself; distinct evaluation seeds keep the evaluation's random streams apart
  from collection's even on shared problems (streams are named by seed, problem, turn and protocol kind), and
  odd/even offsets keep every draw apart from the parallel run.
  """
  if kind == "parallel":
    return seed + 2
  if kind == "sequential":
    return seed + 1 + 2 * draw
  raise ValueError(f"kind {kind!r} is not 'sequential' or 'parallel'")


def sequential_label(draw: int) -> str:
  return "sequential" if draw == 0 else f"sequential_draw{draw}"


def evaluation_protocols(config) -> dict[str, Protocol]:
  """Algorithm 2's runs, by label, in the order they run: `sequential` (`eval.turns` turns, one sample each, the
  failure feedback after every turn, `eval.oracle`, `eval.window`), `sequential_draw<d>` for the further
  `eval.draws`, `parallel` (`eval.parallel_k` first-turn samples) and, with `eval.self_refine`, `self_refine`
  (draw 0 under the Self-Refine prompt set)."""
  e, c = config.eval, config
  common = dict(sampling=turn_sampling(c), grader=c.task.grader, max_resample_rounds=c.collect.max_resample_rounds)

  def sequential(draw: int, prompt_set: str) -> Protocol:
    return Protocol.sequential(e.turns, samples=1, select="first", oracle=bool(e.oracle), window=e.window,
                               prompt_set=prompt_set, seed=eval_seed(c.seed, "sequential", draw), **common)

  runs = {sequential_label(d): sequential(d, c.task.prompt_set) for d in range(e.draws)}
  runs["parallel"] = Protocol.parallel(e.parallel_k, prompt_set=c.task.prompt_set,
                                       seed=eval_seed(c.seed, "parallel"), **common)
  if e.self_refine:
    runs["self_refine"] = sequential(0, SELF_REFINE_PROMPT_SET)
  return runs
