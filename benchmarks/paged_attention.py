"""One decode attention over a paged pool: the pool's block layout against the contiguous cache, interleaved.

    python benchmarks/paged_attention.py                     # 64 rows x 128 tokens, the rollout benchmark's heads
    python benchmarks/paged_attention.py --rows 256 --tokens 512

Variants (each one jitted call = one layer's attention of one decode step, keys and values gathered from a pool
of --blocks blocks of 16 through a random block table):
  * token_major: blocks [num_blocks, block_size, kv_heads, d], attention reducing over the token axis in place
    (the engine's layout before 2026-12-01);
  * head_major: blocks [num_blocks, kv_heads, block_size, d], gathered and transposed to [rows, kv_heads,
    tokens, d] for `attention.decode_attention` (the engine's layout now);
  * contiguous: a contiguous decode cache [rows, kv_heads, tokens, d], no gather (the floor the pool is held to).
Reported: per variant the median of --reps timings (ms per call) and its ratio to contiguous. The variants
alternate within each repetition, so a shared machine's load hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax.models import attention as attention_lib

BLOCK = 16


def token_major_attention(q, keys, values, visible):
  """The engine's attention before head-major blocks: keys, values [b, t, kv_heads, d], reduced over axis 1."""
  b, heads, d = q.shape
  q = q.reshape(b, keys.shape[2], heads // keys.shape[2], d)
  scores = jnp.sum(q[:, None] * keys[:, :, :, None], axis=-1)  # [b, t, kv, g]
  probs = jax.nn.softmax(jnp.where(visible[:, :, None, None], scores * d ** -0.5, -jnp.inf), axis=1)
  return jnp.sum(probs[..., None] * values[:, :, :, None], axis=1).reshape(b, heads, d)


def variants(rows: int, tokens: int, kv_heads: int, groups: int, d: int):
  span = tokens // BLOCK
  token_major = jax.jit(lambda q, p, t, vis: token_major_attention(q, p[t].reshape(rows, tokens, kv_heads, d),
                                                                   p[t].reshape(rows, tokens, kv_heads, d), vis))
  to_heads = lambda p, t: jnp.swapaxes(p[t], 1, 2).reshape(rows, kv_heads, tokens, d)
  head_major = jax.jit(lambda q, p, t, vis: attention_lib.decode_attention(q, to_heads(p, t), to_heads(p, t), vis))
  contiguous = jax.jit(lambda q, c, vis: attention_lib.decode_attention(q, c, c, vis))
  return dict(token_major=token_major, head_major=head_major, contiguous=contiguous), span


def time_calls(fn, args, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=128, help="attention span, a multiple of 16")
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--groups", type=int, default=1, help="query heads per kv head")
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--blocks", type=int, default=4098)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--calls", type=int, default=30)
  args = parser.parse_args()
  rows, tokens, kv, d = args.rows, args.tokens, args.kv_heads, args.head_dim
  fns, span = variants(rows, tokens, kv, args.groups, d)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  table = jnp.asarray(rng.permutation(args.blocks - 1)[:rows * span].reshape(rows, span) + 1, jnp.int32)
  q, visible = normal(rows, kv * args.groups, d), jnp.ones((rows, tokens), bool)
  inputs = dict(token_major=(q, normal(args.blocks, BLOCK, kv, d), table, visible),
                head_major=(q, normal(args.blocks, kv, BLOCK, d), table, visible),
                contiguous=(q, normal(rows, kv, tokens, d), visible))
  times = {name: [] for name in fns}
  for _ in range(args.reps):
    for name, fn in fns.items():
      times[name].append(time_calls(fn, inputs[name], args.calls))
  floor = statistics.median(times["contiguous"])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {rows} rows x {tokens} tokens, {kv} kv heads x "
        f"{args.groups} groups x {d}")
  for name, t in times.items():
    print(f"{name:>12}: {statistics.median(t):.2f} ms (runs {', '.join(f'{x:.2f}' for x in t)}), "
          f"{statistics.median(t) / floor:.2f}x contiguous")


if __name__ == "__main__":
  main()
