"""Tasks, prompt sets and the toy tokenizer: loading, errors, splits, and the reference's exact prompt strings."""

import itertools
import json
import random

import pytest

from rise_jax.tasks.prompts import get_prompt_set
from rise_jax.tasks import get_task
from rise_jax.tasks.graders import grade
from rise_jax.tasks.prompts import load_prompt_set
from rise_jax.chat import toy_tokenizer
from rise_jax.tasks import base, toy

# The RISE reference's strings (cmu-mind/RISE utils/template.py and environments/*.py), typed out from the source.
PAPER_INSTRUCTION = (
    "\nYou are an AI language model designed to assist with math problem-solving. In this task, I will provide you "
    "with math problems. Your goal is to solve the problem step-by-step, showing your reasoning at each step. After "
    "you have finished solving the problem, present your final answer as \\boxed{Your Answer}.\n\nHere is the math "
    "word problem for you to solve:\n\nOf the 60 students in the drama club, 36 take mathematics, 27 take physics "
    "and 20 students take both mathematics and physics. How many drama club students take neither mathematics nor "
    "physics?\n")
PAPER_EXAMPLE_ANSWER = (
    "Step 1: To find the number of drama club students who take neither mathematics nor physics, we first need to "
    "determine the number of students taking only math, only physics, and both math and physics. Step 2: Out of the "
    "60 students in the drama club, 36 take mathematics and 27 take physics, and 20 students take both mathematics "
    "and physics. Step 3: To calculate the number of students taking only math, we subtract the number of students "
    "taking both from the total taking math: $36 - 20 = 16$. Step 4: Similarly, to calculate the number of students "
    "taking only physics, we subtract the number of students taking both from the total taking physics: "
    "$27 - 20 = 7$. Step 5: Now, to find the number of students taking neither math nor physics, we subtract the "
    "total number of students taking only math, only physics, and both from the total number of students in the "
    "drama club. This gives us $60 - 16 - 7 - 20 = \\boxed{17}$ students taking neither. Answer: \\boxed{17}")


# ------------------------------------------------------------------------------------------------ prompt sets
def test_paper_prompt_set_is_the_reference_verbatim():
  ps = get_prompt_set("paper")
  q = "Natalia sold clips to 48 of her friends in April. {x}"
  assert ps.initial_messages(q) == [
      {"role": "user", "content": PAPER_INSTRUCTION},
      {"role": "assistant", "content": PAPER_EXAMPLE_ANSWER},
      {"role": "user", "content": "Great job! You've successfully answered the question. Now, let's move on to "
                                  "the next one.\n" + q}]
  assert ps.feedback(q) == "The answer is incorrect. Please try again. Here's the question: " + q
  # The example answer is right under both of the reference's graders.
  assert grade("gsm8k", ps.example_answer, "#### 17", mode="paper") == 1.0
  assert grade("math", ps.example_answer, "\\boxed{17}", mode="paper") == 1.0


def test_shipped_prompt_sets_restate_the_question_and_never_leak_an_answer():
  q = "25+3*4"
  for name in ("paper", "self_refine", "toy", "brief"):
    ps = get_prompt_set(name)
    assert ps.name == name and ps.source
    assert ps.initial_messages(q)[2]["content"].endswith(q) and q in ps.feedback(q)
    assert "37" not in ps.feedback(q) + ps.initial_messages(q)[2]["content"]
  self_refine = get_prompt_set("self_refine")
  assert "Self-Refine" in self_refine.source and "error" in self_refine.feedback(q)
  assert self_refine.initial_messages(q) == get_prompt_set("paper").initial_messages(q)
  assert get_prompt_set("toy").feedback(q) == "wrong, try again: 25+3*4"
  brief, paper = get_prompt_set("brief"), get_prompt_set("paper")  # the paper's turns after a shorter opening
  assert brief.initial_messages(q)[2] == paper.initial_messages(q)[2] and brief.feedback(q) == paper.feedback(q)
  assert grade("gsm8k", brief.example_answer, "#### 22", mode="paper") == 1.0


