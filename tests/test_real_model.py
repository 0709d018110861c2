"""Real weights, against transformers on the same directory: SmolLM2-135M-Instruct (tests/fixtures_real.py).

What a researcher asks first — "does it run my checkpoint, exactly?" — on a real pretrained chat model with a
byte-level BPE vocabulary, a ChatML template rise_jax does not ship, and tied embeddings:
- bfloat16 logits as close to transformers' float32 as transformers' own bfloat16 is (float32 is tests/test_gguf.py);
- greedy generation through the engine token-identical to `transformers.generate` on real GSM8K and MATH prompts;
- the checkpoint's own template: RISE episodes render to `apply_chat_template`'s ids, and the loss mask is the reply;
- one training step's weighted loss equal to transformers' cross-entropy with the same masks and weights;
- the trained model's HF export reloads in transformers with equal logits, and in rise_jax with the same template;
- the paper path on the real model: configs/gsm8k_smollm2_self.py and experiments/real_model.py shrunk to a smoke.
Prompts and tokens are short (the CPU pays for 30 layers); the model is never shrunk.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rise_jax import chat
from rise_jax.models import load_hf_checkpoint

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW_TOKENS = 24
SHORT_ANSWER = "What is the capital of France? Answer in one word."
TAU = 0.4


def _questions(shared_dir, task: str, n: int) -> list[str]:
  path = shared_dir / "data" / task / "test.jsonl"
  field = "question" if task == "gsm8k" else "problem"
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line, _ in zip(f, range(40))]
  # The shortest of the first rows: real problems, at a CPU's price.
  return sorted((r[field] for r in rows), key=len)[:n]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
  return chat.load_tokenizer(smollm2_dir)  # "auto": the checkpoint's own ChatML template


@pytest.fixture(scope="module")
def model(smollm2_dir):
  return load_hf_checkpoint(smollm2_dir, dtype="float32", scan_layers=True)


def _torch_logits(ref, ids: list[int]) -> np.ndarray:
  with torch.no_grad():
    return ref(torch.tensor([ids])).logits[0].float().numpy()


def test_the_checkpoint_template_is_its_own_chatml(tok, smollm2_dir):
  assert not tok.template.marked and "<|im_start|>" in tok.template.source
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>") == 2
  assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] in (2, [2])


def test_bf16_logits_within_transformers_own_bf16_error(smollm2_dir, smollm2_torch, tok, shared_dir):
  """bfloat16 parameters and compute against transformers' float32, bounded by transformers' own bfloat16 error."""
  ids = chat.render(tok, [{"role": "user", "content": _questions(shared_dir, "gsm8k", 1)[0]}], True).ids
  ref = _torch_logits(smollm2_torch, ids)
  bf16 = load_hf_checkpoint(smollm2_dir, dtype="bfloat16", scan_layers=True)
  ours = np.asarray(bf16(jnp.asarray([ids]), attention_mask=jnp.ones((1, len(ids)), bool)), np.float32)[0]
  import copy
  ref_bf16 = copy.deepcopy(smollm2_torch).to(torch.bfloat16)
  theirs = _torch_logits(ref_bf16, ids)
  scale = np.abs(ref).max()
  ours_err, theirs_err = np.abs(ours - ref).max() / scale, np.abs(theirs - ref).max() / scale
  print(f"bf16 max |diff| / max |ref|: rise_jax {ours_err:.4f}, transformers {theirs_err:.4f}")
  assert ours_err <= 1.5 * theirs_err
  assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= np.mean(theirs.argmax(-1) == ref.argmax(-1)) - 0.05


@pytest.fixture(scope="module")
def greedy_reference(smollm2_torch, tok, shared_dir):
  """Prompt ids -> transformers' greedy continuation (stop token kept), for 2 GSM8K and 2 MATH problems and a
  question the model answers within the budget (so its <|im_end|> must stop every generator there)."""
  out = {}
  questions = _questions(shared_dir, "gsm8k", 2) + _questions(shared_dir, "math", 2) + [SHORT_ANSWER]
  for q in questions:
    ids = chat.render(tok, [{"role": "user", "content": q}], add_generation_prompt=True).ids
    with torch.no_grad():
      gen = smollm2_torch.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
    out[tuple(ids)] = gen[0, len(ids):].tolist()
  # transformers stops on its generation_config's eos, independently of rise_jax's stop rules.
  assert list(out.values())[-1][-1] == tok.token_to_id("<|im_end|>")  # "The capital of France is Paris.<|im_end|>"
  return out


def test_greedy_engine_equals_transformers_generate(model, tok, greedy_reference):
  """Through the engine's default stop ids (the tokenizer's end-of-turn token and generation_config.json's)."""
  from rise_jax.sampling.engine import Engine
  from rise_jax.sampling.requests import Request, default_stop_ids
  engine = Engine(model, slots=4, max_seq_len=512)
  prompts = [list(p) for p in greedy_reference]
  stops = default_stop_ids(model.config, tok)
  outs = engine.run([Request(p, uid=i, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=stops)
                     for i, p in enumerate(prompts)])
  for prompt, out in zip(prompts, outs):
    assert list(out[0].token_ids) == greedy_reference[tuple(prompt)], tok.decode(prompt[-30:])
  assert outs[-1][0].finish_reason == "stop"  # the short answer ends on its <|im_end|>


