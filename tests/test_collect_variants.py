"""Options of Algorithm 1's data: the repairing teacher (`collect.teacher.kind = "repair"`, built by
`Resources.teacher`), a model or HTTP teacher asked to repair the failed attempt (`collect.teacher.prompt =
"repair"`: its wiring and its refusals; its episodes in tests/test_rollout_runner_teacher.py) and RISE's
training set with the control's history-stripped records mixed in (`rise.mix_single_turn`, written by the
collect stage's `_build`), checked against the control's own dataset built from the same episodes."""

import json
import pathlib
import types

import pytest

from rise_jax import config as config_lib
from rise_jax.pipeline import recipes, stages
from rise_jax.pipeline.resources import Resources
from rise_jax.rise import conversion
from rise_jax.rollout.policies import RepairPolicy, RepairPromptPolicy, TurnRequest, TurnSampling
from rise_jax.rollout.teacher import OpenAIChatPolicy
from rise_jax.tasks.prompts import PROMPT_DIR, get_prompt_set

PROMPTS = get_prompt_set("toy")


def _turn(t, text, reward, feedback="wrong, try again"):
  return {"t": t, "policy": "learner@iter_0", "chosen": 0, "feedback": feedback,
          "candidates": [{"text": text, "token_ids": None, "reward": reward}]}


def _episode(pid, question, *turns):
  return {"problem_id": pid, "question": question, "task": "toy", "reference": "?", "turns": list(turns),
          "protocol": {"kind": "sequential", "grader": "robust", "oracle": False}, "stop": "max_turns"}


# Wrong then right; right then kept; wrong twice (oracle off: every episode runs both turns).
EPISODES = [
    _episode("toy/train/0", "25+3*4", _turn(1, "3*4=12,25+12=38", 0.0), _turn(2, "3*4=12,25+12=37", 1.0, None)),
    _episode("toy/train/1", "2+5*5", _turn(1, "5*5=25,2+25=27", 1.0), _turn(2, "5*5=25,2+25=27 ", 1.0, None)),
    _episode("toy/train/2", "9+7*8", _turn(1, "7*8=54,9+54=63", 0.0), _turn(2, "7*8=57,9+57=66", 0.0, None)),
]


def _built(tmp_path, *, mix, control=True, **collect):
  c = recipes.toy()
  c.rise.mix_single_turn, c.rise.single_turn_control = mix, control
  for field, value in collect.items():
    c.collect[field] = value
  res = types.SimpleNamespace(prompts=PROMPTS, tokenizer=None)
  info = stages._build(res, c, EPISODES, tmp_path, 1)
  return info, _read(tmp_path / "data"), _read(tmp_path / "control" / "data") if control else None


def _read(data_dir):
  return [json.loads(line) for line in (data_dir / "sft.jsonl").read_text().splitlines()]


def _converted(single_turn, **collect):
  options = conversion.ConversionOptions(single_turn=single_turn, iteration=1, **collect)
  questions = {e["problem_id"]: e["question"] for e in EPISODES}
  return conversion.convert_rollouts(EPISODES, lambda pid: PROMPTS.initial_messages(questions[pid]), options).records


@pytest.mark.parametrize("collect", [{}, {"dedupe": False, "tau": 0.1}, {"criteria": "success"}])
def test_mixed_rise_data_is_its_multi_turn_records_then_the_controls(tmp_path, collect):
  _, plain, control = _built(tmp_path / "plain", mix=False, **collect)
  info, mixed, control_mixed = _built(tmp_path / "mixed", mix=True, **collect)
  assert control_mixed == control  # the control is unchanged
  assert mixed == plain + control
  assert info["rise_records"] == len(plain) + len(control) and len(control) >= 2
  stripped = mixed[len(plain):]
  assert [r["id"] for r in stripped] == [r["id"] + "#single" for r in plain]
  assert [r["weight"] for r in stripped] == [r["weight"] for r in plain]
  assert [r["messages"] for r in stripped] == [r["messages"][:3] + r["messages"][-1:] for r in plain]
  assert any(len(r["messages"]) > 4 for r in plain)  # some record had a history to strip
  summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())
  assert summary["mix_single_turn"] is True and summary["counts"]["examples"] == len(mixed)
  assert summary["counts"]["episodes"] == len(EPISODES)


def test_without_mixing_rise_data_is_the_multi_turn_conversion(tmp_path):
  info, data, _ = _built(tmp_path, mix=False, control=False)
  assert data == _converted(False) and info["rise_records"] == len(data)
  assert not (tmp_path / "control").exists()
  _, mixed, _ = _built(tmp_path / "m", mix=True, control=False)  # mixing needs no control stage
  assert mixed == _converted(False) + _converted(True)