def test_toy_prompt_opening_turns_carry_no_problem_or_answer():
  ps = get_prompt_set("toy")
  task = get_task("toy")
  problems = [p for s in ("train", "dev", "test") for p in task.load(s)]
  opening = ps.initial_messages("")[:2]
  assert [m["content"] for m in opening] == ["go", "ok"]
  assert not any(ch.isdigit() for m in opening for ch in m["content"])
  assert ps.problem(problems[0].question) == problems[0].question
  assert grade("toy", ps.feedback(problems[0].question), problems[0].reference, mode="robust") == 0.0


def test_a_prompt_set_is_data(tmp_path):
  spec = {"name": "terse", "description": "d", "source": "s", "instruction": "i", "example_answer": "e",
          "problem": "Q: {question}", "feedback": "No. Q: {question}"}
  path = tmp_path / "terse.json"
  path.write_text(json.dumps(spec))
  ps = get_prompt_set(str(path))
  assert ps.initial_messages("2+2")[2]["content"] == "Q: 2+2" and ps.feedback("2+2") == "No. Q: 2+2"
  bad = dict(spec, feedback="try again")
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"terse\.json: field 'feedback' must contain \{question\}"):
    load_prompt_set(str(path))
  del bad["source"]
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"field 'source' is missing"):
    load_prompt_set(str(path))
  with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
    get_prompt_set("nope")


def test_a_repair_template_holds_the_question_and_the_attempt(tmp_path):
  spec = {"name": "terse", "description": "d", "source": "s", "instruction": "i", "example_answer": "e",
          "problem": "Q: {question}", "feedback": "No. Q: {question}"}
  path = tmp_path / "terse.json"
  path.write_text(json.dumps(spec))
  assert load_prompt_set(str(path)).repair_template is None  # optional
  with pytest.raises(ValueError, match="prompt set 'terse' has no repair template"):
    load_prompt_set(str(path)).repair("1+1", "=3")
  path.write_text(json.dumps(dict(spec, repair="Fix {attempt} of {question}, answer \\boxed{x}")))
  # Both fields substituted once, braces elsewhere kept: neither text is read as a template.
  assert load_prompt_set(str(path)).repair("{attempt}+1", "=3 {question}") == (
      "Fix =3 {question} of {attempt}+1, answer \\boxed{x}")
  for template, missing in (("Fix {attempt}", r"\{question\}"), ("Q: {question}", r"\{attempt\}"),
                            ("Fix it", r"\{question\} and \{attempt\}")):
    path.write_text(json.dumps(dict(spec, repair=template)))
    with pytest.raises(ValueError, match=rf"terse\.json: field 'repair' must contain {missing}$"):
      load_prompt_set(str(path))
  path.write_text(json.dumps(dict(spec, repair=["{question}", "{attempt}"])))
  with pytest.raises(ValueError, match=r"terse\.json: field 'repair' is not a string"):
    load_prompt_set(str(path))


@pytest.mark.parametrize("name", ["paper", "brief", "self_refine"])
def test_the_math_prompt_sets_ask_a_repair_for_the_instructions_answer_format(name):
  ps = get_prompt_set(name)
  text = ps.repair("What is 6*7?", "6*7=48. \\boxed{48}")
  assert "What is 6*7?" in text and "6*7=48. \\boxed{48}" in text
  assert text.endswith("present your final answer as \\boxed{Your Answer}.")
  assert "\\boxed{Your Answer}" in ps.instruction
  assert get_prompt_set("toy").repair_template is None


