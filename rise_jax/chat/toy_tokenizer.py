"""The toy task's char-level tokenizer (`rise_jax.tasks.toy`): the 7 specials of the `toy` chat template, then one
id per printable ASCII character and newline. Built, not downloaded: a pure function of this module."""

from __future__ import annotations

import json
import os
import tempfile

import tokenizers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>")
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)  # printable ASCII in code-point order, then newline
MARKER = "rise_jax_toy_tokenizer.json"


def build_toy_tokenizer(out_dir: str | os.PathLike) -> str:
  """Write the char-level toy tokenizer as a Hugging Face tokenizer directory and return its path.

  Ids: the 7 specials of the toy chat template first (<pad>=0, <s>=1, </s>=2, <unk>=3, <|user|>=4,
  <|assistant|>=5, <|end|>=6), then one id per printable ASCII character (space..~) and "\\n": 103 in all.
  """
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
  template = os.path.join(os.path.dirname(__file__), os.pardir, "chat_templates", "toy.jinja")
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
