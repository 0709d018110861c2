"""Sequential RISE evaluation through the episode runner: continuing each conversation's KV cache across turns vs
prefilling the whole history every turn (the reference's approach: re-render and re-generate each turn).

Same random model, problems, seed and protocol on both sides; the outputs are identical (the sampler draws with
the same keys either way and checks it), only the prefill work differs. Warm-up runs first (compilation), then
interleaved repetitions; medians of wall time and the ratio.

  python benchmarks/evaluate_continuation.py [--problems 32] [--turns 5] [--max-new-tokens 24] [--repeats 3]
"""

import argparse
import pathlib
import statistics
import tempfile
import time

from rise_jax import chat, models
from rise_jax.tasks.prompts import get_prompt_set
from rise_jax.rollout import log as rollout_log
from rise_jax.rollout.policies import SamplerPolicy, TurnSampling
from rise_jax.rollout import Protocol, run_episodes
from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
from rise_jax.tasks import get_task
from rise_jax.sampling import Sampler


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--problems", type=int, default=32)
  parser.add_argument("--turns", type=int, default=5)
  parser.add_argument("--max-new-tokens", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--preset", default="toy-llama")
  args = parser.parse_args()

  work = pathlib.Path(tempfile.mkdtemp(prefix="bench_continuation_"))
  tokenizer = chat.load_tokenizer(build_toy_tokenizer(work / "tokenizer"), chat_template="toy")
  model = models.build_model(models.get_preset(args.preset).config, seed=0)
  sampler = Sampler(model, tokenizer, max_cache_length=1024)
  task = get_task("toy", test_size=args.problems, dev_size=0)
  problems = task.load("test")
  protocol = Protocol.sequential(args.turns, sampling=TurnSampling(max_new_tokens=args.max_new_tokens),
                                 grader="robust", prompt_set="toy")
  header = rollout_log.make_header("bench", args.preset)

  def run(reuse: bool, tag: str):
    policy = SamplerPolicy(sampler, tokenizer, reuse_cache=reuse)
    log = work / f"{tag}.jsonl"
    start = time.perf_counter()
    summary = run_episodes(problems, policy, protocol, log, task=task, prompts=get_prompt_set("toy"),
                           header=header, batch_size=args.problems, progress=False)
    seconds = time.perf_counter() - start
    _, records, _ = rollout_log.read_rollouts(log)
    texts = [[t["candidates"][0]["token_ids"] for t in r["turns"]] for r in records]
    return seconds, summary, texts

  modes = {"continue cache": True, "re-prefill history": False}
  reference_texts = None
  for name, reuse in modes.items():  # warm-up: compile every shape both modes use
    _, _, texts = run(reuse, f"warmup_{reuse}")
    reference_texts = reference_texts or texts
    assert texts == reference_texts, "the two modes must sample the same tokens"
  times = {name: [] for name in modes}
  summaries = {}
  for rep in range(args.repeats):
    for name, reuse in modes.items():
      seconds, summaries[name], _ = run(reuse, f"{rep}_{reuse}")
      times[name].append(seconds)

  print(f"{args.problems} toy problems x {args.turns} turns, {args.preset}, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.problems}, {args.repeats} interleaved repeats (medians)")
  print("| mode | wall s | problems/s | decode tokens/s | prefill tokens |")
  print("|---|---|---|---|---|")
  for name in modes:
    t = statistics.median(times[name])
    s = summaries[name]
    print(f"| {name} | {t:.2f} | {args.problems / t:.2f} | {s.decode_tokens / t:.0f} | {s.prefill_tokens} |")
  ratio = statistics.median(times["re-prefill history"]) / statistics.median(times["continue cache"])
  print(f"speed-up of continuing the cache: {ratio:.2f}x")


if __name__ == "__main__":
  main()