# ----------------------------------------------------------------------------------------------- jsonl loading
def test_jsonl_errors_name_file_line_and_field(tmp_path):
  path = tmp_path / "gsm.jsonl"
  path.write_text('{"question": "q0", "answer": "#### 1"}\n\n{"question": "q1"}\n')
  with pytest.raises(ValueError, match=r"gsm\.jsonl:3: missing field 'answer'"):
    get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=0).load("test")
  path.write_text('{"question": "q0", "answer": "#### 1"}\n{"question": "q1", "answer": "#### 2"\n')
  with pytest.raises(ValueError, match=r"gsm\.jsonl:2: not valid JSON"):
    base.read_jsonl(str(path), ("question", "answer"))
  path.write_text('{"problem": "p", "solution": 3}\n')
  with pytest.raises(ValueError, match=r"gsm\.jsonl:1: field 'solution' must be a string"):
    base.read_jsonl(str(path), ("problem", "solution"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    get_task("math", test_source=str(tmp_path / "absent.jsonl")).load("test")
  path.write_bytes(b'{"question": "q0", "answer": "#### 1"}\n{"question": "\xff", "answer": "#### 2"}\n')
  with pytest.raises(ValueError, match=r"gsm\.jsonl:2: not valid UTF-8 \(byte 0xff at column 15\)"):
    get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=0).load("test")
  path.write_text("\n")
  with pytest.raises(ValueError, match=r"gsm\.jsonl: holds no records \(an empty task file\)"):
    get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=0).load("test")


def test_problems_without_a_gradable_reference_are_counted_and_excluded(tmp_path, caplog):
  path = tmp_path / "math.jsonl"
  rows = [{"problem": "p0", "solution": "\\boxed{1}"}, {"problem": "p1", "solution": "no box"},
          {"problem": "p2", "solution": "\\fbox{2}"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  task = get_task("math", test_source=str(path))
  assert [p.id for p in task.load("test")] == ["math/test/0", "math/test/2"]
  assert task.excluded["test"] == ["math/test/1"] and "excluded 1 test problem(s)" in caplog.text


def test_dev_split_is_fixed_disjoint_and_keeps_train_ids(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(50)))
  task = get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=10)
  train, dev = task.load("train"), task.load("dev")
  assert len(train) == 40 and len(dev) == 10
  assert {p.id for p in train} | {p.id for p in dev} == {f"gsm8k/train/{i}" for i in range(50)}
  assert all(p.question == f"q{p.id.rsplit('/', 1)[1]}" for p in train + dev)
  again = get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=10)
  assert [p.id for p in again.load("dev")] == [p.id for p in dev]
  expected_dev = sorted(random.Random(base.DEV_SEED).sample(range(50), 10))
  assert [int(p.id.rsplit("/", 1)[1]) for p in dev] == expected_dev
  capped = get_task("gsm8k", train_source=str(path), test_source=str(path), dev_size=10, train_size=5)
  assert [p.id for p in capped.load("train")] == [p.id for p in train[:5]]
  assert [p.id for p in task.load("test")] == [f"gsm8k/test/{i}" for i in range(50)]
  with pytest.raises(ValueError, match="dev_size 60 exceeds"):
    get_task("gsm8k", train_source=str(path), dev_size=60).load("dev")


def test_hub_sources_go_through_datasets(monkeypatch):
  import datasets

  calls = []

  def fake_load_dataset(name, config, split):
    calls.append((name, config, split))
    return [{"problem": f"{config}-{i}", "solution": "\\boxed{1}", "level": "Level 1", "type": config}
            for i in range(2)]

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  problems = get_task("math", dev_size=0).load("train")
  assert [c[1] for c in calls] == ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                                   "number_theory", "prealgebra", "precalculus"]
  assert {c[0] for c in calls} == {"EleutherAI/hendrycks_math"} and {c[2] for c in calls} == {"train"}
  assert len(problems) == 14 and problems[3].id == "math/train/3"
  assert problems[3].meta == {"level": "Level 1", "type": "counting_and_probability"}
  calls.clear()
  monkeypatch.setattr(datasets, "load_dataset",
                      lambda name, config, split: calls.append((name, config, split)) or [{"question": "q"}])
  with pytest.raises(ValueError, match=r"openai/gsm8k:main \(config main, split test\) row 0: missing field 'answer'"):
    get_task("gsm8k").load("test")


