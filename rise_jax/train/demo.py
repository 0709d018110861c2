"""A small weighted training set for the char-level toy model, so the training demo runs from a fresh clone.

Each record is a RISE-shaped conversation (instruction, example answer, question, attempts) about `a+b*c`; a
correct trained answer gets w = exp(1 / tau), a wrong one w = exp(0) = 1, as collection would weight them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from rise_jax.files import atomic_write_text

TAU = 0.4
INSTRUCTION = "Compute. Example: 1+2*3"
EXAMPLE_ANSWER = "2*3=6, 1+6=7. Answer: 7"
FEEDBACK = "Wrong. Try again: "


def _answer(a: int, b: int, c: int, result: int) -> str:
  return f"{b}*{c}={b * c}, {a}+{b * c}={result}. Answer: {result}"


def demo_records(num: int = 96, seed: int = 0) -> list[dict]:
  """`num` records: single-turn ones and two-turn ones whose first attempt was wrong."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num):
    a, b, c = (int(x) for x in rng.integers(1, 10, 3))
    question = f"{a}+{b}*{c}"
    truth = a + b * c
    correct = bool(rng.random() < 0.6)
    result = truth if correct else truth + int(rng.integers(1, 4))
    messages = [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": EXAMPLE_ANSWER},
                {"role": "user", "content": question}]
    turns = 1 + int(rng.random() < 0.5)
    if turns == 2:
      messages += [{"role": "assistant", "content": _answer(a, b, c, truth + 1)},
                   {"role": "user", "content": FEEDBACK + question}]
    messages.append({"role": "assistant", "content": _answer(a, b, c, result), "train": True})
    reward = 1.0 if correct else 0.0
    records.append({"id": f"demo/{i}#t{turns}", "weight": math.exp(reward / TAU), "messages": messages,
                    "meta": {"reward": reward, "turn": turns, "source": "rise_jax.train.demo"}})
  return records


def ensure_demo_data(data_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None) -> None:
  """Write the demo records and the toy tokenizer where the config points, unless they already exist."""
  data_path = pathlib.Path(data_path)
  if not data_path.exists():
    atomic_write_text(data_path, "".join(json.dumps(r) + "\n" for r in demo_records()))
  if tokenizer_path is not None and not pathlib.Path(tokenizer_path).exists():
    from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
    build_toy_tokenizer(tokenizer_path)
