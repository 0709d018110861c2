"""`python -m rise_jax.run` on the paper's real-scale configs, shrunk by command-line overrides only.

The code path of a real run: a Hugging Face checkpoint directory (a tiny random Llama written here, with the Llama 2
vocabulary's 32,000 rows), the Llama 2 SentencePiece tokenizer and real GSM8K / MATH rows from ../shared, the paper
prompt set and grader, best-of-N collection, reward-weighted training, the HF export and evaluation. What is
checked comes from outside rise_jax where it can: the data rows read here, SentencePiece's own decoding, the
paper's exp(r / tau) weights, transformers' reading of the export.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fixtures_models import save_tiny_llama

REPO = pathlib.Path(__file__).resolve().parents[1]
# config, chat template (the Llama 2 vocabulary has no Llama 3 header tokens), train rows, test rows.
CASES = {
    "gsm8k": ("configs/gsm8k_llama3_self.py", "llama2", "gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    # Only MATH's test split is on hand: its first rows stand in for the training problems.
    "math": ("configs/math_mistral_self.py", "mistral", "math/test.jsonl", "math/test.jsonl"),
}
TRAIN_SIZE, TEST_SIZE, BEST_OF, TAU = 4, 3, 2, 0.4
STAGES = ["iter_0/eval", "iter_1/collect", "iter_1/train", "iter_1/eval"]


@pytest.fixture(scope="module")
def llama2_vocab_checkpoint(tmp_path_factory):
  return save_tiny_llama(tmp_path_factory.mktemp("ckpt_llama2_vocab"), vocab_size=32000,
                         max_position_embeddings=2048)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")  # the second config reuses the first one's compiled programs


def _rows(path: pathlib.Path, n: int) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(next(f)) for _ in range(n)]


def _records(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()[1:]]  # line 1 is the log's header


@pytest.mark.timeout(900)  # ~60 s on an idle 2-core machine; far more when it is shared
@pytest.mark.parametrize("case", list(CASES))
def test_paper_config_end_to_end(case, tmp_path, shared_dir, llama2_tokenizer_model, llama2_vocab_checkpoint,
                                 compile_cache):
  config, template, train_rows, test_rows = CASES[case]
  out = tmp_path / "run"
  overrides = {
      "model.hf_path": llama2_vocab_checkpoint, "model.dtype": "float32", "model.attention": "xla",
      "tokenizer.path": llama2_tokenizer_model.parent, "tokenizer.chat_template": template,
      "task.train_source": shared_dir / "data" / train_rows, "task.test_source": shared_dir / "data" / test_rows,
      "task.train_size": TRAIN_SIZE, "task.test_size": TEST_SIZE, "task.dev_size": 2,
      "sampling.max_new_tokens": 8, "sampling.max_cache_length": 1024, "sampling.batch_size": 4,
      "collect.improvement_samples": BEST_OF, "train.global_batch": 4, "train.micro_batch": 2,
      "train.max_length": 1024, "eval.turns": 2, "eval.parallel_k": 2, "mesh.train": "(1,1,1)",
      "mesh.sample": "(1,1,1)", "output_dir": out}
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "rise_jax.run", f"--config={config}",
         *(f"--config.{k}={v}" for k, v in overrides.items())]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  for stage in STAGES:
    assert (out / stage / "DONE").is_file(), stage

  # Real rows: problem i of a split is line i of its file (the dev rows are carved out of train). Records come in
  # the order episodes finish (contracts §3), so they are matched by id.
  test = _rows(shared_dir / "data" / test_rows, TEST_SIZE)
  question = "question" if case == "gsm8k" else "problem"
  index = lambda record: int(record["problem_id"].rsplit("/", 1)[1])  # noqa: E731
  evaluated = sorted(_records(out / "iter_1/eval/rollouts.jsonl"), key=index)
  assert [r["question"] for r in evaluated] == [row[question] for row in test]

  # Best-of-N at the improvement turn, the paper's retry message, SentencePiece's own decoding of every sample.
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
  collected = _records(out / "iter_1/collect/rollouts.jsonl")
  assert len(collected) == TRAIN_SIZE
  train = _rows(shared_dir / "data" / train_rows, 1 + max(int(r["problem_id"].rsplit("/", 1)[1]) for r in collected))
  assert all(r["question"] == train[int(r["problem_id"].rsplit("/", 1)[1])][question] for r in collected)
  for r in collected:
    first, last = r["turns"]
    assert len(first["candidates"]) == 1 and len(last["candidates"]) == BEST_OF
    assert first["feedback"].startswith("The answer is incorrect. Please try again.")
    for c in first["candidates"] + last["candidates"]:
      assert c["text"] == sp.decode(c["token_ids"]).strip() or c["text"] == sp.decode(c["token_ids"])
      assert c["reward"] in (-1.0, 0.0, 1.0)

  # Training records weighted exp(r / tau) (paper, Eq. 4), then trained on.
  sft = [json.loads(line) for line in (out / "iter_1/collect/data/sft.jsonl").read_text().splitlines()]
  assert len(sft) == 2 * TRAIN_SIZE  # every turn of every episode (criteria "all")
  for rec in sft:
    assert rec["weight"] == pytest.approx(math.exp(rec["meta"]["reward"] / TAU))
  steps = [json.loads(line) for line in (out / "iter_1/train/metrics.jsonl").read_text().splitlines()]
  assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)

  # The HF export: transformers reads it; same tensors as the starting checkpoint, moved by training.
  import transformers
  from safetensors.numpy import load_file
  hf = out / "iter_1/train/hf"
  assert transformers.AutoConfig.from_pretrained(hf).vocab_size == 32000
  assert (hf / "tokenizer.model").read_bytes() == llama2_tokenizer_model.read_bytes()
  before, after = load_file(llama2_vocab_checkpoint / "model.safetensors"), load_file(hf / "model.safetensors")
  assert sorted(before) == sorted(after)
  assert all(before[k].shape == after[k].shape for k in before)
  assert any(not np.array_equal(before[k], after[k]) for k in before)

  metrics = json.loads((out / "iter_1/eval/metrics.json").read_text())
  assert metrics["num_problems"] == TEST_SIZE and metrics["grader"] == "paper" and metrics["turns"] == 2
  solved = np.mean([r["turns"][0]["candidates"][0]["reward"] == 1.0 for r in evaluated])
  assert metrics["p1@t1"] == pytest.approx(solved)