def test_real_local_sources(shared_dir):
  data = shared_dir / "data"
  gsm = get_task("gsm8k", train_source=str(data / "gsm8k/train.jsonl"), test_source=str(data / "gsm8k/test.jsonl"),
                 dev_size=200)
  assert (len(gsm.load("train")), len(gsm.load("dev")), len(gsm.load("test"))) == (7273, 200, 1319)
  first = json.loads((data / "gsm8k/test.jsonl").read_text().splitlines()[17])
  p = gsm.load("test")[17]
  assert p.id == "gsm8k/test/17" and (p.question, p.reference) == (first["question"], first["answer"])
  math = get_task("math", test_source=str(data / "math/test.jsonl"))
  problems = math.load("test")
  assert len(problems) == 1000 and problems[0].id == "math/test/0" and set(problems[0].meta) == {"level", "type"}


# ----------------------------------------------------------------------------------------------------- toy
def test_toy_splits_are_disjoint_deterministic_and_sized():
  task = get_task("toy", seed=3, test_size=500, dev_size=100)
  splits = {s: task.load(s) for s in ("train", "dev", "test")}
  assert [len(splits[s]) for s in ("train", "dev", "test")] == [8100 - 600, 100, 500]
  questions = {s: [p.question for p in ps] for s, ps in splits.items()}
  assert sum(len(set(q)) for q in questions.values()) == 8100  # no duplicate anywhere, all of the space used
  again = get_task("toy", seed=3, test_size=500, dev_size=100)
  assert [p.question for p in again.load("test")] == questions["test"]
  assert [p.question for p in get_task("toy", seed=4, test_size=500).load("test")] != questions["test"]
  with pytest.raises(ValueError, match="exceed the 8100 distinct problems"):
    get_task("toy", test_size=8000, dev_size=200)


def test_toy_problems_answers_and_answer_space():
  task = get_task("toy", test_size=2000)
  for p in task.load("test")[:200]:
    a, b, c = (int(x) for x in p.question.replace("*", "+").split("+"))
    assert p.reference == f"{b}*{c}={b * c},{a}+{b * c}={a + b * c}"
    assert task.reference_answer(p.reference) == str(a + b * c)
    assert task.grade(p.reference, p.reference, "paper") == 1.0
    assert len(p.question) <= 6 and len(p.reference) <= 16
  # Answer space by brute force: a + b*c over the documented ranges.
  answers = {a + b * c for a in range(100) for b in range(1, 10) for c in range(1, 10)}
  assert task.answer_space_size() == len(answers) == 180
  assert get_task("toy", max_addend=9, max_factor=3, test_size=20, dev_size=5).answer_space_size() == len(
      {a + b * c for a in range(10) for b in range(1, 4) for c in range(1, 4)})


def test_toy_repair_keeps_a_right_product_and_fixes_the_sum():
  task = get_task("toy", test_size=20, dev_size=5)
  assert task.repair("25+3*4", "3*4=12,25+12=38", "") == "3*4=12,25+12=37"
  assert task.repair("25+3*4", "4*3=12,25+12=36", "") == "4*3=12,25+12=37"  # the product step kept as written
  assert task.repair("25+3*4", " 03*4=12,25+12=36\n", "") == "03*4=12,25+12=37"
  assert task.repair("25+3*4", "3*4=12,52+12=64", "") == "3*4=12,25+12=37"  # a wrong addend is a wrong sum
  assert task.repair("25+3*4", "3*4=12,25+12=37", "") == "3*4=12,25+12=37"  # nothing wrong: kept


def test_toy_repair_fixes_a_wrong_product_and_the_sum_that_follows():
  task = get_task("toy", test_size=20, dev_size=5)
  assert task.repair("25+3*4", "3*4=13,25+13=38", "") == "3*4=12,25+12=37"
  assert task.repair("25+3*4", "3*4=13,25+13=37", "") == "3*4=12,25+12=37"  # a right sum of a wrong product
  assert task.repair("25+7*8", "7*9=63,25+63=88", "") == "7*8=56,25+56=81"  # wrong factors
  assert task.repair("25+3*4", "2*6=12,25+12=38", "") == "3*4=12,25+12=37"  # wrong factors, the right product


