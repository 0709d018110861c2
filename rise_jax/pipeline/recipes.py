"""Config builders shared by the files in `configs/`: the paper's real-scale recipe and the toy recipe.

Config files are loaded by path (`--config=configs/x.py`) and cannot import each other, so the common parts live
here and each file states only what makes its experiment different. Every builder returns an unlocked tree; the
file calls `rise_jax.config.finalize` last.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rise_jax.config import base_config
from rise_jax.models.configs import get_preset


def paper(*, name: str, preset: str, task: str, improvement: str, iterations: int = 1, boost: bool = False,
          improvement_samples: int | None = None) -> ml_collections.ConfigDict:
  """The reference's recipe (cmu-mind/RISE bash/*.sh and the paper's appendix) at 7B scale.

  Collection: K = 2 turns, one learner sample at turn 1; the improvement turn is 5 GPT-3.5 samples
  (distillation, `--num_of_samples 1 5` in bash/gen.sh) or best-of-16 from the learner (self-distillation).
  Training: lr 1e-5, cosine, warmup 4%, no weight decay, effective batch 64, max length 2048, tau 0.4,
  criteria all with duplicates removed. Evaluation: 5 turns, window 2 (bash/eval_sequential.sh), m5@t1 beside.
  Parameters stay float32 (the reference's DeepSpeed run kept fp32 master weights); compute is bfloat16.
  """
  c = base_config()
  c.name = name
  c.output_dir = f"runs/{name}"
  p = get_preset(preset)
  c.model.source = "hf"
  c.model.hf_path = p.hf_repo     # a hub id or a local directory holding the same checkpoint
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.tokenizer.chat_template = p.chat_template
  c.task.name = task
  c.task.prompt_set = "paper"
  c.task.grader = "paper"
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.max_new_tokens = 1000
  c.sampling.max_cache_length = 4096
  c.collect.turns = 2
  c.collect.samples_per_turn = 1
  c.collect.improvement = improvement
  if improvement == "teacher":
    c.collect.teacher.kind = "openai"
    c.collect.teacher.base_url = "https://api.openai.com/v1"
    c.collect.teacher.model = "gpt-3.5-turbo"
    c.collect.improvement_samples = improvement_samples or 5
  else:
    c.collect.improvement_samples = improvement_samples or 16
  c.collect.criteria = "all"
  c.collect.dedupe = True
  c.collect.tau = 0.4
  c.train.lr = 1e-5
  c.train.warmup_ratio = 0.04
  c.train.weight_decay = 0.0
  c.train.global_batch = 64
  c.train.max_length = 2048
  c.train.epochs = 1
  c.eval.turns = 5
  c.eval.parallel_k = 5
  c.eval.window = 2
  c.rise.iterations = iterations
  c.rise.boost = boost
  c.rise.init_from = "previous"
  c.rise.data = "current"
  return c


def tpu_v4_32(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """16 chips: FSDP over all of them for training (one 2048-token row per chip per micro-step); sampling splits
  heads 4 ways and batches over 4 data replicas."""
  c.mesh.train = (1, 16, 1)
  c.mesh.sample = (4, 1, 4)
  c.train.micro_batch = 16
  c.sampling.batch_size = 32
  return c


def gpu_8x80(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One 8-GPU node: FSDP over 8 for training, tensor 2 x data 4 for sampling."""
  c.mesh.train = (1, 8, 1)
  c.mesh.sample = (4, 1, 2)
  c.train.micro_batch = 8
  c.sampling.batch_size = 32
  return c


def smollm2_self() -> ml_collections.ConfigDict:
  """The paper's self-distillation recipe on GSM8K with SmolLM2-135M-Instruct, sized for one 80 GB GPU.

  The checkpoint's own ChatML template ("auto"), the paper prompts and grader, K = 2 with best-of-16 from the
  learner at turn 2, criteria all, exp(r / 0.4), one iteration beside its single-turn control. The engine's prefix
  cache holds the paper prompt's 400-token worked example once for every problem; 256 slots keep one GPU busy.
  135M parameters need no sharding: one device for both meshes.
  """
  c = paper(name="gsm8k_smollm2_self", preset="smollm2-135m-instruct", task="gsm8k", improvement="self")
  # model.hf_path: the hub id stands for a local directory holding the checkpoint, or pass the .gguf file
  c.model.scan_layers = True
  c.model.remat = "none"          # 135M parameters: activations fit without recomputation
  c.mesh.train = (1, 1, 1)
  c.mesh.sample = (1, 1, 1)
  c.sampling.slots = 256
  c.sampling.batch_size = 256
  c.train.micro_batch = 16
  c.rise.single_turn_control = True
  return c


def smollm2_rise() -> ml_collections.ConfigDict:
  """The real-model RISE experiment for one H100 in <= 8 minutes (experiments/real_model.py): SmolLM2-135M-Instruct
  on GSM8K.

  The shipped model never writes the paper grader's \\boxed{} answer (docs/real_model.md), so, as the paper's boost,
  it is first fine-tuned on reference solutions (`Task.solution`: GSM8K's worked answers ending in \\boxed{N}).
  Iteration 1 is distillation from those references after one wrong attempt (the teacher the boosted model lacks);
  iteration 2 is self-distillation, best-of-4 at turn 2, collected without an oracle (the failure message follows
  right answers too, so the data shows a right answer kept: docs/toy.md's finding). Each iteration has its
  single-turn control. The boost, iteration 2 and control 2 are evaluated on 250 test problems over 5 turns
  (window 2, p1@t5 from the same log) and with 5 parallel samples.
  """
  c = smollm2_self()
  c.name = "gsm8k_smollm2_rise"
  c.output_dir = "runs/gsm8k_smollm2_rise"
  c.task.train_size = 512               # problems each iteration collects on
  c.task.test_size = 250
  c.sampling.max_new_tokens = 384       # GSM8K's worked answers are 50-200 tokens; the boost imitates them
  c.sampling.max_cache_length = 2048    # the 5-turn window-2 prompt (~1,400 tokens) + 384 new
  c.collect.improvement_samples = 4
  c.train.max_length = 2048
  c.rise.iterations = 2
  c.rise.boost = True
  c.rise.boost_data = "reference"
  c.rise.boost_size = 2000
  c.rise.boost_epochs = 2
  c.rise.boost_lr = 5e-5
  c.rise.evaluate = "final"
  c.rise.iteration_overrides = (
      "1:collect.improvement='teacher'", "1:collect.teacher.kind='reference'",
      "2:collect.oracle=False", "2:collect.dedupe=False")
  return c


def toy() -> ml_collections.ConfigDict:
  """The embedded default experiment (docs/toy.md): a char-level Llama trained from scratch on `a+b*c`.

  Boost = single-turn SFT on the task's worked answers (the model has never seen a history). RISE iteration 1 is
  distillation with the reference solutions as the teacher: the boosted model cannot read a history yet, so its
  attempts are drawn as independent first-turn samples (collect.window = 1) and, after up to K-1 = 3 wrong ones,
  the reference answers turn K. Iterations 2 and 3 are self-distillation (best-of-4 at turn 2, full history,
  collected without an oracle). Each iteration has its single-turn control (the same data, history stripped).
  The boost and iteration 3 (and its control) are evaluated on 2,000 test problems, 5 turns without oracle
  (p1@t5 read from the same log) and 5 parallel samples.
  """
  c = base_config()
  c.name = "toy"
  c.output_dir = "runs/toy"
  c.model.source = "preset"
  c.model.preset = "toy-llama"
  c.tokenizer.chat_template = "toy"      # tokenizer.path None: the run builds the toy tokenizer in its directory
  c.mesh.train = (1, -1, 1)
  c.mesh.sample = (-1, 1, 1)
  c.task.name = "toy"
  c.task.prompt_set = "toy"
  c.task.grader = "robust"
  c.task.dev_size = 200
  c.task.test_size = 2000
  c.task.train_size = None               # each iteration collects on all 5,900 training problems
  c.sampling.temperature = 1.0
  c.sampling.max_new_tokens = 20         # a worked answer is at most 16 characters + end of turn
  c.sampling.max_cache_length = 256      # the turn-5 prompt of 20-token attempts (210 tokens) + 20 new (docs/toy.md)
  c.sampling.batch_size = 2000           # episodes in flight: the whole test set queued at once
  c.sampling.slots = 512                 # 20-token replies: wide chunks amortise the per-chunk host work on a CPU
  c.sampling.chunk_steps = 16           # most of a 20-token reply in one chunk: half the chunk programs of 8 (cold start)
  # The 512 slots at full length (8,194 blocks) plus a prefix cache for the 2,000 conversations in flight (~5 blocks
  # each): with the default pool alone the cache evicts a conversation's last prompt before its next turn, and
  # an evaluation prefilled 2.2x the tokens (benchmarks/generator_vs_commit.py, toy_eval). 330 MB of KV.
  c.sampling.num_blocks = 20_000
  c.collect.turns = 2
  c.collect.samples_per_turn = 1
  c.collect.improvement = "self"
  c.collect.improvement_samples = 8
  c.collect.criteria = "all"
  c.collect.tau = 0.4
  c.train.lr = 3e-4                      # RISE / control fine-tuning of the boosted model
  c.train.warmup_ratio = 0.05
  c.train.b2 = 0.98                      # from-scratch training of a tiny model: a shorter second-moment memory
  c.train.epochs = 1
  c.train.global_batch = 16              # per example seen, batch 16 learned fastest from scratch (docs/toy.md)
  c.train.micro_batch = 16
  c.train.max_length = 256
  # Examples are 28-34 tokens (boost) and up to 166 (a 4-turn history): powers of two would pad 69% of the
  # tokens (33 -> 64, 166 -> 256); 4 lengths per octave pad ~15% for a few more compiled steps (docs/toy.md).
  c.train.buckets_per_octave = 4
  # Toy steps alternate padded lengths (32/64 for the boost, up to 256 for RISE data), so multi-step calls would
  # compile up to log2(K) + 1 programs per length for a ~10-20% per-step gain (docs/benchmarks.md, training loop).
  c.train.steps_per_call = 1
  c.train.ckpt_every = 10_000            # the toy stages take seconds; the final checkpoint is always written
  c.train.log_every = 200
  c.eval.turns = 5
  c.eval.parallel_k = 5
  # Algorithm 2's sliding window: the iterations train on one earlier attempt (K = 2), so turns 3-5 show the
  # question and the latest attempt only. With the full history the model is off its training distribution there
  # and abandons right answers (dev, seeds 0-2: p1@t5 - m1@t1 5.8 -> 7.8, m1@t5 - m5@t1 -2.8 -> -0.8; docs/toy.md).
  c.eval.window = 2
  c.rise.iterations = 3
  # Iteration 1 is distillation from the reference solutions, as the paper distils from GPT-3.5: the boosted
  # model cannot read a history, so its attempts are independent first-turn samples (window 1) and, after up to
  # three wrong ones, the reference answers turn 4. Filtering (criteria success) keeps only correct targets, at
  # lr 1e-3 for 2 epochs. Iterations 2 and 3 are the paper's self-distillation (best-of-4 at turn 2, criteria all,
  # exp(r/0.4)) collected without an oracle: the failure message also follows right answers, as at test time, so
  # the data shows a right answer kept (dedupe off: the kept answer repeats). With an oracle, a right answer
  # survived the message 54-60% of the time and a retry was worse than a fresh sample (docs/toy.md). Best-of-4,
  # not 8: without an oracle every problem reaches turn 2, and best-of-8 put the run at 428 s (budget 420 s).
  c.rise.iteration_overrides = (
      "1:collect.improvement='teacher'", "1:collect.teacher.kind='reference'", "1:collect.window=1",
      "1:collect.turns=4", "1:collect.criteria='success'", "1:train.epochs=2", "1:train.lr=1e-3",
      "2:collect.oracle=False", "2:collect.dedupe=False", "2:collect.improvement_samples=4",
      "3:collect.oracle=False", "3:collect.dedupe=False", "3:collect.improvement_samples=4")
  # The boost and the final iteration (and its control) are evaluated inside the time budget; the intermediate
  # models are evaluated by experiments/toy_seeds.py after the run.
  c.rise.evaluate = "final"
  c.rise.boost = True
  c.rise.boost_data = "reference"
  c.rise.boost_lr = 2e-3
  c.rise.boost_epochs = 12
  # The boost learns the task abruptly (dev m1@t1 13-18% after 4-6 epochs, 98% after 12): it stops at the
  # first dev validation >= 60%, so every seed hands RISE a model that is right often and wrong often.
  c.rise.boost_validate_every = 150
  c.rise.boost_stop_accuracy = 0.6
  c.rise.init_from = "previous"
  c.rise.single_turn_control = True
  return c


def toy_smoke() -> ml_collections.ConfigDict:
  """The toy experiment shrunk to run end to end in well under a minute (tests, CI)."""
  c = toy()
  c.name = "toy_smoke"
  c.output_dir = "runs/toy_smoke"
  c.task.dev_size = 8
  c.task.test_size = 12
  c.task.train_size = 16
  c.sampling.batch_size = 16
  c.sampling.max_new_tokens = 8
  c.sampling.max_cache_length = 160
  c.collect.improvement_samples = 2
  c.train.global_batch = 8
  c.train.micro_batch = 8
  c.train.max_length = 160
  c.train.epochs = 1
  c.train.ckpt_every = 2                 # a checkpoint inside training for the resume tests
  c.train.log_every = 1
  c.eval.turns = 2
  c.eval.parallel_k = 2
  c.rise.boost_epochs = 1
  c.rise.boost_size = 16
  c.rise.boost_validate_every = 1        # exercise validation (never reaches the stop accuracy from scratch)
  # Two iterations (distillation, then self-distillation without an oracle), every model evaluated.
  c.rise.iterations = 2
  c.rise.evaluate = "all"
  return _overrides_within_iterations(c)


def _overrides_within_iterations(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Drop the toy's per-iteration settings for iterations a variant no longer runs (validate() refuses them)."""
  c.rise.iteration_overrides = tuple(o for o in c.rise.iteration_overrides
                                     if int(o.split(":")[0]) <= c.rise.iterations)
  return c


def _set(**fields):
  """A modifier setting dotted config fields: _set(**{"collect.criteria": "best"})."""
  def apply(c):
    for dotted, value in fields.items():
      node = c
      *parents, leaf = dotted.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  apply.fields = dict(fields)
  return apply


def _iteration_1_teacher(kind: str) -> tuple[str, ...]:
  """The toy's per-iteration settings with iteration 1 distilled from teacher `kind` over the whole history."""
  swap = {"1:collect.teacher.kind='reference'": f"1:collect.teacher.kind='{kind}'",
          "1:collect.window=1": "1:collect.window=None"}
  return tuple(swap.get(o, o) for o in toy().rise.iteration_overrides)


# Each paper ablation as named variants of the toy experiment (`--config=configs/ablation_<name>.py:<variant>`);
# the same fields apply to a real-scale config from the command line (docs/configs.md).
ABLATIONS: dict[str, dict[str, Any]] = {
    "criteria": {k: _set(**{"collect.criteria": k}) for k in ("all", "better", "best", "success")},
    "weighting": {
        "exp_tau0.4": _set(),
        "exp_tau0.1": _set(**{"collect.tau": 0.1}),
        "exp_tau1.0": _set(**{"collect.tau": 1.0}),
        "uniform": _set(**{"collect.weighting": "uniform"}),
        # tau -> 0: only correct actions, equally weighted (filtering).
        "filter": _set(**{"collect.criteria": "success", "collect.weighting": "uniform"}),
        "self_normalised": _set(**{"train.estimator": "self_normalised"}),
    },
    "turns": {str(k): _set(**{"collect.turns": k}) for k in (2, 3, 4)},
    "iterations": {str(k): _set(**{"rise.iterations": k}) for k in (1, 2, 3)},
    # Paper Fig. 6c: two iterations on fresh halves vs one iteration on all of it (same number of episodes).
    "oneshot": {
        "iterative": _set(**{"rise.iterations": 2, "rise.fresh_problems": True, "task.train_size": 1000}),
        "oneshot": _set(**{"rise.iterations": 1, "task.train_size": 2000}),
    },
    "window": {"full": _set(), "2": _set(**{"eval.window": 2}), "3": _set(**{"eval.window": 3})},
    "single_turn": {"multi": _set(), "single": _set(**{"collect.single_turn": True})},
    "distill": {
        "self": _set(),
        # The teacher: a stronger toy checkpoint (experiments/ablations.py trains one: a longer boost).
        "teacher": _set(**{"collect.improvement": "teacher", "collect.teacher.kind": "model",
                           "collect.teacher.path": "runs/toy_teacher/iter_0/train/hf"}),
    },
    "grader": {k: _set(**{"task.grader": k}) for k in ("paper", "robust")},
    "clip": {"off": _set(), "on": _set(**{"train.max_grad_norm": 1.0})},
    # Iteration 1 sees the whole history in all four: the toy's window 1 hides the attempts the repair teacher
    # corrects, and a window of 2 shows only the latest, which the boosted model cannot yet write (unparsable).
    "variants": {
        name: _set(**{"rise.iteration_overrides": _iteration_1_teacher(kind), "rise.mix_single_turn": mix})
        for name, kind, mix in (("base", "reference", False), ("repair", "repair", False),
                                ("mix", "reference", True), ("repair_mix", "repair", True))},
}


def toy_two_products(variant: str = "recipe") -> ml_collections.ConfigDict:
  """The toy recipe on the harder form `a*b+c*d` (docs/toy.md, "A toy with headroom"): three steps, two of them
  independent products, so a first turn has more to get wrong and a retry a right step to keep. Everything else
  is the default experiment's; the worked answers are up to 16 characters longer. `variant`: a key of
  TWO_PRODUCTS_VARIANTS."""
  if variant not in TWO_PRODUCTS_VARIANTS:
    raise ValueError(f"toy_two_products: unknown variant {variant!r}; known: {list(TWO_PRODUCTS_VARIANTS)}")
  c = toy()
  c.name = "toy_two_products" + ("" if variant == "recipe" else f"_{variant}")
  c.output_dir = f"runs/{c.name}"
  c.task.toy_form = "a*b+c*d"
  # Factors 1..12 (20,736 problems, 3-digit sums), and each iteration collects on 1,000 training problems: with
  # factors 1..9 on all 4,361, or 1..12 on 5,000, the first turn ended at the ceiling (dev, seed 0: RISE 3 92.0 and
  # 94.5%, control 3 96.0 and 93.0%); on 1,000, at 67.5 and 69.0% (docs/toy.md). The boost reads all of train.
  c.task.toy_max_factor = 12
  c.task.train_size = 1000
  c.sampling.max_new_tokens = 36         # a worked answer is at most 31 characters + end of turn
  c.sampling.max_cache_length = 320      # a 4-turn history of 36-token attempts (~270 tokens) + 36 new
  c.train.max_length = 320
  # 18,536 training problems: 4 epochs are the default's ~4,400 boost steps (the boost stops at dev validation)
  c.rise.boost_epochs = 4
  TWO_PRODUCTS_VARIANTS[variant](c)
  return c


def toy_ablation(ablation: str, variant: str) -> ml_collections.ConfigDict:
  """The toy experiment with one ablation variant applied; named and placed by (ablation, variant)."""
  if ablation not in ABLATIONS:
    raise ValueError(f"unknown ablation {ablation!r}; known: {sorted(ABLATIONS)}")
  variants = ABLATIONS[ablation]
  if variant not in variants:
    raise ValueError(f"ablation {ablation}: unknown variant {variant!r}; known: {list(variants)}")
  c = toy()
  variants[variant](c)
  c.name = f"toy_{ablation}_{variant}"
  c.output_dir = f"runs/{c.name}"
  return _overrides_within_iterations(c)


def _self_distillation_with(setting: str) -> tuple[str, ...]:
  """The toy's per-iteration settings with `setting` ("field=value") added to iterations 2 and 3, the two
  self-distillation iterations without an oracle; iteration 1 unchanged."""
  return toy().rise.iteration_overrides + (f"2:{setting}", f"3:{setting}")


# The sum written column by column with its carries (docs/toy.md, "The sum by columns"): a worked answer is at most
# 52 characters; the 4-turn history of 56-token attempts is ~350 tokens, + 56 new.
_COLUMNS = {"task.toy_form": "a*b+c*d/columns", "sampling.max_new_tokens": 56, "sampling.max_cache_length": 448,
            "train.max_length": 448}

_SUCCESS = _self_distillation_with("collect.criteria='success'")

TWO_PRODUCTS_VARIANTS = {
    "recipe": _set(),
    "mix": _set(**{"rise.mix_single_turn": True}),
    # Only correct turn-2 answers kept, so neither a wrong retry nor an abandoned right answer is trained on.
    "success": _set(**{"rise.iteration_overrides": _SUCCESS}),
    "success_mix": _set(**{"rise.iteration_overrides": _SUCCESS, "rise.mix_single_turn": True}),
    # More records that show a right answer kept after the failure message: iterations 2-3 on 5,000 problems.
    "mix_more": _set(**{"rise.iteration_overrides": _self_distillation_with("collect.num_problems=5000"),
                        "rise.mix_single_turn": True}),
    "columns": _set(**_COLUMNS),
    "columns_mix": _set(**_COLUMNS, **{"rise.mix_single_turn": True}),
}
