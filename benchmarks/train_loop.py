"""Training-loop throughput on the toy model: one optimiser step per device call with power-of-two padded
lengths (the loop before `train.steps_per_call` and `train.buckets_per_octave`) vs the loop `train()` runs now:
K steps per call with prefetched host batches, and steps padded to one of B lengths per octave.

Both loops build their batches from the same plan and fetch metrics once per `--log_every` steps; they run
interleaved (old pass, new pass, old pass, ...) in one process so machine noise hits both alike, and the medians
of examples/s and their ratio are printed per shape. Shapes: `toy` is the toy boost (configs/toy.py: the task's
reference answers after the two-character opening turns, 28-34 tokens, batch 16); `BxL` is a batch of B synthetic
examples of L +- 5 tokens.

    python benchmarks/train_loop.py                                   # toy, 64x25, 128x25; steps_per_call auto
    python benchmarks/train_loop.py --shapes toy --steps_per_call 1 8 --buckets_per_octave 1 4 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from rise_jax import sharding as sharding_lib
from rise_jax.models.build import build_model
from rise_jax.models.configs import get_preset
from rise_jax.train import data as data_lib
from rise_jax.train import optim
from rise_jax.train import prefetch as prefetch_lib
from rise_jax.train import trainer as trainer_lib

RECIPE = types.SimpleNamespace(lr=1e-3, warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=None, b1=0.9, b2=0.98,
                               eps=1e-8)  # configs/toy.py's


def toy_examples(n: int) -> list[data_lib.Example]:
  """Today's toy boost data: the task's reference answers after the toy prompt set's opening turns."""
  from rise_jax import chat
  records, tokenizer_dir = toy_records(n)
  return data_lib.encode_records(data_lib.as_records(records), chat.load_tokenizer(tokenizer_dir, "toy"), 320)[0]


