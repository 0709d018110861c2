"""The training state, the jitted sharded step, and the loop behind `train(...)` (the RISE loop's library call).

State (params, AdamW state, step, rng) is created directly in its training sharding: `jax.eval_shape` gives the
abstract state, the parameters' logical axes give their NamedShardings (the optimiser moments follow their
parameter), and a jitted init writes every leaf into its shard. The step is `jax.jit` with explicit in/out
shardings and the state donated; gradient accumulation is a `lax.scan` over the micro-batches inside the step,
with the loss normaliser of the whole global batch passed in (see `loss.py`), so micro-batching and sharding
cannot change the estimator. `steps` runs several optimiser steps in one device call (a `lax.scan` of the same
step over stacked batches): for a small model the per-call cost (dispatch, host batch assembly, the host
waiting) is comparable to the step itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import signal
import time
from typing import Any, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from rise_jax import chat
from rise_jax import config as config_lib
from rise_jax import files
from rise_jax import sharding as sharding_lib
from rise_jax.models import load_model
from rise_jax.models.hf_io import save_hf_checkpoint
from rise_jax.train import checkpoint as checkpoint_lib
from rise_jax.train import data as data_lib
from rise_jax.train import loss as loss_lib
from rise_jax.train import optim
from rise_jax.train import prefetch as prefetch_lib

log = logging.getLogger(__name__)

# The loss walks the vocabulary in chunks (recomputed in the backward) only when a micro-batch's full float32
# logits would exceed this many elements (2**26 = 256 MiB); below it one chunk is faster.
LOGITS_BUDGET = 2 ** 26
VOCAB_CHUNK = 8192
BATCH_SPEC = P(None, ("data", "fsdp"), None)        # [micro, rows, length]: rows over data x fsdp
CALL_SPEC = P(None, *BATCH_SPEC)                     # [steps, micro, rows, length]: one device call's batches
# steps_per_call=None: as many steps per call as fit this many training FLOPs (analytic), at most AUTO_MAX_STEPS;
# a step above it (a 7B model's) runs alone. Measured in benchmarks/train_loop.py (docs/benchmarks.md).
AUTO_CALL_FLOPS = 2e11
AUTO_MAX_STEPS = 32


class NonFiniteLossError(FloatingPointError):
  """The loss went NaN/inf; the run stopped and its last good checkpoint remains."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimiser updates applied
  params: Any              # pure dict of float32 arrays (nnx.to_pure_dict of the model's Params)
  opt_state: Any
  rng: jax.Array           # uint32 key data, advanced every step (for stochastic layers; saved for exact resume)


def unembedding(model) -> jax.Array:
  """The [embed, vocab] output matrix of a rise_jax Transformer (the transposed embedder when tied)."""
  if model.lm_head is None:
    return model.embedder[...].T
  return model.lm_head[...]


