"""The toy task: `a+b*c` with a two-step scratchpad, small enough for a char-level model on 2 CPU cores.

Problem "25+3*4", worked answer "3*4=12,25+12=37"; the answer is the integer after the last '='. Operands:
a in [0, max_addend], b and c in [1, max_factor] (defaults 99 and 9: 8,100 distinct problems, answers 1..180,
an answer space of 180 values, so a uniform guesser scores 1/180 per attempt). Wrong answers of a model are
mostly near misses (a times-table slip, a dropped carry), and every step stays visible, so a retry can reread
the failed attempt and check it step by step. The whole problem space is enumerated and permuted with `seed`;
test takes the first `test_size` problems, the rest is the train source, from which dev is carved with a fixed
seed like any task's. Splits are disjoint by construction and asserted.

The task's tokenizer is char-level (`build_toy_tokenizer`) with the specials of the `toy` chat template.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile

from rise_jax.rise.tasks import base

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>")
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)  # printable ASCII in code-point order, then newline
MARKER = "rise_jax_toy_tokenizer.json"


def worked_answer(a: int, b: int, c: int) -> str:
  """The reference scratchpad: the product first (precedence), then the sum."""
  return f"{b}*{c}={b * c},{a}+{b * c}={a + b * c}"


class ToyTask(base.Task):
  name = "toy"

  def __init__(self, *, seed: int = 0, max_addend: int = 99, max_factor: int = 9, test_size: int | None = 2000,
               **kwargs):
    super().__init__(test_size=test_size, **kwargs)
    if max_addend < 0 or max_factor < 1:
      raise ValueError(f"toy task needs max_addend >= 0 and max_factor >= 1, got {max_addend}, {max_factor}")
    self.seed = seed
    self.max_addend = max_addend
    self.max_factor = max_factor
    self._space = list(itertools.product(range(max_addend + 1), range(1, max_factor + 1),
                                         range(1, max_factor + 1)))
    random.Random(seed).shuffle(self._space)
    num_test = len(self._space) if test_size is None else test_size
    needed = num_test + self.dev_size + 1
    if needed > len(self._space):
      raise ValueError(f"toy task: test_size {num_test} + dev_size {self.dev_size} + at least one training "
                       f"problem exceed the {len(self._space)} distinct problems; raise max_addend")
    self._num_test = num_test

  def answer_space_size(self) -> int:
    """How many distinct answers the problems have (the chance level of a uniform guesser is 1 / this)."""
    products = {b * c for b in range(1, self.max_factor + 1) for c in range(1, self.max_factor + 1)}
    return len({a + p for a in range(self.max_addend + 1) for p in products})

  def _load_source_split(self, split: str) -> list[base.Problem]:
    triples = self._space[:self._num_test] if split == "test" else self._space[self._num_test:]
    return [base.Problem(id=f"toy/{split}/{i}", question=f"{a}+{b}*{c}", reference=worked_answer(a, b, c),
                         meta={"a": a, "b": b, "c": c})
            for i, (a, b, c) in enumerate(triples)]

  def load(self, split: str) -> list[base.Problem]:
    problems = super().load(split)
    self._assert_disjoint()
    return problems

  def _assert_disjoint(self):
    if "test" not in self._cache or "train" not in self._cache:
      super().load("test" if "test" not in self._cache else "train")
    questions = {s: {p.question for p in self._cache[s]} for s in base.SPLITS}
    for s1, s2 in itertools.combinations(base.SPLITS, 2):
      overlap = questions[s1] & questions[s2]
      assert not overlap, f"toy splits {s1} and {s2} share problems, e.g. {sorted(overlap)[:3]}"


def build_toy_tokenizer(out_dir: str | os.PathLike) -> str:
  """Write the char-level toy tokenizer as a Hugging Face tokenizer directory and return its path.

  Ids: the 7 specials of the toy chat template first (<pad>=0, <s>=1, </s>=2, <unk>=3, <|user|>=4,
  <|assistant|>=5, <|end|>=6), then one id per printable ASCII character (space..~) and "\\n": 103 in all.
  """
  import tokenizers
  import transformers

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
  # BPE without merges is a char-level model; no pre-tokenizer, so whitespace is an ordinary character.
  model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
  tok = tokenizers.Tokenizer(model)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.decoder = tokenizers.decoders.Fuse()
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"], clean_up_tokenization_spaces=False,
      model_max_length=4096)
  template = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "chat_templates", "toy.jinja")
  if os.path.isfile(template):
    with open(template, encoding="utf-8") as f:
      hf.chat_template = f.read()
  out_dir = os.fspath(out_dir)
  if os.path.isfile(os.path.join(out_dir, MARKER)):
    return out_dir  # Built before (a resumed run): the tokenizer is a pure function of this module.
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a toy tokenizer directory")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  # Written beside the target and renamed, so a reader never sees a half-written directory.
  tmp = tempfile.mkdtemp(prefix=".toy_tokenizer.", dir=parent)
  hf.save_pretrained(tmp)
  with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
    json.dump({"vocab_size": len(vocab), "specials": list(SPECIAL_TOKENS)}, f)
  os.rename(tmp, out_dir)
  return out_dir
