"""SmolLM2-135M-Instruct (the real checkpoint of tests/fixtures_real.py) on GSM8K-length prompts: rise_jax against
transformers (torch eager, float32) in one process, repetitions interleaved, reported as ratios.

    python benchmarks/real_model.py                    # batches 8 and 64, 32 new tokens, 3 repetitions
    python benchmarks/real_model.py --batches 8 --reps 2 --new 16

Rows:
- generation: B GSM8K test questions under the paper prompt set (461-545 tokens each: the instruction's worked
  example is ~450 of them), B greedy continuations of exactly `--new` tokens. rise_jax's engine (its prefix cache
  shares the worked example's blocks between prompts, as in every RISE run) against `transformers.generate` on
  the same left-padded batch. tokens/s counts generated tokens.
- prefill: one forward of the same B prompts (no cache), rise_jax against torch: the cost of the prompt alone;
  also split into the layer stack (`model.hidden` vs `ref.model`) and the unembedding (vs `lm_head`).
- matmul: the three SwiGLU matmuls of one layer at the prefill's token count (B x 512 rows), jitted jax against
  torch: whether XLA:CPU's dot itself is the prefill gap.
- training step: one optimiser step (forward, backward, AdamW) on B x 512-token rows, rise_jax's Trainer against
  torch eager (`loss.backward()`, `torch.optim.AdamW`), float32 both.
First calls (compiles) are reported apart from the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _first(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
  p.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--train-length", type=int, default=512)
  p.add_argument("--parts", default="generation,prefill,train")
  args = p.parse_args(argv)
  parts = set(args.parts.split(","))

  import jax
  import jax.numpy as jnp
  import torch
  from transformers import LlamaForCausalLM

  from benchmarks.timing import interleaved
  from experiments.real_model import smollm2_gguf
  from rise_jax import chat, gguf, sharding
  from rise_jax.models import load_hf_checkpoint
  from rise_jax.sampling.engine import Engine
  from rise_jax.sampling.requests import Request
  from rise_jax.tasks.prompts import get_prompt_set

  torch.set_num_threads(os.cpu_count())
  directory = gguf.as_hf_dir(smollm2_gguf())
  tok = chat.load_tokenizer(directory)
  ref = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  model = load_hf_checkpoint(directory, dtype="float32", scan_layers=True)
  prompts_all = [json.loads(line)["question"] for line in
                 open(REPO.parent / "shared/data/gsm8k/test.jsonl", encoding="utf-8")][:max(args.batches)]
  ps = get_prompt_set("paper")
  ids_all = [chat.render(tok, ps.initial_messages(q), add_generation_prompt=True).ids for q in prompts_all]
  print(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "load_average": os.getloadavg(),
                    "prompt_tokens": [min(map(len, ids_all)), max(map(len, ids_all))]}), flush=True)

  for batch in args.batches:
    ids = ids_all[:batch]
    width = max(map(len, ids))
    padded = np.array([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = (np.arange(width)[None] >= (width - np.array([len(x) for x in ids]))[:, None]).astype(np.int64)
    if "generation" in parts:
      engine = Engine(model, slots=batch, max_seq_len=1024)

      def run_engine():
        engine.forget_prefix_cache()  # every repetition pays its own prefill
        outs = engine.run([Request(x, uid=i, max_new_tokens=args.new, temperature=0.0) for i, x in enumerate(ids)])
        assert all(len(o[0].token_ids) == args.new for o in outs)

      def run_torch():
        with torch.no_grad():
          out = ref.generate(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
        assert out.shape[1] == width + args.new

      fns = {"engine": run_engine, "transformers": run_torch}
      first = {k: _first(f) for k, f in fns.items()}
      med = interleaved(fns, args.reps)
      tokens = batch * args.new
      print(json.dumps({"part": "generation", "batch": batch, "new_tokens": args.new, "first_call_s": first,
                        "median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
                        "engine_vs_transformers": med["transformers"] / med["engine"]}), flush=True)
    if "prefill" in parts:
      forward = jax.jit(lambda m, x, a: m(x, attention_mask=a))
      x, a = jnp.asarray(padded), jnp.asarray(mask.astype(bool))
      unrolled = load_hf_checkpoint(directory, dtype="float32", scan_layers=False)  # is the scan the cost?

      def theirs():
        with torch.no_grad():
          ref(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask))

      hidden = jax.jit(lambda m, x, a: m.hidden(x, attention_mask=a))
      unembed = jax.jit(lambda m, h: m.unembed(h))
      h = hidden(model, x, a)
      th = torch.as_tensor(np.asarray(h))

      def their_layers():
        with torch.no_grad():
          ref.model(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask))

      def their_unembed():
        with torch.no_grad():
          ref.lm_head(th)

      fns = {"rise_jax": lambda: jax.block_until_ready(forward(model, x, a)),
             "rise_jax_unrolled": lambda: jax.block_until_ready(forward(unrolled, x, a)), "torch": theirs,
             "rise_jax_layers": lambda: jax.block_until_ready(hidden(model, x, a)), "torch_layers": their_layers,
             "rise_jax_unembed": lambda: jax.block_until_ready(unembed(model, h)), "torch_unembed": their_unembed}
      first = {k: _first(f) for k, f in fns.items()}
      med = interleaved(fns, args.reps)
      print(json.dumps({"part": "prefill", "batch": batch, "tokens": int(mask.sum()), "first_call_s": first,
                        "median_s": med, "rise_jax_vs_torch": med["torch"] / med["rise_jax"],
                        "unrolled_vs_torch": med["torch"] / med["rise_jax_unrolled"],
                        "layers_vs_torch": med["torch_layers"] / med["rise_jax_layers"],
                        "unembed_vs_torch": med["torch_unembed"] / med["rise_jax_unembed"]}), flush=True)
    if "matmul" in parts:
      c = model.config
      rng = np.random.default_rng(0)
      xs = rng.standard_normal((batch * 512, c.hidden_size), np.float32)
      w_in = [rng.standard_normal((c.hidden_size, c.intermediate_size), np.float32) * 0.02 for _ in range(2)]
      w_out = rng.standard_normal((c.intermediate_size, c.hidden_size), np.float32) * 0.02
      mlp = jax.jit(lambda x, g, u, d: ((x @ g) + (x @ u)) @ d)
      j_args = [jnp.asarray(v) for v in (xs, *w_in, w_out)]
      t_args = [torch.as_tensor(v) for v in (xs, *w_in, w_out)]

      def their_mlp():
        with torch.no_grad():
          x_, g, u, d = t_args
          ((x_ @ g) + (x_ @ u)) @ d

      fns = {"jax": lambda: jax.block_until_ready(mlp(*j_args)), "torch": their_mlp}
      first = {k: _first(f) for k, f in fns.items()}
      med = interleaved(fns, max(args.reps, 5))
      flops = 2 * xs.shape[0] * c.hidden_size * c.intermediate_size * 3
      print(json.dumps({"part": "matmul", "rows": xs.shape[0], "median_s": med,
                        "gflops": {k: flops / v / 1e9 for k, v in med.items()},
                        "jax_vs_torch": med["torch"] / med["jax"]}), flush=True)
  if "train" in parts:
    _train_rows(args, model, ref, tok, ids_all, jax, jnp, torch, sharding)
  return 0


def _train_rows(args, model, ref, tok, ids_all, jax, jnp, torch, sharding):
  """One AdamW step on B x L rows of real prompt tokens, every target trained, weights 1."""
  import types
  from benchmarks.timing import interleaved
  from rise_jax.train import optim, trainer as trainer_lib
  batch, length = min(args.batches), args.train_length
  rows = np.array([(x * (length // len(x) + 2))[:length + 1] for x in ids_all[:batch]], np.int32)
  cfg = types.SimpleNamespace(lr=1e-5, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, b1=0.9, b2=0.999,
                              eps=1e-8)
  tx, lr = optim.optimizer(cfg, 1000)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(model, mesh, tx, lr)
  state = {"s": trainer.initial_state(model, seed=0)}
  micro = {"input_ids": rows[None, :, :-1], "targets": rows[None, :, 1:],
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (1, batch, length)).copy(),
           "segment_ids": np.ones((1, batch, length), np.int32),
           "weights": np.full((1, batch, length), 1.0 / length, np.float32)}
  placed = jax.device_put(micro, trainer.batch_sharding)

  def ours():
    with jax.set_mesh(mesh):
      state["s"], metrics = trainer.step(state["s"], placed, jnp.float32(batch))
    jax.block_until_ready(metrics["loss"])

  opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, weight_decay=0.0, eps=1e-8)
  x, y = torch.as_tensor(rows[:, :-1], dtype=torch.long), torch.as_tensor(rows[:, 1:], dtype=torch.long)

  def theirs():
    opt.zero_grad(set_to_none=True)
    logits = ref(x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    opt.step()

  fns = {"rise_jax": ours, "torch": theirs}
  first = {k: _first(f) for k, f in fns.items()}
  med = interleaved(fns, args.reps)
  print(json.dumps({"part": "train_step", "batch": batch, "length": length, "first_call_s": first,
                    "median_s": med, "tokens_per_s": {k: batch * length / v for k, v in med.items()},
                    "rise_jax_vs_torch": med["torch"] / med["rise_jax"]}), flush=True)


if __name__ == "__main__":
  sys.exit(main())