def _episode(question: str, attempts: list[str], system: str | None, prompt_set: str = "paper"):
  from rise_jax.tasks.prompts import get_prompt_set
  ps = get_prompt_set(prompt_set)
  messages = ([{"role": "system", "content": system}] if system else []) + ps.initial_messages(question)
  for i, attempt in enumerate(attempts):
    if i:
      messages.append({"role": "user", "content": ps.feedback(question)})
    messages.append({"role": "assistant", "content": attempt})
  return messages


@pytest.mark.parametrize("system", [None, "You are a careful math tutor."])
def test_rise_episodes_render_to_apply_chat_template_ids(tok, smollm2_dir, shared_dir, system):
  """Paper prompt set, three attempts, with and without a system message (the template's default system turn
  otherwise), the full history and the W = 2 window; every prompt state and the whole episode."""
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
  q = _questions(shared_dir, "gsm8k", 1)[0]
  attempts = ["Step 1: 3 + 4 = 7. The answer is \\boxed{7}.", "Let me redo it: \\boxed{12}.", "\\boxed{5}"]
  full = _episode(q, attempts, system)
  for messages in (full, chat.window(full, 2)):
    rendered = chat.render(tok, messages)
    assert rendered.ids == list(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    for end in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
      prompt = chat.render(tok, messages[:end], add_generation_prompt=True).ids
      assert prompt == list(hf.apply_chat_template(messages[:end], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
      assert rendered.ids[:len(prompt)] == prompt  # the prefix property a continued conversation relies on
    _, targets, mask = chat.train_arrays(tok, messages)
    assert tok.decode(targets[mask == 1]) == attempts[-1] + "<|im_end|>"


def _records(question: str, prompt_set: str):
  """Two RISE records with the paper's weights: a failed first attempt (r = 0) and its corrected retry (r = 1)."""
  wrong = _episode(question, ["\\boxed{3}"], None, prompt_set)
  right = _episode(question, ["\\boxed{3}", "2 * 3 = 6. The answer is \\boxed{6}."], None, prompt_set)
  return [{"id": "a", "weight": math.exp(0 / TAU), "messages": wrong},
          {"id": "b", "weight": math.exp(1 / TAU), "messages": right}]


@pytest.fixture(scope="module")
def one_step(model, tok):
  """One optimiser step of the trainer on two weighted records (brief opening: short sequences), before/after."""
  import types
  from rise_jax import sharding
  from rise_jax.train import data as data_lib, optim, trainer as trainer_lib
  records = _records("What is 2 * 3?", "brief")
  examples, report = data_lib.encode_records(data_lib.as_records(records), tok, max_length=256)
  assert report.kept == 2
  steps = data_lib.plan([e.length for e in examples], epochs=1, seed=0, global_batch=2, micro_batch=2,
                        row_multiple=1, max_length=256, packing=False)
  cfg = types.SimpleNamespace(lr=1e-4, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, b1=0.9, b2=0.999,
                              eps=1e-8)
  tx, lr = optim.optimizer(cfg, 1)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(model, mesh, tx, lr)
  state = trainer.initial_state(model, seed=0)
  with jax.set_mesh(mesh):
    batch, stats = trainer.batch(steps[0], examples, "sample_mean")
    _, loss, _ = trainer.loss_and_grads(state.params, batch, jnp.float32(stats.normalizer))
    state, _ = trainer.step(state, batch, jnp.float32(stats.normalizer))
  return records, float(loss), trainer.model(state)


def test_training_step_loss_equals_transformers_cross_entropy(one_step, smollm2_torch, tok):
  """sample_mean: sum_e w_e * mean of the trained tokens' NLL / #examples, from transformers' logits; the trained
  tokens are each record's trained reply and its <|im_end|>, decoded."""
  records, loss, _ = one_step
  terms = []
  for r in records:
    inputs, targets, mask = chat.train_arrays(tok, r["messages"])
    assert tok.decode(targets[mask == 1]) == r["messages"][-1]["content"] + "<|im_end|>"  # the last reply
    with torch.no_grad():
      logp = torch.log_softmax(smollm2_torch(torch.tensor([inputs.tolist()])).logits[0].double(), -1)
    nll = -logp[torch.arange(len(targets)), torch.tensor(targets.tolist())].numpy()
    terms.append(r["weight"] * nll[mask == 1].mean())
  reference = sum(terms) / len(records)
  print(f"loss rise_jax {loss:.8f} transformers {reference:.8f}")
  assert loss == pytest.approx(reference, rel=1e-5)


def test_trained_export_reloads_in_transformers_and_rise_jax(one_step, tok, tmp_path, smollm2_torch):
  from transformers import LlamaForCausalLM
  from rise_jax.models import save_hf_checkpoint
  _, _, trained = one_step
  out = save_hf_checkpoint(trained, tmp_path / "hf", tokenizer=tok)
  reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert reloaded.config.tie_word_embeddings
  ids = chat.render(tok, [{"role": "user", "content": "What is 2 * 3?"}], add_generation_prompt=True).ids
  ours = np.asarray(trained(jnp.asarray([ids]), attention_mask=jnp.ones((1, len(ids)), bool)))[0]
  theirs = _torch_logits(reloaded, ids)
  assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
  assert np.abs(theirs - _torch_logits(smollm2_torch, ids)).max() > 1e-4  # training moved the weights
  again = chat.load_tokenizer(out)  # the checkpoint template survives the export
  assert again.template.source == tok.template.source and again.eos_token_ids == tok.eos_token_ids


def _smoke_env(cache: pathlib.Path) -> dict:
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), XLA_FLAGS="", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_real")  # the second smoke reuses the first one's compiled programs


@pytest.mark.timeout(1200)
def test_paper_self_distillation_config_runs_on_the_real_model(smollm2_gguf, shared_dir, tmp_path, compile_cache):
  """configs/gsm8k_smollm2_self.py shrunk by its docstring's smoke overrides, on the .gguf file itself: collect
  (best-of-2), the paper weights, training, the single-turn control, the HF export, evaluation."""
  out = tmp_path / "run"
  smoke = ["model.dtype=float32", "task.train_size=2", "task.test_size=2", "task.dev_size=2", "task.prompt_set=brief",
           "sampling.max_new_tokens=8", "sampling.max_cache_length=1024", "sampling.slots=8",
           "collect.improvement_samples=2", "train.global_batch=2", "train.micro_batch=2", "train.max_length=1024",
           "eval.turns=2", "eval.parallel_k=2"]
  doc = (REPO / "configs" / "gsm8k_smollm2_self.py").read_text()
  assert all(f"--config.{o.split('=')[0]}=" in doc for o in smoke if not o.startswith("task.prompt_set"))
  cmd = [sys.executable, "-m", "rise_jax.run", "--config=configs/gsm8k_smollm2_self.py",
         f"--config.model.hf_path={smollm2_gguf}", f"--config.output_dir={out}",
         f"--config.task.train_source={shared_dir / 'data/gsm8k/train.jsonl'}",
         f"--config.task.test_source={shared_dir / 'data/gsm8k/test.jsonl'}", *(f"--config.{o}" for o in smoke)]
  proc = subprocess.run(cmd, cwd=REPO, env=_smoke_env(compile_cache), capture_output=True, text=True, timeout=1150)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  for stage in ("iter_0/eval", "iter_1/collect", "iter_1/train", "iter_1/control/train", "iter_1/eval",
                "iter_1/control/eval"):
    assert (out / stage / "DONE").is_file(), stage
  collected = [json.loads(line) for line in (out / "iter_1/collect/rollouts.jsonl").read_text().splitlines()[1:]]
  assert len(collected) == 2 and all(len(r["turns"][-1]["candidates"]) == 2 for r in collected if len(r["turns"]) == 2)
  sft = [json.loads(line) for line in (out / "iter_1/collect/data/sft.jsonl").read_text().splitlines()]
  assert sft and all(rec["weight"] == pytest.approx(math.exp(rec["meta"]["reward"] / TAU)) for rec in sft)
  # The trained export carries the checkpoint's own template (no named template was ever involved).
  exported = chat.load_tokenizer(out / "iter_1/train/hf")
  assert not exported.template.marked and "<|im_start|>" in exported.template.source


@pytest.mark.timeout(1500)
def test_real_model_experiment_smoke(smollm2_gguf, tmp_path, compile_cache):
  """experiments/real_model.py --smoke: boost on reference solutions, two iterations with their controls,
  evaluation, and the tables it prints."""
  out = tmp_path / "real"
  proc = subprocess.run([sys.executable, "experiments/real_model.py", "--smoke", f"--out={out}",
                         f"--gguf={smollm2_gguf}"], cwd=REPO, env=_smoke_env(compile_cache), capture_output=True,
                        text=True, timeout=1450)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  for stage in ("iter_0/train", "iter_0/eval", "iter_1/train", "iter_1/control/train", "iter_2/train",
                "iter_2/control/train", "iter_2/eval", "iter_2/control/eval"):
    assert (out / stage / "DONE").is_file(), stage
  boost = [json.loads(line) for line in (out / "iter_0/collect/data/sft.jsonl").read_text().splitlines()]
  assert all("\\boxed{" in r["messages"][-1]["content"] and "####" not in r["messages"][-1]["content"] for r in boost)
  tables = (out / "tables.md").read_text()
  assert "| boost (reference solutions) |" in tables and "t2 right after a wrong t1" in tables
  assert tables in proc.stdout