def test_toy_repair_of_a_wrong_attempt_is_graded_right():
  task = get_task("toy", test_size=500, dev_size=50)
  rng, wrong = random.Random(0), 0
  for p in rng.sample(task.load("train"), 300):
    a, b, c = p.meta["a"], p.meta["b"], p.meta["c"]
    for _ in range(5):
      x, y = (b, c) if rng.random() < 0.5 else (rng.randint(1, 9), rng.randint(1, 9))
      product = abs(x * y + rng.choice([0, 0, -1, 1, rng.randint(-20, 20)]))
      addend = rng.choice([a, a, rng.randint(0, 99)])
      attempt = f"{x}*{y}={product},{addend}+{product}={abs(addend + product + rng.choice([0, 1, -10]))}"
      if task.grade(attempt, p.reference, "paper") == 1.0:
        continue
      wrong += 1
      fixed = task.repair(p.question, attempt, p.reference)
      assert task.grade(fixed, p.reference, "paper") == 1.0, (p.question, attempt, fixed)
      if sorted((x, y)) == sorted((b, c)) and abs(product) == b * c:
        assert fixed.split(",")[0] == attempt.split(",")[0], (p.question, attempt, fixed)
      else:
        assert fixed == p.reference, (p.question, attempt, fixed)
  assert wrong > 1000


def test_toy_two_products_problems_splits_and_answer_space():
  task = get_task("toy", form="a*b+c*d", test_size=2000, dev_size=200)
  splits = {s: task.load(s) for s in ("train", "dev", "test")}
  assert {s: len(v) for s, v in splits.items()} == {"train": 4361, "dev": 200, "test": 2000}
  questions = [p.question for v in splits.values() for p in v]
  # Train, dev and test partition the whole space 1..9 ^ 4, each problem once.
  assert len(set(questions)) == len(questions) == 6561
  assert set(questions) == {f"{a}*{b}+{c}*{d}" for a, b, c, d in itertools.product(range(1, 10), repeat=4)}
  for p in splits["test"][:200]:
    (a, b), (c, d) = (map(int, t.split("*")) for t in p.question.split("+"))
    assert task.reference_answer(p.reference) == str(a * b + c * d)
    assert task.grade(p.reference, p.reference, "paper") == 1.0
    assert len(p.question) <= 7 and len(p.reference) <= 23
  answers = {a * b + c * d for a, b, c, d in itertools.product(range(1, 10), repeat=4)}
  assert task.answer_space_size() == len(answers) == 132


def test_toy_two_products_repair_keeps_each_right_product():
  task = get_task("toy", form="a*b+c*d", test_size=20, dev_size=5)
  assert task.repair("7*8+6*9", "7*8=56,6*9=45,56+45=101", "") == "7*8=56,6*9=54,56+54=110"
  assert task.repair("7*8+6*9", "7*8=54,6*9=54,54+54=108", "") == "7*8=56,6*9=54,56+54=110"
  assert task.repair("7*8+6*9", "8*7=56,9*6=54,56+54=111", "") == "8*7=56,9*6=54,56+54=110"  # kept as written
  assert task.repair("7*8+6*9", "6*9=54,7*8=56,54+56=110", "") == "7*8=56,6*9=54,56+54=110"  # steps out of order
  assert task.repair("7*8+6*9", "7*8=56,6*9=54,56+54=110", "") == "7*8=56,6*9=54,56+54=110"
  assert task.repair("7*8+6*9", "7*8=56,56+54=110", "") is None  # the one-product shape
  assert get_task("toy", test_size=20, dev_size=5).repair("25+3*4", "3*4=12,1*1=1,12+1=13", "") is None