def test_mixing_with_a_stripped_rise_set_is_refused_naming_the_field():
  c = recipes.toy()
  c.rise.mix_single_turn, c.collect.single_turn = True, True
  with pytest.raises(ValueError, match=r"config field rise\.mix_single_turn: collect\.single_turn already strips"):
    config_lib.validate(c)
  c.collect.single_turn = False
  c.rise.iteration_overrides += ("2:collect.single_turn=True",)
  with pytest.raises(ValueError, match=r"rise\.mix_single_turn.*\(iteration 2"):
    config_lib.validate(c)


def test_resources_builds_the_repair_teacher_over_the_tasks_problems(tmp_path):
  c = recipes.toy_smoke()
  c.output_dir, c.collect.improvement, c.collect.teacher.kind = str(tmp_path), "teacher", "repair"
  res = Resources(config_lib.finalize(c), tmp_path)
  problems = res.task.load("train")
  teacher = res.teacher(res.config, problems)
  assert isinstance(teacher, RepairPolicy) and teacher.name == "teacher:repair"
  requests = []
  for p in problems:
    a, b, c_ = p.meta["a"], p.meta["b"], p.meta["c"]
    attempt = f"{c_}*{b}={b * c_},{a}+{b * c_}={a + b * c_ + 1}"  # a right product, written the other way round
    history = PROMPTS.initial_messages(p.question) + [{"role": "assistant", "content": attempt},
                                                      {"role": "user", "content": PROMPTS.feedback(p.question)}]
    requests.append(TurnRequest(key=p.id, messages=tuple(history), n=2, turn=2))
  requests.append(TurnRequest(key=problems[0].id, messages=tuple(PROMPTS.initial_messages(problems[0].question)),
                              n=1, turn=1))
  done = teacher.sample(requests, TurnSampling(), 0)
  for p, completion in zip(problems, done):
    a, b, c_ = p.meta["a"], p.meta["b"], p.meta["c"]
    assert [s.text for s in completion.samples] == [f"{c_}*{b}={b * c_},{a}+{b * c_}={a + b * c_}"] * 2
    assert res.task.grade(completion.samples[0].text, p.reference, "paper") == 1.0
  assert done[-1].samples[0].text == res.task.solution(problems[0])  # no attempt shown: the reference
  assert (teacher.requests, teacher.fallbacks) == (len(problems) + 1, 1)


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_validate_refuses_the_repair_teacher_for_a_task_that_cannot_repair(task):
  c = config_lib.base_config()
  c.task.name, c.collect.improvement, c.collect.teacher.kind = task, "teacher", "repair"
  with pytest.raises(ValueError, match=rf"config field collect\.teacher\.kind: 'repair' needs .* task '{task}'"):
    config_lib.validate(c)
  c.collect.teacher.kind = "reference"
  config_lib.validate(c)
  c.collect.teacher.kind, c.task.name = "repair", "toy"
  config_lib.validate(c)


def test_validate_refuses_a_repair_teacher_set_for_one_iteration_of_gsm8k():
  c = recipes.smollm2_rise()
  c.rise.iteration_overrides = ("1:collect.improvement='teacher'", "1:collect.teacher.kind='repair'")
  with pytest.raises(ValueError, match=r"collect\.teacher\.kind: 'repair'.*\(iteration 1"):
    config_lib.validate(c)


def _openai_teacher(c, **teacher):
  c.collect.improvement, c.collect.teacher.kind = "teacher", "openai"
  c.collect.teacher.base_url, c.collect.teacher.model = "http://127.0.0.1:9/v1", "teacher-7b"
  for field, value in teacher.items():
    c.collect.teacher[field] = value
  return c


def test_resources_wraps_a_repair_prompted_teacher_and_the_collect_stage_counts_it(tmp_path):
  c = _openai_teacher(recipes.toy_smoke(), prompt="repair")
  c.output_dir, c.task.prompt_set = str(tmp_path), "paper"
  res = Resources(config_lib.finalize(c), tmp_path)
  problems = res.task.load("train")
  teacher = res.teacher(res.config, problems)
  assert isinstance(teacher, RepairPromptPolicy) and isinstance(teacher.inner, OpenAIChatPolicy)
  assert teacher.name == "teacher:teacher-7b+repair_prompt"
  p = problems[1]
  history = get_prompt_set("paper").initial_messages(p.question) + [
      {"role": "assistant", "content": "first =1"}, {"role": "user", "content": "no"},
      {"role": "assistant", "content": "second =2"}, {"role": "user", "content": "no"}]
  [message] = teacher.prompted(TurnRequest(key=p.id, messages=tuple(history), n=1, turn=3)).messages
  content = message["content"]
  assert p.question in content and "second =2" in content and "first =1" not in content
  assert stages._repair_counts(teacher, "iter_1/collect") == {"repair_requests_this_run": 1,
                                                             "repair_fallbacks_this_run": 0}
  c.collect.teacher.prompt = "conversation"
  assert isinstance(Resources(config_lib.finalize(c), tmp_path).teacher(c, problems), OpenAIChatPolicy)


