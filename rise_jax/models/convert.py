"""Convert checkpoints both ways: Hugging Face safetensors <-> rise_jax model directories; GGUF files -> either.

  python -m rise_jax.models.convert --to jax --src HF_DIR|FILE.gguf --dst OUT_DIR [--dtype bfloat16]
  python -m rise_jax.models.convert --to hf --src RISE_JAX_DIR --dst OUT_DIR [--tokenizer TOK_DIR]
      [--chat_template llama2|mistral|llama3|toy] [--max_shard_gb 5]
  python -m rise_jax.models.convert --to hf --src FILE.gguf --dst OUT_DIR [--max_shard_gb 5]

A rise_jax model directory is `model_config.json` plus orbax parameters (see rise_jax.models.native). The HF
output is what transformers and vLLM load as is (config.json, generation_config.json, safetensors shards with an
index, the tokenizer with its chat template when given). From a GGUF file (llama / mistral, any quantisation
gguf.quants reads) it is float32, with the tokenizer and chat template the file carries (rise_jax.gguf).
"""

from __future__ import annotations

import argparse
import sys

from rise_jax import gguf
from rise_jax.chat import load_tokenizer
from rise_jax.config import DTYPES
from rise_jax.models import hf_io, native


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rise_jax.models.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--to", choices=("jax", "hf"), required=True, help="output format")
  p.add_argument("--src", required=True, help="input: HF checkpoint directory or .gguf file for --to jax; rise_jax "
                                              "directory or .gguf file for --to hf")
  p.add_argument("--dst", required=True, help="output directory (must not exist or be empty unless --overwrite)")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype")
  p.add_argument("--tokenizer", default=None, help="--to hf: tokenizer directory to store with the checkpoint")
  p.add_argument("--chat_template", default=None, help="--to hf: template name stored with the tokenizer")
  p.add_argument("--max_shard_gb", type=float, default=5.0, help="--to hf: largest safetensors shard")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.to == "hf" and args.src.endswith(gguf.SUFFIX):
    if args.tokenizer or args.chat_template:
      raise SystemExit("--tokenizer/--chat_template: a GGUF file brings its own tokenizer and chat template")
    if args.dtype != "float32":
      raise SystemExit(f"--dtype {args.dtype}: a GGUF file converts to float32 safetensors only")
    path = gguf.convert_gguf(args.src, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                             overwrite=args.overwrite)
  elif args.to == "jax":
    if args.tokenizer or args.chat_template:
      raise SystemExit("--tokenizer/--chat_template apply to --to hf only")
    model = hf_io.load_hf_checkpoint(args.src, dtype=args.dtype)
    path = native.save_model(model, args.dst)
  else:
    model = native.load_model_dir(args.src, param_dtype=args.dtype, dtype=args.dtype)
    tokenizer = None
    if args.tokenizer is not None:
      tokenizer = load_tokenizer(args.tokenizer, chat_template=args.chat_template)
    path = hf_io.save_hf_checkpoint(model, args.dst, tokenizer=tokenizer,
                                    max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
