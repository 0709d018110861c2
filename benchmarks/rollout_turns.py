"""RISE's sequential turns on the rollout engine three ways, side by side in one process: turn by turn, turn by turn
without the prefix cache, and streamed.

    python benchmarks/rollout_turns.py                        # 128 problems x 3 turns, 2 interleaved repetitions
    python benchmarks/rollout_turns.py --problems 64 --turns 5 --reps 1

Workload (Algorithm 2's shape without an oracle): `--problems` GSM8K train problems; turn 1's prompt is the
question; turn t + 1's prompt is turn t's prompt, its reply and the failure message ("Your previous answer was
incorrect. ...", tokenised). The reply of (problem, turn) has the length of a GSM8K reference answer drawn at
random (seeded): stops are off and each request's `max_new_tokens` is its drawn length, so the workload is the
length distribution (as `rollout_engine.py`). Everything is tokenised with the real Llama 2 tokenizer from
`../shared`; the model is `rollout_engine.py`'s random-weight Llama-shaped one. Every variant draws with one key
rule; the conversations have the same lengths, hence the same work, and mostly the same tokens (the script says
how many match the turn-by-turn engine's: the random model's flat distributions let float rounding flip an
inverse-CDF draw).

Three ways to run each turn:
  * engine   — the whole turn queued through 64 slots; the prefix cache supplies every conversation's previous
    prompt and reply, so only the failure message is prefilled;
  * engine, no prefix cache — the same with `prefix_cache=False`: every turn re-prefills its whole history;
  * engine, streamed — one `Engine.stream` for all turns: a conversation's next turn is submitted the moment its
    reply is back (as the episode runner streams an `EnginePolicy`), so no turn waits for the others to drain.
Reported: tokens/s (drawn reply tokens / wall time, all turns) and the ratios to the turn-by-turn engine; prompt
tokens prefilled; useful-slot fraction (decode-step tokens / (decode steps x slots)); first pass (compiles) apart
from the steady state (median of the interleaved repetitions). Each pass starts with an empty prefix cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import numpy as np

import rollout_engine as single_turn  # this directory: the workload's model, tokenizer and GSM8K draw
from rise_jax.models.build import build_model
from rise_jax.sampling.engine import Engine
from rise_jax.sampling.requests import Request
from timing import timed  # this directory: the timing the benchmarks share

SLOTS = single_turn.STATIC_BATCH  # the single-turn benchmark's 64 slots
MAX_SEQ_LEN = 2048  # turn 5 of a long problem: question + 4 replies and failure messages + the 5th reply
FEEDBACK = "Your previous answer was incorrect. Please try again, and reason step by step."


def workload(problems: int, turns: int, seed: int):
  """(questions' ids, feedback ids, lengths [problems, turns]): reply lengths drawn from the reference answers."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(single_turn.TOKENIZER))
  draw = single_turn.gsm8k_workload(problems * (turns + 1), seed)
  questions = [prompt for prompt, _ in draw[:problems]]
  lengths = np.asarray([length for _, length in draw[problems:]]).reshape(problems, turns)
  return questions, sp.encode(FEEDBACK), lengths


def uid(problem: int, turn: int) -> int:
  return problem * 64 + turn


def run_engine(engine: Engine, questions, feedback, lengths) -> dict:
  """Turn by turn: each turn's requests in one queue, drained before the next turn starts."""
  before = dict(engine.stats)
  engine.forget_prefix_cache()  # an earlier pass's conversations would be free hits
  prompts = [list(q) for q in questions]
  for t in range(lengths.shape[1]):
    outs = engine.run([Request(p, uid=uid(i, t), max_new_tokens=int(lengths[i, t]), temperature=1.0)
                       for i, p in enumerate(prompts)], seed=0)
    prompts = [p + o[0].token_ids + feedback for p, o in zip(prompts, outs)]
  return _engine_counts(engine, before, prompts)


def run_streamed(engine: Engine, questions, feedback, lengths) -> dict:
  """One stream: each conversation's next turn submitted as soon as its reply is back."""
  before = dict(engine.stats)
  engine.forget_prefix_cache()
  prompts = [list(q) for q in questions]
  stream = engine.stream(seed=0)
  submit = lambda i, t: stream.submit(Request(prompts[i], uid=uid(i, t), max_new_tokens=int(lengths[i, t]),
                                              temperature=1.0), tag=(i, t))
  for i in range(len(prompts)):
    submit(i, 0)
  while stream.busy:
    for (i, t), outs in stream.step():
      prompts[i] = prompts[i] + outs[0].token_ids + feedback
      if t + 1 < lengths.shape[1]:
        submit(i, t + 1)
  return _engine_counts(engine, before, prompts)


def _engine_counts(engine: Engine, before: dict, prompts) -> dict:
  counts = {k: engine.stats[k] - before.get(k, 0) for k in ("prefill_tokens", "cached_tokens", "decode_tokens",
                                                             "slot_steps")}
  return dict(counts, last_prompts=prompts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--problems", type=int, default=128)
  parser.add_argument("--turns", type=int, default=3)
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--chunk-steps", type=int, default=8)
  args = parser.parse_args()
  if not (single_turn.TOKENIZER.is_file() and single_turn.GSM8K_TRAIN.is_file()):
    print(f"skipped: {single_turn.TOKENIZER} or {single_turn.GSM8K_TRAIN} is absent (the shared data sits beside "
          "the checkout)")
    return 0
  questions, feedback, lengths = workload(args.problems, args.turns, seed=0)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.problems} GSM8K problems x {args.turns} "
        f"turns; question mean {np.mean([len(q) for q in questions]):.0f} tokens, feedback {len(feedback)}, reply "
        f"mean {lengths.mean():.0f} / max {lengths.max()} tokens; load average {_load()}", flush=True)
  model = build_model(single_turn.MODEL, seed=0)
  engine_args = dict(slots=SLOTS, max_seq_len=MAX_SEQ_LEN, block_size=16, chunk_steps=args.chunk_steps)
  engine = Engine(model, **engine_args)
  uncached = Engine(model, **engine_args, prefix_cache=False)
  streamed = Engine(model, **engine_args)
  runs = {"engine": lambda: run_engine(engine, questions, feedback, lengths),
          "engine, no prefix cache": lambda: run_engine(uncached, questions, feedback, lengths),
          "engine, streamed": lambda: run_streamed(streamed, questions, feedback, lengths)}
  first, counts, times = {}, {}, {name: [] for name in runs}
  for name, fn in runs.items():
    first[name], counts[name] = timed(fn)
    print(f"{name}: first pass {first[name]:.1f} s", flush=True)
  # Same keys, but an inverse-CDF draw from this random model's nearly flat distributions can flip on float32
  # rounding (~2e-6 in a log-prob); the lengths, and so the work, are equal whatever the tokens.
  want = counts["engine"]["last_prompts"]
  for name in list(runs)[1:]:
    got = counts[name]["last_prompts"]
    assert [len(p) for p in got] == [len(p) for p in want], name
    print(f"{name}: {sum(a == b for a, b in zip(got, want))} of {len(want)} conversations token for token the "
          "turn-by-turn engine's", flush=True)
  for rep in range(args.reps):  # interleaved: the machine is shared, so only side-by-side ratios are meaningful
    for name, fn in runs.items():
      times[name].append(timed(fn)[0])
    print(f"rep {rep}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()) + f"; load {_load()}",
          flush=True)
  tokens = int(lengths.sum())
  for name in runs:
    c = counts[name]
    print(f"{name:>24}: prompt tokens prefilled {c['prefill_tokens']:,}, {c['cached_tokens']:,} read from the "
          f"prefix cache; useful-slot fraction "
          f"{c['decode_tokens'] / c['slot_steps']:.3f}; first pass {first[name]:.1f} s", flush=True)
  if args.reps:
    steady = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
      print(f"{name:>24}: steady {steady[name]:.2f} s (runs {', '.join(f'{t:.2f}' for t in times[name])}), "
            f"{tokens / steady[name]:.0f} tok/s, {steady['engine'] / steady[name]:.2f}x turn by turn", flush=True)
  print(f"compiles: engine {engine.compile_counts()}, no prefix cache {uncached.compile_counts()}, streamed "
        f"{streamed.compile_counts()}", flush=True)
  return 0


def _load() -> str:
  try:
    return open("/proc/loadavg").read().split()[0]
  except OSError:
    return "?"


if __name__ == "__main__":
  sys.exit(main())