def test_validate_refuses_every_wrong_repair_prompt_combination(tmp_path):
  c = _openai_teacher(config_lib.base_config(), prompt="repair")
  c.task.name = "gsm8k"
  config_lib.validate(c)  # an HTTP teacher on the paper set
  c.collect.teacher.prompt = "attempt"
  with pytest.raises(ValueError, match=r"config field collect\.teacher\.prompt: 'attempt' is not one of"):
    config_lib.validate(c)
  c.collect.teacher.prompt = "repair"
  for kind, task in (("reference", "gsm8k"), ("repair", "toy")):
    c.collect.teacher.kind, c.task.name = kind, task
    with pytest.raises(ValueError, match=rf"config field collect\.teacher\.prompt: 'repair' .* kind '{kind}'"):
      config_lib.validate(c)
  c.collect.teacher.kind, c.task.name = "model", "gsm8k"
  c.collect.teacher.path = str(tmp_path)
  config_lib.validate(c)
  for prompt_set in ("toy", _prompt_file(tmp_path)):
    c.task.prompt_set = prompt_set
    with pytest.raises(ValueError, match=r"config field collect\.teacher\.prompt: .*task\.prompt_set "
                                         rf"'{prompt_set}' has none"):
      config_lib.validate(c)
  c.task.prompt_set = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match=r"config field task\.prompt_set"):
    config_lib.validate(c)


def _prompt_file(tmp_path) -> str:
  """A math prompt set without a repair template."""
  spec = json.loads((pathlib.Path(PROMPT_DIR) / "paper.json").read_text(encoding="utf-8"))
  del spec["repair"]
  path = tmp_path / "no_repair.json"
  path.write_text(json.dumps(spec))
  return str(path)


def test_validate_refuses_a_repair_prompt_set_for_one_iteration_of_the_toy():
  c = recipes.toy()  # iteration 1's teacher gives the reference: no prompt to repair with
  c.rise.iteration_overrides += ("1:collect.teacher.prompt='repair'",)
  with pytest.raises(ValueError, match=r"collect\.teacher\.prompt: 'repair'.*kind 'reference'.*\(iteration 1"):
    config_lib.validate(c)


def test_collect_num_problems_sets_each_iterations_problems_and_is_checked_before_any_stage(tmp_path):
  from rise_jax.pipeline import plan
  from rise_jax.tasks import get_task
  c = recipes.toy()
  c.task.train_size = 100
  c.rise.iteration_overrides += ("2:collect.num_problems=300", "3:collect.num_problems=250")
  res = Resources(config_lib.finalize(c), tmp_path)
  every = get_task("toy", test_size=2000, dev_size=200).load("train")  # the uncapped train split, dev excluded
  got = {t: [p.question for p in res.train_problems(t)] for t in (1, 2, 3)}
  assert got == {1: [p.question for p in every[:100]], 2: [p.question for p in every[:300]],
                 3: [p.question for p in every[:250]]}
  res.preflight(plan.plan(res.config))
  c.rise.iteration_overrides += ("3:collect.num_problems=6000",)  # the toy's default train split holds 5,900
  with pytest.raises(ValueError, match=r"collect\.num_problems: 6000 problems for iteration 3 exceed the 5900"):
    Resources(config_lib.finalize(c), tmp_path).preflight(plan.plan(config_lib.finalize(c)))
  assert not any(tmp_path.iterdir())  # refused before anything was written


def test_collect_num_problems_is_refused_below_one_and_beside_fresh_problems():
  c = recipes.toy()
  c.collect.num_problems = 0
  with pytest.raises(ValueError, match=r"config field collect\.num_problems: must be None or >= 1, got 0"):
    config_lib.validate(c)
  c.collect.num_problems = None
  c.rise.fresh_problems, c.task.train_size = True, 1000
  c.rise.iteration_overrides += ("2:collect.num_problems=500",)
  with pytest.raises(ValueError, match=r"collect\.num_problems: takes the first.*\(iteration 2"):
    config_lib.validate(c)
