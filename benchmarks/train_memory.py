"""Memory of one rise_jax train step, from the compiled program (compile only: runs on a CPU for any size).

Breaks the compiled peak (`memory_analysis()`) into parameters, optimiser state, gradients and the activations the
backward saves (per dtype, and by the function that made them), checks the state is donated, and prints what is
left over (XLA's transients). Several `--remat` policies compare what each saves.

    python benchmarks/train_memory.py --size 1b --batch 8 --seq 1024 --remat none
    python benchmarks/train_memory.py --size 1b --layers 4 --remat none    # a shallower compile to iterate on
    python benchmarks/train_memory.py --size 1b --batch 8 --seq 1024 --remat none dots_with_no_batch_dims full
    python benchmarks/train_memory.py --size 7b --batch 4 --seq 1024 --remat full --moments bfloat16 --scan
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from rise_jax.models import configs as model_configs
from rise_jax.train import memory, optim
from train_step import RecipeCfg  # the benchmark's recipe (AdamW, no clipping), shared with the speed script

SIZES = {
    # ~106M parameters: Llama 2's vocabulary, 8 layers of width 768 (benchmarks/train_step.py's 100m).
    "100m": model_configs.ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=8,
                                      num_heads=12, num_kv_heads=12, head_dim=64),
    # TinyLlama-1.1B's shape (benchmarks/train_step.py's 1b).
    "1b": model_configs.ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                    num_heads=32, num_kv_heads=4, head_dim=64),
    "7b": model_configs.PRESETS["llama-2-7b-chat"].config,
}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="1b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--remat", nargs="+", default=["none"])
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
  parser.add_argument("--moments", default="float32", help="Adam moments' dtype (train.moments_dtype)")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--scan", action="store_true", help="scan over layers (model.scan_layers)")
  parser.add_argument("--layers", type=int, default=None,
                      help="override the size's layer count (a shallower compile to iterate on: minutes -> seconds)")
  args = parser.parse_args()
  c = SIZES[args.size]
  if args.layers is not None:
    c = dataclasses.replace(c, num_layers=args.layers)
  recipe = RecipeCfg(moments_dtype=args.moments)
  tx, lr = optim.optimizer(recipe, 1000)
  for remat in args.remat:
    trainer = memory.abstract_trainer(c, tx, lr, dtype=args.dtype, remat=remat, attention=args.attention,
                                      scan_layers=args.scan)
    t = time.perf_counter()
    m = memory.step_memory(trainer, args.batch, args.seq)
    print(f"\n== {args.size} ({c.num_layers} layers), batch {args.batch} x {args.seq}, compute {args.dtype}, "
          f"remat {remat}, attention {args.attention}, moments {args.moments}, scan_layers {args.scan} "
          f"(compiled in {time.perf_counter() - t:.0f} s)")
    print(m.table(), flush=True)


if __name__ == "__main__":
  main()