def synthetic_examples(n: int, length: int, vocab: int, seed: int = 0) -> list[data_lib.Example]:
  """n examples of length +- 5 tokens, the last 10 trained (a short prompt and its answer)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    ids = rng.integers(3, vocab, int(rng.integers(length - 5, length + 6)) + 1).astype(np.int32)
    mask = np.zeros(len(ids) - 1, np.float32)
    mask[-10:] = 1
    out.append(data_lib.Example(f"x{i}", 1.0, ids[:-1], ids[1:], mask))
  return out


class Loops:
  """The two loops over one trainer and plan; every pass runs the plan's first `steps` steps (so the warm-up pass
  compiles every program the timed passes use), continuing the training state."""

  def __init__(self, examples, batch: int, log_every: int):
    config = get_preset("toy-llama").config
    self.mesh = sharding_lib.make_mesh((1, -1, 1))
    self.examples, self.log_every = examples, log_every
    # One plan per padding rule: the same examples in the same steps, only the padded length differs.
    self.plans = {b: data_lib.plan([e.length for e in examples], epochs=1, seed=0, global_batch=batch,
                                   micro_batch=batch, row_multiple=self.mesh.shape["fsdp"], max_length=320,
                                   packing=False, buckets_per_octave=b) for b in (1, 2, 4, 8)}
    self.plan = self.plans[1]
    model = build_model(config, mesh=self.mesh, seed=0)
    tx, lr = optim.optimizer(RECIPE, len(self.plan))
    self.trainer = trainer_lib.Trainer(model, self.mesh, tx, lr)
    self.state = self.trainer.initial_state(model, 0)
    self.config, self.batch = config, batch

  def old(self, steps: int) -> int:
    """One step per call, the host batch built between calls (the loop before steps_per_call)."""
    pending, examples = [], 0
    with jax.set_mesh(self.mesh):
      for n, i in enumerate(range(steps), 1):
        batch, stats = self.trainer.batch(self.plan[i], self.examples, "sample_mean")
        self.state, metrics = self.trainer.step(self.state, batch, jnp.float32(stats.normalizer))
        pending.append(metrics)
        examples += stats.examples
        if n % self.log_every == 0:
          jax.device_get(pending)
          pending = []
    jax.device_get(pending)
    jax.block_until_ready(self.state)
    return examples

  def new(self, steps: int, per_call: int, per_octave: int = 1) -> int:
    """`per_call` steps per call from prefetched, stacked batches padded to `per_octave` lengths per octave (what
    train() runs)."""
    plan = self.plans[per_octave]
    calls = data_lib.chunk_plan(plan[:steps], 0, per_call, boundaries=[])
    pending, examples = [], 0
    batches = prefetch_lib.prefetch(calls, lambda c: self.trainer.call_batch([plan[i] for i in c],
                                                                              self.examples, "sample_mean"))
    with jax.set_mesh(self.mesh):
      for call, (batch, normalizers, stats) in zip(calls, batches):
        self.state, metrics = self.trainer.steps(self.state, batch, normalizers)
        pending.append(metrics)
        examples += sum(s.examples for s in stats)
        if call.stop // self.log_every > call.start // self.log_every:
          jax.device_get(pending)
          pending = []
    jax.device_get(pending)
    jax.block_until_ready(self.state)
    return examples


def bench_shape(name: str, args) -> None:
  if name == "toy":
    batch, examples = 16, toy_examples(2000)
  else:
    batch, length = (int(x) for x in name.split("x"))
    examples = synthetic_examples(max(2000, args.steps * batch), length, get_preset("toy-llama").config.vocab_size)
  loops = Loops(examples, batch, args.log_every)
  lengths = sorted({s.length for s in loops.plan})
  ks = [trainer_lib.steps_per_call(k, loops.config, batch, max(lengths)) for k in args.steps_per_call]
  fns = {"old (1 step/call)": loops.old}
  fns.update({f"new ({k} steps/call, {b}/oct)": (lambda steps, k=k, b=b: loops.new(steps, k, b))
              for k in ks for b in args.buckets_per_octave})
  for b in args.buckets_per_octave:
    plan = loops.plans[b][:args.steps]
    padded = sum(s.length * batch for s in plan) / sum(examples[i].length for s in plan for i in s.example_ids)
    print(f"[{name}] {b} length(s) per octave: padded / real tokens {padded:.2f}, lengths "
          f"{sorted({s.length for s in plan})}")
  t0 = time.perf_counter()
  for fn in fns.values():  # compiles every program and length on the warm-up pass
    fn(args.steps)
  print(f"\n[{name}] batch {batch}, old padded lengths {lengths}, {args.steps} steps per pass; warm-up (compiles) "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  rates = {k: [] for k in fns}
  for _ in range(args.repeats):
    for label, fn in fns.items():
      t = time.perf_counter()
      n = fn(args.steps)
      rates[label].append(n / (time.perf_counter() - t))
  base = statistics.median(rates["old (1 step/call)"])
  for label, r in rates.items():
    med = statistics.median(r)
    print(f"  {label:30s} {med:8.0f} examples/s  {1e3 * batch / med:7.1f} ms/step  ratio {med / base:.2f}x  "
          f"(per pass: {', '.join(f'{x:.0f}' for x in r)})", flush=True)


def toy_records(n: int) -> tuple[list[dict], str]:
  """Today's toy boost records and a toy tokenizer directory."""
  from rise_jax.tasks.prompts import get_prompt_set
  from rise_jax.chat.toy_tokenizer import build_toy_tokenizer
  from rise_jax.tasks.toy import ToyTask
  prompts = get_prompt_set("toy")
  records = [{"id": p.id, "weight": 1.0, "messages": prompts.initial_messages(p.question) + [
      {"role": "assistant", "content": p.reference, "train": True}]} for p in ToyTask().load("train")[:n]]
  return records, build_toy_tokenizer(tempfile.mkdtemp(prefix="rise_jax_tok_") + "/toy")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=["toy", "64x25", "128x25"])
  parser.add_argument("--steps_per_call", nargs="+", type=lambda s: None if s == "auto" else int(s),
                      default=[None], help="values for the new loop ('auto' = the trainer's default)")
  parser.add_argument("--buckets_per_octave", nargs="+", type=int, default=[1, 4],
                      help="padded lengths per octave for the new loop (the old loop: 1, powers of two)")
  parser.add_argument("--steps", type=int, default=64, help="steps per timed pass")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--log_every", type=int, default=50, help="configs/toy.py's")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))")
  for name in args.shapes:
    bench_shape(name, args)


if __name__ == "__main__":
  main()