class Trainer:
  """Compiled init and step for one model, mesh and optimiser."""

  def __init__(self, model, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, *, packing: bool = False, vocab_chunk: int = VOCAB_CHUNK,
               on_indivisible: str = "replicate"):
    self.mesh, self.tx, self.lr_schedule = mesh, tx, lr_schedule
    self.packing, self.vocab_chunk = packing, vocab_chunk
    self.graphdef, params_state, self.rest = nnx.split(model, nnx.Param, ...)
    self.param_shardings = nnx.to_pure_dict(sharding_lib.state_shardings(
        params_state, mesh, sharding_lib.TRAIN_RULES, on_indivisible))
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, BATCH_SPEC)
    self.call_sharding = NamedSharding(mesh, CALL_SPEC)
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   nnx.to_pure_dict(params_state))
    abstract = jax.eval_shape(self._init, abstract_params, jax.ShapeDtypeStruct((2,), jnp.uint32))
    self.abstract_state = abstract  # shapes and dtypes only (rise_jax.train.memory compiles the step from it)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, self.param_shardings,
        transform_non_params=lambda _: self.replicated)
    self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=self.replicated)
    self.init = jax.jit(self._init, in_shardings=(self.param_shardings, self.replicated),
                        out_shardings=self.state_shardings)
    self.step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
                        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    self.steps = jax.jit(self._steps, in_shardings=(self.state_shardings, self.call_sharding, self.replicated),
                         out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    # The same gradients without the update (sharding checks, evaluation of a batch's loss).
    self.loss_and_grads = jax.jit(self._grads, in_shardings=(self.param_shardings, self.batch_sharding,
                                                             self.replicated),
                                  out_shardings=(self.param_shardings, self.replicated, self.replicated))

  def _init(self, params, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), rng=rng)

  def initial_state(self, model, seed: int) -> TrainState:
    """The state for `model`'s parameters (resharded to training shardings if they live elsewhere)."""
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.param_shardings)
    with jax.set_mesh(self.mesh):
      return self.init(params, jax.random.key_data(jax.random.key(seed)))

  def batch(self, plan_step: data_lib.StepPlan, examples, estimator: str, pad_id: int = 0):
    """(global batch arrays, host stats) of one planned step; this process materialises only its own rows."""
    shape = plan_step.shape
    local = data_lib.materialize(plan_step, examples, estimator, data_lib.host_rows(self.batch_sharding, shape),
                                 pad_id=pad_id)
    return (data_lib.global_batch(local, self.batch_sharding, shape),
            data_lib.step_stats(plan_step, examples, estimator))

  def call_batch(self, plan_steps: Sequence[data_lib.StepPlan], examples, estimator: str, pad_id: int = 0):
    """(stacked global batches [steps, micro, rows, length], normalizers [steps], host stats) of one device
    call (steps of one shape), this process materialising only its own rows."""
    shape = plan_steps[0].shape
    rows = data_lib.host_rows(self.batch_sharding, shape)
    local = [data_lib.materialize(s, examples, estimator, rows, pad_id=pad_id) for s in plan_steps]
    stacked = {k: np.stack([x[k] for x in local]) for k in local[0]}
    stats = [data_lib.step_stats(s, examples, estimator) for s in plan_steps]
    normalizers = jax.device_put(np.array([s.normalizer for s in stats], np.float32), self.replicated)
    return data_lib.global_batch(stacked, self.call_sharding, (len(plan_steps), *shape)), normalizers, stats

  def model(self, state: TrainState):
    """An nnx model view of the state's parameters."""
    return nnx.merge(self.graphdef, state.params, self.rest)

  def _loss(self, params, micro, normalizer):
    model = nnx.merge(self.graphdef, params, self.rest)
    # Padding (segment 0) is masked out explicitly: the model's causal mask compares positions, and a padding
    # token's position must never look like an earlier token of the row.
    hidden = model.hidden(micro["input_ids"], positions=micro["positions"],
                          attention_mask=micro["segment_ids"] > 0,
                          segment_ids=micro["segment_ids"] if self.packing else None)
    w = unembedding(model)
    tokens = micro["targets"].size
    chunk = w.shape[1] if tokens * w.shape[1] <= LOGITS_BUDGET else self.vocab_chunk
    return loss_lib.chunked_weighted_nll(hidden.astype(model.dtype), w, micro["targets"], micro["weights"],
                                         normalizer, vocab_chunk=chunk)

  def _grads(self, params, batch: dict[str, jax.Array], normalizer: jax.Array):
    """(grads, loss, sums) of the whole global batch: micro-batch gradients summed in a scan (float32)."""
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)

    def accumulate(carry, micro):
      grads, loss, sums = carry
      (micro_loss, micro_sums), micro_grads = grad_fn(params, micro, normalizer)
      grads = jax.tree.map(jnp.add, grads, micro_grads)
      return (grads, loss + micro_loss, jax.tree.map(jnp.add, sums, micro_sums)), None

    zeros = jax.tree.map(lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), s),
                         params, self.param_shardings)
    init = (zeros, jnp.zeros((), jnp.float32), {"correct_weight": jnp.zeros(()), "token_weight": jnp.zeros(())})
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, batch)
    return grads, loss, sums

  def _step(self, state: TrainState, batch: dict[str, jax.Array], normalizer: jax.Array):
    grads, loss, sums = self._grads(state.params, batch, normalizer)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = {"loss": loss, "accuracy": sums["correct_weight"] / jnp.maximum(sums["token_weight"], 1e-30),
               "grad_norm": optax.global_norm(grads), "lr": self.lr_schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  def _steps(self, state: TrainState, batches: dict[str, jax.Array], normalizers: jax.Array):
    """len(normalizers) optimiser steps in one call: metrics come back stacked [steps]."""
    return jax.lax.scan(lambda s, xs: self._step(s, *xs), state, (batches, normalizers))


def steps_per_call(requested: int | None, model_config, global_batch: int, length: int) -> int:
  """The configured steps per device call, or (None) as many as AUTO_CALL_FLOPS allows for this model."""
  if requested is not None:
    return requested
  flops = optim.train_flops_per_token(model_config, length) * global_batch * length
  return int(min(AUTO_MAX_STEPS, max(1, AUTO_CALL_FLOPS // flops)))


# ---------------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  out_dir: pathlib.Path
  model: Any                       # the trained nnx model (training shardings)
  steps: int
  resumed_from: int | None
  metrics: list[dict[str, Any]]    # one record per step run by this call
  encode_report: data_lib.EncodeReport
  hf_dir: pathlib.Path | None
  total_tokens: int = 0            # real input tokens of every step of the run, whichever call trained them
  stopped_early_at: int | None = None  # the step where Validation.stop_at ended training (None: all steps ran)


def initialize_distributed(cfg) -> None:
  """`jax.distributed.initialize` once, when the config asks for it (multi-host)."""
  d = cfg.distributed
  if not d.initialize or jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU processes exchange collectives over gloo (tests run two hosts on 127.0.0.1 this way).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                             process_id=d.process_id, initialization_timeout=120)


class _MetricsSink:
  """metrics.jsonl (append, truncated to the resumed step) and TensorBoard, on process 0 only."""

  def __init__(self, path: pathlib.Path, resume_step: int):
    self.path = path
    self.active = jax.process_index() == 0
    self.tb = None
    if not self.active:
      return
    if path.exists():  # drop lines a killed run wrote past its last checkpoint (they will be rerun) and a torn tail
      _truncate_log(path, resume_step)
    from tensorboardX import SummaryWriter  # imported here: only process 0 of a training run pays for it
    self.tb = SummaryWriter(str(path.parent / "tb"))

  def write(self, records: list[dict[str, Any]]):
    if not self.active:
      return
    files.append_jsonl(self.path, records)
    if self.tb is not None:
      for r in records:
        for k, v in r.items():
          if isinstance(v, (int, float)) and k != "step":
            self.tb.add_scalar(f"train/{k}", v, r["step"])
      self.tb.flush()

  def close(self):
    if self.tb is not None:  # its writer thread must stop before interpreter shutdown (an error on Python 3.12)
      self.tb.close()
      self.tb = None


class _StepLogger:
  """Holds each device call's on-device metrics (stacked over its steps) and, when told to flush (every
  `log_every` steps and before a save), fetches them in one transfer: checks the loss is finite, adds
  throughput, writes metrics.jsonl / TensorBoard / a log line and advances the progress bar. Not fetching
  every call keeps dispatch asynchronous."""

  FIELDS = ("loss", "accuracy", "grad_norm", "lr", "sum_weights", "examples", "trained_tokens", "tokens_per_s",
            "tflops_per_s", "mfu")

  def __init__(self, out_dir: pathlib.Path, model_config, total: int, start: int):
    self.sink = _MetricsSink(out_dir / "metrics.jsonl", start)
    self.model_config, self.total = model_config, total
    self.peak = optim.device_peak_flops()
    self.progress = _progress(total, start)
    self.pending: list[tuple[range, dict, list[data_lib.StepStats], list[int]]] = []
    self.history: list[dict[str, Any]] = []
    self.last_time = time.perf_counter()

  def add(self, steps: range, metrics: dict, stats: list[data_lib.StepStats], lengths: list[int]):
    """One call's steps (0-based), its stacked metrics [len(steps)], and each step's stats and planned length."""
    self.pending.append((steps, metrics, stats, lengths))

  def flush(self, ckpt: checkpoint_lib.Checkpointer):
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _, _ in self.pending])
    now = time.perf_counter()
    elapsed, self.last_time = now - self.last_time, now
    records, tokens, flops = [], 0, 0.0
    for (steps, _, stats, lengths), m in zip(self.pending, fetched):
      for j, (step, st, length) in enumerate(zip(steps, stats, lengths)):
        loss = float(m["loss"][j])
        if not math.isfinite(loss):
          ckpt.wait()
          good = ckpt.steps()
          raise NonFiniteLossError(f"loss is {loss} at step {step + 1}; stopping. The last good checkpoint "
                                   f"is {ckpt.directory}/{good[-1] if good else '(none)'}")
        records.append({"step": step + 1, "loss": loss, "accuracy": float(m["accuracy"][j]),
                        "grad_norm": float(m["grad_norm"][j]), "lr": float(m["lr"][j]),
                        "sum_weights": st.sum_weights, "examples": st.examples,
                        "trained_tokens": st.trained_tokens, "tokens": st.tokens})
        # Throughput over the interval (the first one includes compilation); FLOPs at each step's planned length.
        tokens += st.tokens
        flops += st.tokens * optim.train_flops_per_token(self.model_config, length)
    last = records[-1]
    last.update(tokens_per_s=tokens / elapsed, tflops_per_s=flops / elapsed / 1e12)
    if self.peak is not None:
      last["mfu"] = flops / elapsed / (self.peak * jax.device_count())
    self.sink.write(records)
    self.history.extend(records)
    self.progress.update(len(records))
    self.progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
    if jax.process_index() == 0:  # the log (and metrics.jsonl); the terminal has the progress bar's loss
      log.info(" | ".join([f"step {last['step']}/{self.total}"] +
                          [f"{k} {last[k]:.4g}" for k in self.FIELDS if k in last]))
    self.pending.clear()

  def close(self):
    self.progress.close()
    self.sink.close()


def _fingerprint(examples, cfg) -> str:
  """What fixes the batch plan: a resumed run must see the same data in the same order."""
  t = cfg.train
  h = hashlib.sha256()
  h.update(json.dumps([cfg.seed, t.global_batch, t.micro_batch, t.epochs, t.max_length, t.packing,
                       t.estimator]).encode())
  for ex in examples:
    h.update(ex.id.encode())
    h.update(ex.input_ids.tobytes())
    h.update(np.float64(ex.weight).tobytes())
  return h.hexdigest()[:16]


# The settings a resumed run must share with its checkpoint, beyond the data: the batch plan's and the
# optimiser's (a resume with another lr would otherwise "train" on with the old run's state).
RESUME_SETTINGS = ("global_batch", "micro_batch", "epochs", "max_length", "packing", "estimator", "lr",
                   "warmup_ratio", "weight_decay", "max_grad_norm", "b1", "b2", "eps")


def resume_settings(cfg) -> dict[str, Any]:
  return {"seed": cfg.seed, **{f"train.{k}": cfg.train[k] for k in RESUME_SETTINGS}}


def check_resume_settings(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
  """Refuse a checkpoint trained with other settings, naming each differing field (older checkpoints recorded
  none: their data fingerprint is all there is to check)."""
  if saved is None:
    return
  differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if differ:
    changes = ", ".join(f"{k} ({saved.get(k)!r} there, {current.get(k)!r} now)" for k in differ)
    raise ValueError(f"{where} was trained with other settings; differing fields: {changes}. Use a fresh out_dir, "
                     "or the original settings to resume.")


@dataclasses.dataclass(frozen=True)
class Validation:
  """Held-out validation during training: `score(model)` (higher is better, e.g. dev accuracy) every `every`
  steps, written to validation.jsonl; with `stop_at`, training ends at the first score >= stop_at (that step's
  state is checkpointed and exported, and a resumed run does not train past it)."""
  every: int
  score: Any                  # Callable[[nnx model], float]; deterministic, so a resumed run scores the same
  stop_at: float | None = None

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f"Validation.every must be >= 1, got {self.every}")


def train(cfg, records_or_path: str | os.PathLike | Iterable[Any], out_dir: str | os.PathLike, model=None,
          tokenizer=None, *, export_hf: bool = True, validation: Validation | None = None,
          stop_after_step: int | None = None) -> TrainResult:
  """Train `model` (or the config's model) on sft/1 records; write ckpt/, metrics.jsonl and hf/ under out_dir.

  Resumes from out_dir/ckpt when it holds a checkpoint (params, optimiser, step, rng, data position). Raises
  `NonFiniteLossError` when the loss goes non-finite (checked every `log_every` steps and before each save).
  `export_hf=False` skips the hf/ export (which imports transformers).
  `stop_after_step=N` (the `debug.stop_after` hook) SIGKILLs the process right after step N's checkpoint commits
  (a preemption at the worst moment, for resume tests). `validation`: held-out scoring every N steps, optionally
  stopping early.
  `cfg` is validated by the caller, once per process after `initialize_distributed` (the `rise_jax.train` command,
  the RISE loop), not here: the loop trains several stages per run.
  """
  out_dir = pathlib.Path(out_dir)
  records = _records(records_or_path)  # every record checked before the run directory is touched
  # Process 0 writes the shared files, so it alone holds the directory's lock.
  with files.RunLock(out_dir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(cfg, records, out_dir, model, tokenizer, export_hf, validation, stop_after_step)


def _train(cfg, records, out_dir: pathlib.Path, model, tokenizer, export_hf: bool,
           validation: Validation | None, stop_after: int | None) -> TrainResult:
  t = cfg.train
  settings = resume_settings(cfg)
  latest = checkpoint_lib.latest_meta(out_dir / "ckpt")
  if latest is not None:  # refused before the model is loaded (minutes at 7B)
    check_resume_settings(latest[1].get("settings"), settings, f"{(out_dir / 'ckpt').absolute()}/{latest[0]}")
  out_dir.mkdir(parents=True, exist_ok=True)
  if tokenizer is None:
    tokenizer = chat.resolve_tokenizer(**config_lib.tokenizer_args(cfg))  # no toy build: the loop passes its own
  examples, report = _examples(cfg, records, tokenizer, out_dir)

  mesh = sharding_lib.make_mesh(cfg.mesh.train)
  row_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
  steps = data_lib.plan([e.length for e in examples], epochs=t.epochs, seed=cfg.seed,
                        global_batch=t.global_batch, micro_batch=t.micro_batch, row_multiple=row_multiple,
                        max_length=t.max_length, packing=t.packing, buckets_per_octave=t.buckets_per_octave)
  total = len(steps)
  if model is None:
    model = load_model(cfg.model, mesh=mesh, on_indivisible=cfg.mesh.on_indivisible, seed=cfg.seed)
  # An id past the embedding table gathers garbage (NaN on GPU): refused here, not as "loss is nan at step 1".
  chat.check_vocab(tokenizer, model.config)
  optim.check_param_dtypes(nnx.state(model, nnx.Param), t.allow_bf16_params)
  tx, lr = optim.optimizer(t, total)
  trainer = Trainer(model, mesh, tx, lr, packing=t.packing, on_indivisible=cfg.mesh.on_indivisible)
  state = trainer.initial_state(model, cfg.seed)
  del model  # the state owns the parameters from here (the step donates them)

  fingerprint = _fingerprint(examples, cfg)
  ckpt = checkpoint_lib.Checkpointer(out_dir / "ckpt", every=t.ckpt_every, keep=t.keep)
  restored = ckpt.restore_latest(checkpoint_lib.abstract_like(state))
  start, resumed_from, stopped_early = 0, None, False
  if restored is not None:
    start, state, meta = restored
    stopped_early = bool(meta.get("early_stop"))
    if meta["fingerprint"] != fingerprint:
      raise ValueError(f"{ckpt.directory}/{start} was written for different data or batch settings "
                       f"(fingerprint {meta['fingerprint']} != {fingerprint}); use a fresh out_dir")
    resumed_from = start
    log.info("resumed from step %d of %d", start, total)

  model_config = trainer.model(state).config
  logger = _StepLogger(out_dir, model_config, total, start)
  profile = tuple(t.profile_steps) if t.profile_steps is not None else None
  per_call = steps_per_call(t.steps_per_call, model_config, t.global_batch, max(s.length for s in steps))
  # A call ends at every checkpoint step (and the stop / profile steps): the state exists there.
  boundaries = [*range(t.ckpt_every, total, t.ckpt_every), *(profile or ()), *([stop_after] if stop_after else []),
                *(range(validation.every, total, validation.every) if validation else ())]
  calls = [] if stopped_early else data_lib.chunk_plan(steps, start, per_call, boundaries)
  done, stop_now = start, False
  validation_log = _ValidationLog(out_dir / "validation.jsonl", start) if validation else None
  log.info("%d steps in %d device calls (at most %d steps per call)", total - start, len(calls), per_call)
  # Several processes assemble global arrays on the main thread: a background thread's cross-process transfers
  # racing the step's collectives stalled a host (a heartbeat timeout in 1 of ~4 two-process runs).
  batches = prefetch_lib.prefetch(calls, lambda c: trainer.call_batch([steps[i] for i in c], examples,
                                                                      t.estimator),
                                  depth=2 if jax.process_count() == 1 else 0)
  try:
    for call, (batch, normalizers, stats) in zip(calls, batches):
      if profile is not None and call.start == profile[0]:
        jax.profiler.start_trace(str(out_dir / "profile"))
      with jax.set_mesh(mesh):
        state, metrics = trainer.steps(state, batch, normalizers)
      done = call.stop
      logger.add(call, metrics, stats, [steps[i].length for i in call])
      if profile is not None and done == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      stop_now = False
      if validation is not None and (done % validation.every == 0 or done == total):
        score = float(validation.score(trainer.model(state)))
        stop_now = validation.stop_at is not None and score >= validation.stop_at and done < total
        validation_log.write({"step": done, "score": score, "stop": stop_now})
      save_due = done % t.ckpt_every == 0 or done == total or stop_now
      if done // t.log_every > call.start // t.log_every or save_due:
        logger.flush(ckpt)  # also the non-finite check: a bad state is never saved
      if save_due:
        ckpt.save(done, state, {"step": done, "fingerprint": fingerprint, "total_steps": total,
                                "settings": settings, "early_stop": stop_now}, force=True)
      if stop_now:
        log.info("validation score %.4f >= %s at step %d of %d: training stops here", score, validation.stop_at,
                 done, total)
        break
      if stop_after is not None and done == stop_after:
        ckpt.wait()
        print(f"debug.stop_after: step {done} checkpoint committed; SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    logger.flush(ckpt)
  finally:
    batches.close()
    logger.close()
    ckpt.close()

  trained = trainer.model(state)
  hf_dir = None
  if export_hf:
    hf_dir = out_dir / "hf"
    save_hf_checkpoint(trained, hf_dir, tokenizer=tokenizer, overwrite=True)  # ChatTokenizer.hf has the template
  stopped_at = start if stopped_early else (done if stop_now else None)
  total_tokens = sum(examples[i].length for s in steps[:stopped_at or total] for i in s.example_ids)
  return TrainResult(out_dir, trained, total, resumed_from, logger.history, report, hf_dir, total_tokens,
                     stopped_at)


def _truncate_log(path: pathlib.Path, resume_step: int) -> None:
  """Keep the lines of steps <= resume_step; a torn last line (a crash mid-append) is counted and dropped."""
  records, torn = files.read_jsonl(path)
  for number, r in enumerate(records, start=1):
    if not isinstance(r.get("step"), int):
      raise files.JsonlError(f"{path}: record {number}: field 'step': expected an int, got {r.get('step')!r:.40}")
  if torn:
    log.warning("%s: dropped a torn last line (a crash mid-write); its step is rerun", path)
  files.rewrite_jsonl(path, [r for r in records if r["step"] <= resume_step])


class _ValidationLog:
  """validation.jsonl on process 0: one line per validation, lines past a resumed step dropped (rerun)."""

  def __init__(self, path: pathlib.Path, resume_step: int):
    self.path = path
    self.active = jax.process_index() == 0
    if self.active and path.exists():
      _truncate_log(path, resume_step)

  def write(self, record: dict[str, Any]) -> None:
    if self.active:
      files.append_jsonl(self.path, [record])  # fsynced: an early stop's score must survive a node crash
      log.info("validation at step %d: %.4f", record["step"], record["score"])


def _records(records_or_path) -> list[data_lib.Record]:
  """Validated records (all or nothing: a malformed record fails before anything is written)."""
  source = os.fspath(records_or_path) if isinstance(records_or_path, os.PathLike) else records_or_path
  records = data_lib.as_records(source)
  data_lib.check_weights(records, source if isinstance(source, str) else "the training records")
  return records


def _examples(cfg, records, tokenizer, out_dir: pathlib.Path):
  """Rendered examples of validated records; data_report.json says what tokenisation skipped."""
  t = cfg.train
  examples, report = data_lib.encode_records(records, tokenizer, t.max_length, t.on_truncation)
  log.info("training data: %s", report.summary())
  if jax.process_index() == 0:
    files.atomic_write_json(out_dir / "data_report.json", {"total": report.total, "kept": report.kept,
                                                 "skipped": report.skipped})
  if not examples:
    raise ValueError(f"no trainable examples: {report.summary()}")
  return examples, report


def _progress(total: int, start: int):
  return tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
              dynamic_ncols=True)