def test_toy_two_products_repair_of_a_wrong_attempt_is_graded_right():
  task = get_task("toy", form="a*b+c*d", test_size=500, dev_size=50)
  rng, wrong = random.Random(1), 0
  for p in rng.sample(task.load("train"), 300):
    ops = [p.meta[k] for k in "abcd"]
    for _ in range(5):
      steps, values = [], []
      for x, y in (ops[:2], ops[2:]):
        f, g = (x, y) if rng.random() < 0.6 else (rng.randint(1, 9), rng.randint(1, 9))
        values.append(abs(f * g + rng.choice([0, 0, -1, 1, rng.randint(-20, 20)])))
        steps.append((f, g, values[-1]))
      total = abs(sum(values) + rng.choice([0, 1, -10]))
      attempt = ",".join(f"{f}*{g}={v}" for f, g, v in steps) + f",{values[0]}+{values[1]}={total}"
      if task.grade(attempt, p.reference, "paper") == 1.0:
        continue
      wrong += 1
      fixed = task.repair(p.question, attempt, p.reference)
      assert task.grade(fixed, p.reference, "paper") == 1.0, (p.question, attempt, fixed)
      for i, ((f, g, v), (x, y)) in enumerate(zip(steps, (ops[:2], ops[2:]))):
        right = sorted((f, g)) == sorted((x, y)) and v == x * y
        assert fixed.split(",")[i] == (f"{f}*{g}={v}" if right else f"{x}*{y}={x * y}"), (attempt, fixed)
  assert wrong > 1000


def test_toy_form_is_checked():
  with pytest.raises(ValueError, match="unknown form"):
    get_task("toy", form="a*b*c", test_size=20, dev_size=5)


@pytest.mark.parametrize("attempt", ["", "37", "=37", "3*4=12", "3*4=12,25+12=", "3*4=12;25+12=37",
                                     "3*4=12,25+12=37,1+1=2", "x*4=12,25+12=37", "3*4=" + "1" * 5000 + ",25+1=2"])
def test_toy_repair_gives_up_on_an_attempt_not_of_its_shape(attempt):
  assert get_task("toy", test_size=20, dev_size=5).repair("25+3*4", attempt, "3*4=12,25+12=37") is None


def test_only_the_toy_task_repairs():
  for name in ("gsm8k", "math"):
    assert get_task(name, dev_size=0).repair("What is 2+2?", "2+2=5. \\boxed{5}", "#### 4") is None


def test_toy_tokenizer_ids_roundtrip_and_chat_template(tmp_path):
  import transformers

  path = toy_tokenizer.build_toy_tokenizer(tmp_path / "tok")
  assert toy_tokenizer.build_toy_tokenizer(tmp_path / "tok") == path  # idempotent on resume
  hf = transformers.AutoTokenizer.from_pretrained(path)
  specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
  assert hf.convert_tokens_to_ids(specials) == list(range(7))
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
  printable = [chr(c) for c in range(32, 127)] + ["\n"]
  assert hf.convert_tokens_to_ids(printable) == list(range(7, 103)) and len(hf) == 103 <= 128
  text = "next: 25+3*4\n  3*4=12,25+12=37 ~{}"
  ids = hf.encode(text, add_special_tokens=False)
  assert ids == [7 + printable.index(ch) for ch in text]
  assert hf.decode(ids) == text
  assert hf.encode("é", add_special_tokens=False) == [3]
  messages = get_prompt_set("toy").initial_messages("25+3*4") + [{"role": "assistant", "content": "3*4=12,25+12=37"}]
  rendered = hf.apply_chat_template(messages, tokenize=False)
  by_hand = ("<s>" + "".join(f"<|user|>{m['content']}<|end|>" if m["role"] == "user"
                             else f"<|assistant|>{m['content']}</s>" for m in messages))
  assert rendered == by_hand
  assert hf.encode(rendered, add_special_tokens=False)[:2] == [1, 4]


def test_toy_tokenizer_loads_through_rise_jax_chat(tmp_path):
  chat = pytest.importorskip("rise_jax.chat")
  if not hasattr(chat, "load_tokenizer"):
    pytest.skip("rise_jax.chat.load_tokenizer has not landed")
  tok = chat.load_tokenizer(toy_tokenizer.build_toy_tokenizer(tmp_path / "tok"), chat_template="toy")
  assert (tok.bos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 0, 103)
  assert 2 in tok.eos_token_ids
  assert tok.decode(tok.encode("7+8*9")) == "7+8*9"


