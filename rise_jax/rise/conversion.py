"""Rollouts -> weighted training records (`rise_jax.sft/1`, docs/contracts.md §4): the second half of Algorithm 1.

Follows the reference's `workflow_convert.py` (cmu-mind/RISE): each episode's chosen actions a_1..a_n with
rewards r_1..r_n give prefixes [instruction, example answer, x, a_1, f_1, ..., a_i]; only a_i is trained, with
weight w = exp(r_i / tau). Which prefixes survive, the dedupe and the weights are `rise_jax.rise.algorithm`'s rules;
this module applies them to logged episodes. It is a pure function of the records, so a dataset can be rebuilt
offline from a log with different options. Differences from the reference, deliberate:
  * the trained text is the sampled text itself; the reference `.strip()`s it when deduplicating, which makes the
    trained tokens differ from the sampled ones. Duplicates are still detected on stripped text.
  * nothing is dropped silently: every removed action and skipped episode is counted in `ConversionStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

from rise_jax.rise.algorithm import CRITERIA, WEIGHTINGS, dedupe_actions, example_weight, keep_prefix

SFT_SCHEMA = "rise_jax.sft/1"


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
  """Which prefixes become training examples and how they are weighted (config section `collect`)."""
  criteria: str = "all"
  dedupe: bool = True
  only_success: bool = False
  weighting: str = "exp"
  tau: float = 0.4
  single_turn: bool = False
  iteration: int = 1

  def __post_init__(self):
    if self.criteria not in CRITERIA:
      raise ValueError(f"criteria {self.criteria!r} is not one of {CRITERIA}")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting {self.weighting!r} is not one of {WEIGHTINGS}")
    if not self.tau > 0:
      raise ValueError(f"tau must be > 0, got {self.tau}")

  @classmethod
  def from_config(cls, config, *, iteration: int, single_turn: bool | None = None) -> "ConversionOptions":
    co = config.collect
    return cls(criteria=co.criteria, dedupe=co.dedupe, only_success=co.only_success, weighting=co.weighting,
               tau=co.tau, single_turn=co.single_turn if single_turn is None else single_turn,
               iteration=iteration)


@dataclasses.dataclass
class Action:
  """One chosen action of an episode, with the feedback that followed it (None after the last)."""
  turn: int
  text: str
  reward: float
  feedback: str | None
  token_ids: list[int] | None
  policy: str
  num_candidates: int


@dataclasses.dataclass
class ConversionStats:
  """Counts for the dataset summary; every action and episode is accounted for."""
  episodes: int = 0
  episodes_skipped_only_success: int = 0
  actions: int = 0
  removed_duplicate: int = 0
  removed_empty: int = 0
  examples: int = 0
  # Examples each criterion would keep on the same (deduplicated) actions: the summary's comparison table.
  kept_per_criterion: dict[str, int] = dataclasses.field(default_factory=lambda: {c: 0 for c in CRITERIA})
  # reward value -> number of kept examples with that reward (as a string key, for JSON).
  examples_per_reward: dict[str, int] = dataclasses.field(default_factory=dict)
  examples_per_turn: dict[str, int] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Conversion:
  """The records, the sampled token ids of each trained action (None for teacher text), and the counts."""
  records: list[dict[str, Any]]
  sampled_ids: list[list[int] | None]
  stats: ConversionStats


def episode_actions(record: Mapping[str, Any], where: str = "record") -> list[Action]:
  """The chosen action of every turn of a rollout record, validated (errors name `where` and the field)."""
  turns = record.get("turns")
  if not isinstance(turns, list) or not turns:
    raise ValueError(f"{where}: field 'turns' must be a non-empty list")
  actions = []
  for k, turn in enumerate(turns):
    here = f"{where}: turns[{k}]"
    candidates, chosen = turn.get("candidates"), turn.get("chosen")
    if not isinstance(candidates, list) or not candidates:
      raise ValueError(f"{here}: field 'candidates' must be a non-empty list")
    if not isinstance(chosen, int) or not 0 <= chosen < len(candidates):
      raise ValueError(f"{here}: field 'chosen' must index 'candidates' (got {chosen!r})")
    cand = candidates[chosen]
    text, reward = cand.get("text"), cand.get("reward")
    if not isinstance(text, str):
      raise ValueError(f"{here}: candidates[{chosen}].text must be a string")
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or math.isnan(reward):
      raise ValueError(f"{here}: candidates[{chosen}].reward must be a number (got {reward!r})")
    feedback = turn.get("feedback")
    if k + 1 < len(turns) and not isinstance(feedback, str):
      raise ValueError(f"{here}: field 'feedback' is required before turn {k + 2}")
    actions.append(Action(turn=int(turn.get("t", k + 1)), text=text, reward=float(reward), feedback=feedback,
                          token_ids=cand.get("token_ids"), policy=str(turn.get("policy", "")),
                          num_candidates=len(candidates)))
  return actions


def _source(action: Action) -> str:
  n = action.num_candidates
  return f"{action.policy}:best_of_{n}" if n > 1 else action.policy


def episode_examples(record: Mapping[str, Any], initial_messages: list[dict[str, str]],
                     options: ConversionOptions, stats: ConversionStats | None = None,
                     where: str = "record") -> list[tuple[dict[str, Any], list[int] | None]]:
  """The `rise_jax.sft/1` records (with the sampled ids of each trained action) one episode yields."""
  stats = stats if stats is not None else ConversionStats()
  actions = episode_actions(record, where)
  stats.episodes += 1
  stats.actions += len(actions)
  if options.only_success and max(a.reward for a in actions) != 1.0:
    stats.episodes_skipped_only_success += 1
    return []
  if options.dedupe:
    actions, duplicates, empties = dedupe_actions(actions)
    stats.removed_duplicate += duplicates
    stats.removed_empty += empties
  rewards = [a.reward for a in actions]
  problem_id = record.get("problem_id")
  if not isinstance(problem_id, str):
    raise ValueError(f"{where}: field 'problem_id' must be a string")
  grader = (record.get("protocol") or {}).get("grader")
  # With an oracle the episode ended at its first success (the reference never continues past one); collected
  # without one (collect.oracle=False), a right answer is followed by the failure message and the episode goes on.
  stops_at_success = (record.get("protocol") or {}).get("oracle", True)
  out, history = [], []
  for i, action in enumerate(actions):
    for criteria in CRITERIA:
      stats.kept_per_criterion[criteria] += keep_prefix(rewards, i, criteria)
    if keep_prefix(rewards, i, options.criteria):
      context = [] if options.single_turn else history
      messages = [dict(m) for m in initial_messages] + [dict(m) for m in context]
      messages.append({"role": "assistant", "content": action.text, "train": True})
      suffix = "#single" if options.single_turn else ""
      out.append(({
          "id": f"{problem_id}#iter{options.iteration}#t{action.turn}{suffix}",
          "weight": example_weight(action.reward, options.weighting, options.tau),
          "messages": messages,
          "meta": {"problem_id": problem_id, "iteration": options.iteration, "turn": action.turn,
                   "position": i + 1, "reward": action.reward, "source": _source(action),
                   "criteria": options.criteria, "grader": grader, "single_turn": options.single_turn},
      }, action.token_ids))
      key = repr(action.reward)
      stats.examples_per_reward[key] = stats.examples_per_reward.get(key, 0) + 1
      stats.examples_per_turn[str(i + 1)] = stats.examples_per_turn.get(str(i + 1), 0) + 1
    if action.reward == 1.0 and stops_at_success:
      break
    if i + 1 < len(actions):
      history += [{"role": "assistant", "content": action.text}, {"role": "user", "content": action.feedback}]
  stats.examples += len(out)
  return out


def convert_rollouts(records: Iterable[Mapping[str, Any]],
                     initial_messages: Callable[[str], list[dict[str, str]]],
                     options: ConversionOptions, source: str = "rollouts") -> Conversion:
  """Convert rollout records (docs/contracts.md §3) into training records (§4).

  `initial_messages(problem_id)` gives the prompt set's opening messages (instruction + worked example, its
  answer, the problem turn) for that problem. Record order is preserved; shuffling is the trainer's job.
  """
  stats, out, ids, seen = ConversionStats(), [], [], set()
  for n, record in enumerate(records):
    where = f"{source}: record {n}"
    problem_id = record.get("problem_id")
    if problem_id in seen:
      raise ValueError(f"{where}: duplicate problem_id {problem_id!r} (one episode per problem and iteration)")
    seen.add(problem_id)
    for example, token_ids in episode_examples(record, initial_messages(problem_id), options, stats, where):
      out.append(example)
      ids.append(token_ids)
  return Conversion(records=out, sampled_ids=ids, stats=stats)


def concatenate(first: Conversion, second: Conversion) -> Conversion:
  """`first`'s records followed by `second`'s, both converted from the same episodes (rise.mix_single_turn: RISE's
  records, then the control's): example counts add up, episode and action counts are `first`'s."""
  a, b = first.stats, second.stats
  add = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in dict.fromkeys([*x, *y])}  # noqa: E731
  stats = dataclasses.replace(a, examples=a.examples + b.examples,
                              kept_per_criterion=add(a.kept_per_criterion, b.kept_per_criterion),
                              examples_per_reward=add(a.examples_per_reward, b.examples_per_reward),
                              examples_per_turn=add(a.examples_per_turn, b.examples_per_turn))
  return Conversion(records=first.records + second.records, sampled_ids=first.sampled_ids + second.sampled_ids,
                    stats=stats)


def reward_counter(records: Iterable[Mapping[str, Any]]) -> collections.Counter:
  return collections.Counter(float(r["meta"]["reward"]) for r in records)
