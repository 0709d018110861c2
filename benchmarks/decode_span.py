"""One engine decode chunk at a long context, at the attention spans a chunk may run, the span read whole or in
pieces: what a span bucket and the CPU's pieced attention cost.

    python benchmarks/decode_span.py --context 1100 --spans 2048,1280
    python benchmarks/decode_span.py --context 800 --spans 1024,896
    python benchmarks/decode_span.py --context 600 --spans 640

Why. Every slot of a decode chunk attends over the chunk's span (the bucket above its longest slot), and on the
project's real-model shape attention is most of a step past ~512 tokens. RISE turns after a failed attempt hold
500-1,300 tokens (SmolLM2 on GSM8K, window 2), so a power-of-two bucket (2,048 for a 1,100-token slot) nearly
doubles the work of the one above it (`scheduler.span_bucket`'s quarter octave: 1,280).

What: `paged.decode_chunk` (8 steps) of SmolLM2-135M's shape (30 layers, hidden 576, 9 / 3 heads, vocabulary
49,152; random weights, float32) with every slot at --context tokens, per span read whole and (spans of
`paged.PIECED_SPAN_TOKENS` or more, as the engine does on CPU) in `paged.PIECE_TOKENS` pieces; each variant jitted
once and timed --reps times interleaved. Reported: ms per decode step and each one's speed against the first
span read whole (the engine before quarter octaves and pieces).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rise_jax.models.build import build_model
from rise_jax.models.configs import ModelConfig
from rise_jax.sampling import paged

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
BLOCK, STEPS = 16, 8


def slot_batch(slots: int, context: int, max_blocks: int, num_blocks: int) -> paged.SlotBatch:
  """Every slot active at `context` tokens, on its own distinct blocks."""
  table = np.random.default_rng(0).permutation(np.arange(1, num_blocks))[:slots * max_blocks]
  full = lambda dtype, value=0: jnp.full((slots,), value, dtype)
  return paged.SlotBatch(
      block_table=jnp.asarray(table.reshape(slots, max_blocks), jnp.int32), length=full(jnp.int32, context),
      last_token=full(jnp.int32, 5), generated=full(jnp.int32), active=full(bool, True),
      max_new=full(jnp.int32, 10**6), capacity=full(jnp.int32, max_blocks * BLOCK),
      key_ids=jnp.zeros((slots, 3), jnp.uint32), temperature=full(jnp.float32, 1.0), top_k=full(jnp.int32),
      top_p=full(jnp.float32, 1.0), stop_ids=jnp.full((slots, 4), -1, jnp.int32),
      copy_src=jnp.zeros((4,), jnp.int32), copy_dst=jnp.zeros((4,), jnp.int32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--context", type=int, default=1100, help="tokens every slot holds")
  parser.add_argument("--spans", default="2048,1280", help="attention spans in tokens (multiples of 16, "
                      ">= context + 8), the first the reference")
  parser.add_argument("--slots", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  spans = [int(s) // BLOCK for s in args.spans.split(",")]
  if min(spans) * BLOCK < args.context + STEPS:
    parser.error(f"every span must hold the context and the chunk's {STEPS} new tokens")
  max_blocks = max(spans)
  num_blocks = args.slots * max_blocks + 1
  model = build_model(SMOLLM2, seed=0)
  graphdef, state = nnx.split(model)
  pool = paged.init_pool(SMOLLM2, num_blocks, BLOCK, jnp.float32)
  batch = slot_batch(args.slots, args.context, max_blocks, num_blocks)

  @functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=(1,))
  def chunk(state, pool, batch, span, pieced):
    return paged.decode_chunk(nnx.merge(graphdef, state), pool, batch, STEPS, span, None, pieced)

  variants = [(span, pieced) for span in spans
              for pieced in (False, True) if not pieced or span * BLOCK >= paged.PIECED_SPAN_TOKENS]
  for variant in variants:  # compile each
    pool, out = chunk(state, pool, batch, *variant)
    jax.block_until_ready(out)
  times = {variant: [] for variant in variants}
  for _ in range(args.reps):
    for variant in variants:
      start = time.perf_counter()
      pool, out = chunk(state, pool, batch, *variant)
      jax.block_until_ready(out)
      times[variant].append((time.perf_counter() - start) / STEPS)
  base = statistics.median(times[variants[0]])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; SmolLM2-135M shape, {args.slots} slots at "
        f"{args.context} tokens, chunks of {STEPS} steps")
  for span, pieced in variants:
    t = statistics.median(times[span, pieced])
    runs = ", ".join(f"{x * 1e3:.0f}" for x in times[span, pieced])
    how = f"in {paged.PIECE_TOKENS}-token pieces" if pieced else "whole"
    print(f"span {span * BLOCK:>5} tokens {how:>20}: {t * 1e3:7.1f} ms/step (runs {runs}), "
          f"{base / t:.2f}x the {spans[0] * BLOCK}-token span whole")


if __name__ == "__main__":
  main()