def test_gsm8k_solution_is_graded_right_by_both_graders_on_every_training_problem(shared_dir):
  """The reference as an answer (boost and reference teacher): the paper grader reads only \\boxed{}, where the
  raw reference ("#### 72") scores -1; the rewritten one scores 1 in both modes, with the annotations gone."""
  from rise_jax.tasks import get_task
  task = get_task("gsm8k", train_source=str(shared_dir / "data" / "gsm8k" / "train.jsonl"), dev_size=0)
  problems = task.load("train")
  assert len(problems) == 7473
  for p in problems:
    text = task.solution(p)
    # The paper grader's gold regex stops at a thousands separator ("#### 1,080" reads 1): never matchable.
    unmatchable = "," in p.reference.rsplit("####", 1)[1]
    assert task.grade(text, p.reference, "paper") == (0.0 if unmatchable else 1.0), (p.id, text)
    assert task.grade(text, p.reference, "robust") == 1.0, (p.id, text)
    assert "<<" not in text and "####" not in text
  assert task.grade(problems[0].reference, problems[0].reference, "paper") == -1.0
  assert task.solution(problems[0]).endswith("clips altogether in April and May.\nThe answer is \\boxed{72}.")


def test_toy_column_sum_is_the_grade_school_addition_of_the_products():
  task = get_task("toy", form="a*b+c*d/columns", max_factor=12, test_size=2000, dev_size=200)
  plain = get_task("toy", form="a*b+c*d", max_factor=12, test_size=2000, dev_size=200)
  assert [p.question for p in task.load("test")] == [p.question for p in plain.load("test")]  # the same problems
  for p in task.load("train")[:3000] + task.load("test"):
    (a, b), (c, d) = (map(int, t.split("*")) for t in p.question.split("+"))
    x, y = a * b, c * d
    first, second, *columns, total = p.reference.split(",")
    assert (first, second, total) == (f"{a}*{b}={x}", f"{c}*{d}={y}", f"{x}+{y}={x + y}")
    # Column i adds the i-th digits from the right (0 past a number's end) and the carry out of column i-1.
    width = max(len(str(x)), len(str(y)))
    dx, dy = str(x).zfill(width)[::-1], str(y).zfill(width)[::-1]
    carry, written = 0, ""
    assert len(columns) == width, p.reference
    for i, step in enumerate(columns):
      terms, value = step.split("=")
      assert terms == "+".join([dx[i], dy[i], *([str(carry)] if carry else [])]), (p.reference, step)
      assert int(value) == int(dx[i]) + int(dy[i]) + carry
      written = str(int(value) % 10) + written
      carry = int(value) // 10
    assert int((str(carry) if carry else "") + written) == x + y
    assert task.grade(p.reference, p.reference, "paper") == 1.0
    assert task.reference_answer(p.reference) == str(x + y)
  assert max(len(p.reference) for p in task.load("train")) <= 52
  assert task.answer_space_size() == plain.answer_space_size() == 239


def test_toy_column_sum_repair_keeps_right_products_and_rewrites_the_columns():
  task = get_task("toy", form="a*b+c*d/columns", test_size=20, dev_size=5)
  right = "7*8=56,6*9=54,6+4=10,5+5+1=11,56+54=110"
  assert task.repair("7*8+6*9", "7*8=56,6*9=54,6+4=10,5+5+1=12,56+54=120", "") == right  # a column slip
  assert task.repair("7*8+6*9", "8*7=56,6*9=45,6+5=11,5+4+1=10,56+45=101", "") == \
      "8*7=56,6*9=54,6+4=10,5+5+1=11,56+54=110"  # a right product kept as written, the wrong one recomputed
  assert task.repair("7*8+6*9", "7*8=56,6*9=54,56+54=111", "") is None  # the sum without its columns
  assert get_task("toy", form="a*b+c*d", test_size=20, dev_size=5).repair(
      "7*8+6*9", "7*8=56,6*9=54,6+4=10,5+5+1=12,56+54=120", "") is None
