"""One `Sampler.generate` call at the toy evaluation's size: 2,000 turn-1 prompts, 20 new tokens.

    python benchmarks/sampler_calls.py                       # random toy-llama weights
    python benchmarks/sampler_calls.py --checkpoint runs/toy/iter_0/train/hf
    PYTHONPATH=<checkout of another commit> python benchmarks/sampler_calls.py   # the same calls on older code

Times (median of `--reps` calls after a compiling one) a prefill-only call (1 new token), a 20-token call, the
same with 5 samples per prompt (10,000 rows at the default 2,000 prompts), and the first two calls with the cache bucket forced to 320 slots (the
size a turn-5 prompt needs). No stop tokens: every row decodes all 20 tokens, so random and trained weights do
the same work. Per decode step = (t(20 tokens) - t(1 token)) / 19.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from rise_jax import chat
from rise_jax.models import hf_io
from rise_jax.models.build import build_model
from rise_jax.models.configs import get_preset
from rise_jax.tasks.prompts import get_prompt_set
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
from rise_jax.tasks import get_task
from rise_jax.sampling import Sampler, SamplingParams
from rise_jax.sampling import sampler as sampler_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None, help="an HF checkpoint of the toy model (default: random)")
  parser.add_argument("--prompts", type=int, default=2000)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()

  tokenizer = chat.load_tokenizer(build_toy_tokenizer(f"{tempfile.mkdtemp()}/tokenizer"), "toy")
  model = (hf_io.load_hf_checkpoint(args.checkpoint) if args.checkpoint
           else build_model(get_preset("toy-llama").config, seed=0))
  prompts = [get_prompt_set("toy").initial_messages(p.question)
             for p in get_task("toy", test_size=args.prompts).load("test")]
  sampler = Sampler(model, tokenizer, max_cache_length=320)

  def timed(n: int, max_new: int) -> float:
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, stop_token_ids=[])
    sampler.generate(prompts, params, seed=0)  # compiles this shape
    times = []
    for rep in range(args.reps):
      start = time.perf_counter()
      sampler.generate(prompts, params, seed=rep + 1)
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  rows = {}
  five = timed(5, 20)
  for cache in ("natural", "320"):
    if cache == "320":
      sampler_lib.MIN_CACHE = 512  # every bucket becomes the 320-slot capacity
    prefill, call = timed(1, 1), timed(1, 20)
    rows[cache] = (prefill, call, (call - prefill) / 19)
  print(f"{args.prompts} toy turn-1 prompts, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}"
        f"; medians of {args.reps} calls (s)")
  for cache, (prefill, call, step) in rows.items():
    print(f"cache {cache:>7}: prefill (1 token) {prefill:.2f}  20 tokens {call:.2f}  "
          f"per decode step {step * 1e3:.0f} ms")
  print(f"cache natural: 5 samples x 20 tokens ({5 * args.prompts:,} rows) {five:.2f}")


if __name__ == "__main__":
  main()
