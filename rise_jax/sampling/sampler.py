"""`Sampler`: batched, jitted, multi-turn generation over an explicit KV cache.

    sampler = Sampler(model, tokenizer, max_cache_length=4096, mesh=None)
    outs = sampler.generate(prompts, SamplingParams(max_new_tokens=512, n=4), seed=0, prompt_ids=ids)
    outs[i][j].token_ids / .text / .logprobs / .finish_reason      # sample j of prompt i

A prompt is a token-id list or a chat message list (rendered by the chat layer with the generation prompt).

Multi-turn continuation. Every sample carries a `Conversation` handle: the token ids it holds (prompt + reply,
the reply's end-of-turn token included) and the cache row that holds them. To continue, build the next
messages (append the reply and the feedback turn; window them if the protocol says so) and pass the handles
back, one per prompt:

    nxt = sampler.generate(next_messages, params, seed=0, prompt_ids=ids,
                           history=[outs[i][chosen_i].conversation for i in ...])

The sampler renders the new messages, checks that the ids it holds are a prefix of them (the chat layer's prefix
property), keeps the longest common prefix in the cache and prefills only the rest: the next user turn when the
property holds, or everything from the first differing token when it does not (a windowed history, a reply
that re-tokenises differently) — such rows are counted in `sampler.stats["reprefill_rows"]` and logged. The
output is the same as prefilling the new ids from scratch, token for token. A handle keeps its batch's cache
alive; drop the outputs of a turn you will not continue to free it.

Randomness. Token s of sample j of prompt `uid` is drawn with the key fold_in(seed, uid, j, position) where
position is the token's index in its conversation: reproducible, independent of batch composition, bucket and
padding (a resumed run regenerates exactly what an uninterrupted one would), and a continued conversation
draws what a re-prefilled one would. `uid` is `prompt_ids[i]` (any int or str) or the index in the call.

Shapes. Prompt chunks, batch sizes, cache lengths and token buffers are padded to powers of two, so a long run
compiles a bounded number of times; temperature, top-k, top-p, seed, n and max_new_tokens are traced values.
`sampler.compile_counts()` reports the jit cache sizes. Rows are spread over the mesh's data and fsdp axes
(batch padded to their product, padded rows discarded), heads over tensor; sampling weights are resharded
once (no FSDP: gathered once, not per token).

Device layout of a row's cache (see `loop.py`): conversation token i sits in slot i; a turn appends after the
previous one; nothing is left-padded, so the cache holds exactly the conversation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rise_jax import sharding as sharding_lib
from rise_jax.config import ON_OVERFLOW
from rise_jax.models.transformer import KVCache, cache_shardings, init_cache
from rise_jax.sampling import loop
from rise_jax.sampling import select
from rise_jax.sampling.params import SamplingParams

log = logging.getLogger(__name__)

MIN_CHUNK = 16        # smallest prompt-chunk bucket (smaller ones appear only right at a full cache)
MIN_TOKENS = 16       # smallest token-buffer bucket
MIN_CACHE = 64        # smallest cache-length bucket
STOP_SLOTS = 8        # stop-id array size bucket


def pow2_at_least(x: int, floor: int = 1) -> int:
  """The smallest power of two >= x and >= floor (the shape buckets of the sampler and the engine)."""
  return max(floor, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def _row_bucket(rows: int) -> int:
  """Rows padded to a power of two, or above 256 to a multiple of an eighth of one: 4 buckets per octave, so a
  batch of 10,000 rows runs as 10,240 rather than 16,384 (decode time is linear in rows) at most 4x the compiles."""
  p = pow2_at_least(rows)
  if p <= 256:
    return p
  step = p // 8
  return -(-rows // step) * step


class _CacheStore:
  """One generate call's device cache, shared by the `Conversation`s of its rows (freed with the last one)."""

  def __init__(self, cache: KVCache, sampler_id: int):
    self.cache = cache
    self.sampler_id = sampler_id


@dataclasses.dataclass(frozen=True, eq=False)
class Conversation:
  """A conversation held in a sampler's KV cache: pass it back to `generate(history=...)` to continue it.

  token_ids: every token of the conversation so far (prompt and reply); `cached` of them are in the cache (the
  reply's last token is sampled but not fed yet).
  """
  token_ids: tuple[int, ...]
  cached: int
  _store: _CacheStore = dataclasses.field(repr=False)
  _row: int = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SampleOutput:
  """One sample. `logprobs[t]` = log-softmax of the raw logits at token_ids[t]; `prompt_tokens` = ids before it."""
  token_ids: list[int]
  text: str | None
  logprobs: np.ndarray
  finish_reason: str
  prompt_tokens: int
  sampling_logprobs: np.ndarray | None = None
  conversation: Conversation | None = dataclasses.field(default=None, repr=False)

  @property
  def logprob_sum(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


@dataclasses.dataclass
class _Row:
  """Host bookkeeping of one prompt in a call."""
  index: int
  uid: Any
  target: list[int]                # the full prompt ids this turn
  keep: int = 0                    # tokens reused from the cache
  source: Conversation | None = None
  fits: bool = True                # False: the prompt alone exceeds the capacity (report mode)


def _generation_config_eos(path) -> tuple[int, ...]:
  """`eos_token_id` of a generation_config.json (a file or a checkpoint directory); () when there is none."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "generation_config.json"
  if not path.is_file():
    return ()
  eos = json.loads(path.read_text()).get("eos_token_id")
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, list) else (int(eos),)


def swapped_params(params, model_or_state, shardings, who: str):
  """New weights in the layout of `params` (same structure and shapes, cast to its dtypes, placed by
  `shardings`): a generator's compiled programs keep working, only values change."""
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  old, new = jax.tree.structure(params), jax.tree.structure(state)
  if old != new:
    raise ValueError(f"{who}: the new state's structure differs from the model's ({new} vs {old})")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state)):
    if a.shape != b.shape:
      raise ValueError(f"{who}: a leaf of shape {b.shape} replaces one of shape {a.shape}")
  # Training may keep float32 masters while sampling runs in bfloat16: cast to the generator's dtypes.
  state = jax.tree.map(lambda new, old: new.astype(old.dtype) if new.dtype != old.dtype else new, state, params)
  return jax.device_put(state, shardings)


def default_stop_ids(model_config, tokenizer=None, generation_config=None) -> tuple[int, ...]:
  """What `stop_token_ids=None` means: the tokenizer's EOS ids (the model's without a tokenizer) plus the
  `eos_token_id` of `generation_config` (a checkpoint directory or generation_config.json; by default the
  tokenizer's directory), deduplicated in order."""
  ids = list(model_config.eos_token_id) if tokenizer is None else list(tokenizer.eos_token_ids)
  where = generation_config
  if where is None and tokenizer is not None and getattr(tokenizer, "source", None) is not None:
    where = tokenizer.source
  if where is not None:
    ids += _generation_config_eos(where)
  return tuple(dict.fromkeys(int(i) for i in ids))


def vocab_limit(tokenizer, model_config) -> int | None:
  """Ids >= this are never sampled: a model vocabulary padded past the tokenizer's (the toy model: 128 vs 103)
  must never emit a non-token. None when the tokenizer covers the model's vocabulary (or is absent)."""
  tokenizer_vocab = getattr(tokenizer, "vocab_size", None)
  return tokenizer_vocab if tokenizer_vocab and tokenizer_vocab < model_config.vocab_size else None


def reply_text(tokenizer, ids: Sequence[int], finish_reason: str) -> str:
  """A sample's `.text`: its ids decoded, without the sampled stop token that ends a "stop" sample."""
  return tokenizer.decode(list(ids[:-1]) if finish_reason == "stop" else list(ids))


class Sampler:
  """Batched multi-turn sampling for a `rise_jax.models.Transformer` (see the module docstring)."""

  def __init__(self, model: nnx.Module, tokenizer=None, *, max_cache_length: int, mesh=None,
               on_overflow: str = "raise", prefill_chunk: int = 512, generation_config=None,
               rules=sharding_lib.SAMPLE_RULES):
    """
    Args:
      model: the Transformer (any sharding; its weights are resharded to the sampling layout).
      tokenizer: a `rise_jax.chat` ChatTokenizer; None when prompts are token ids (then `.text` is None).
      max_cache_length: the most tokens one conversation may hold (prompt + reply), also capped by the
        model's max_position_embeddings.
      mesh: a ('data', 'fsdp', 'tensor') mesh; None = one device.
      on_overflow: "raise" when a prompt + max_new_tokens cannot fit, or "report": decode until the cache is
        full and return finish_reason "cache_full".
      prefill_chunk: the longest prompt chunk prefilled in one call (bounds prefill activations).
      generation_config: a checkpoint directory or generation_config.json whose eos ids join the default stop
        ids; by default the tokenizer's directory is searched.
    """
    if on_overflow not in ON_OVERFLOW:
      raise ValueError(f"Sampler.on_overflow: {on_overflow!r} is not one of {ON_OVERFLOW}")
    if prefill_chunk < MIN_CHUNK or prefill_chunk & (prefill_chunk - 1):
      raise ValueError(f"Sampler.prefill_chunk: must be a power of two >= {MIN_CHUNK}, got {prefill_chunk}")
    self.model_config = model.config
    self.tokenizer = tokenizer
    self.mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
    self.rules = rules
    self.on_overflow = on_overflow
    self.prefill_chunk = prefill_chunk
    self.capacity = min(int(max_cache_length), self.model_config.max_position_embeddings)
    if self.capacity < 2:
      raise ValueError(f"Sampler.max_cache_length: {max_cache_length} leaves no room to generate")
    self.max_cache_length = int(max_cache_length)
    self.batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self._cache_dtype = model.dtype
    self.graphdef, state = nnx.split(model)
    self._param_shardings = sharding_lib.state_shardings(state, self.mesh, rules)
    self._params = jax.device_put(state, self._param_shardings)
    self._row_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._default_stop_ids = default_stop_ids(self.model_config, tokenizer, generation_config)
    self.stats: collections.Counter = collections.Counter()

    self._vocab_limit = vocab_limit(tokenizer, self.model_config)
    merge = lambda params: nnx.merge(self.graphdef, params)
    self._extend_jit = jax.jit(lambda p, *a: self._constrain(loop.extend(merge(p), *a)), donate_argnums=(1, 5))
    self._decode_jit = jax.jit(
        lambda p, *a, max_tokens: self._constrain(loop.decode(merge(p), *a, max_tokens, self._vocab_limit)),
        static_argnames=("max_tokens",), donate_argnums=(1,))
    self._gather_jit = jax.jit(lambda c, h, r: self._constrain(loop.gather_rows(c, h, r)))
    self._resize_jit = jax.jit(lambda c, length: self._constrain(loop.resize(c, length)), static_argnums=1)
    self._init_jit = jax.jit(lambda batch, length: self._constrain(
        init_cache(self.model_config, batch, length, self._cache_dtype)), static_argnums=(0, 1))

  # -- layout ------------------------------------------------------------------------------------------------

  def _constrain(self, tree):
    """Pin every KVCache in `tree` to the sampling layout (rows over data/fsdp, kv heads over tensor)."""
    def one(x):
      if isinstance(x, KVCache):
        return jax.lax.with_sharding_constraint(x, cache_shardings(x, self.mesh, self.rules))
      return x
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))

  def _rows(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, self._row_sharding)

  def update_params(self, model_or_state) -> None:
    """Swap in new weights (e.g. after a training iteration), resharded to the sampling layout.

    The compiled prefill/decode functions are reused: only values change, never shapes or structure. Leaves are
    cast to the sampler's dtypes (float32 training masters -> bfloat16 sampling weights).
    """
    self._params = swapped_params(self._params, model_or_state, self._param_shardings, "Sampler.update_params")

  def compile_counts(self) -> dict[str, int]:
    """Entries in each jitted function's compilation cache (bounded by the number of buckets used)."""
    jits = dict(extend=self._extend_jit, decode=self._decode_jit, gather=self._gather_jit,
                resize=self._resize_jit, init=self._init_jit)
    return {name: f._cache_size() for name, f in jits.items()}

  # -- prompts and stops ---------------------------------------------------------------------------------------

  def _prompt_ids(self, prompt, index: int) -> list[int]:
    if isinstance(prompt, np.ndarray):
      prompt = prompt.tolist()
    if len(prompt) and isinstance(prompt[0], dict):
      if self.tokenizer is None:
        raise ValueError(f"prompt {index}: chat messages need a tokenizer (Sampler(model, tokenizer, ...))")
      return list(self.tokenizer.render(prompt, add_generation_prompt=True).ids)
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError(f"prompt {index}: empty prompt")
    bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
    if bad:
      raise ValueError(f"prompt {index}: token ids {bad[:5]} outside the vocabulary [0, "
                       f"{self.model_config.vocab_size})")
    return ids

  def _stops(self, params: SamplingParams) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop ids, stop strings applied after the loop): single-token stop strings join the ids."""
    ids = list(self._default_stop_ids if params.stop_token_ids is None else params.stop_token_ids)
    strings = []
    for s in params.stop_strings:
      if self.tokenizer is None:
        raise ValueError("SamplingParams.stop_strings need a tokenizer")
      encoded = self.tokenizer.encode(s)
      if len(encoded) == 1:
        ids.append(encoded[0])
      else:
        strings.append(s)
    return tuple(dict.fromkeys(ids)), tuple(strings)

  # -- generate ----------------------------------------------------------------------------------------------

  def generate(self, prompts: Sequence, params: SamplingParams | None = None, seed: int = 0,
               prompt_ids: Sequence | None = None,
               history: Sequence[Conversation | None] | None = None) -> list[list[SampleOutput]]:
    """Sample `params.n` continuations of every prompt; `outs[i][j]` is sample j of prompt i.

    Args:
      prompts: token-id lists, or chat message lists (rendered with the generation prompt).
      params: SamplingParams (default: SamplingParams()).
      seed: the run's seed (see the module docstring for the key derivation).
      prompt_ids: stable per-prompt ids (ints or strs) for the randomness; default the index in the call.
      history: per prompt, the `Conversation` this prompt continues (or None for a fresh one).
    """
    params = SamplingParams() if params is None else params
    if prompt_ids is not None and len(prompt_ids) != len(prompts):
      raise ValueError(f"prompt_ids has {len(prompt_ids)} entries for {len(prompts)} prompts")
    if history is not None and len(history) != len(prompts):
      raise ValueError(f"history has {len(history)} entries for {len(prompts)} prompts")
    if not len(prompts):
      return []
    rows = [_Row(i, i if prompt_ids is None else prompt_ids[i], self._prompt_ids(p, i))
            for i, p in enumerate(prompts)]
    for row in rows:
      self._plan_reuse(row, None if history is None else history[row.index])
      self._check_fit(row, params.max_new_tokens)
    live = [r for r in rows if r.fits]
    samples = self._run(live, params, seed) if live else {}
    outs = []
    for row in rows:
      if not row.fits:
        empty = SampleOutput([], "" if self.tokenizer is not None else None, np.zeros(0, np.float32),
                             "cache_full", len(row.target),
                             np.zeros(0, np.float32) if params.sampling_logprobs else None)
        outs.append([empty] * params.n)
      else:
        outs.append(samples[row.index])
    return outs

  def _plan_reuse(self, row: _Row, conversation: Conversation | None) -> None:
    """How much of `conversation`'s cache this prompt reuses: the common prefix, re-prefilling the rest."""
    if conversation is None:
      return
    if conversation._store.sampler_id != id(self):
      raise ValueError(f"prompt {row.index}: its history Conversation belongs to another Sampler")
    held, target = conversation.token_ids, row.target
    limit = min(len(held), len(target))
    mismatch = np.flatnonzero(np.asarray(held[:limit]) != np.asarray(target[:limit]))
    common = int(mismatch[0]) if mismatch.size else limit
    if common < len(held):
      self.stats["reprefill_rows"] += 1
      log.info("prompt %r: the held conversation is not a prefix of the new prompt (first difference at token %d "
               "of %d held); re-prefilling from there", row.uid, common, len(held))
    row.source = conversation
    # The last prompt token is always fed again: its logits start the reply.
    row.keep = min(common, conversation.cached, len(target) - 1)
    self.stats["reused_tokens"] += row.keep

  def _check_fit(self, row: _Row, max_new: int) -> None:
    need = len(row.target) + max_new
    if need <= self.capacity:
      return
    msg = (f"prompt {row.uid!r}: {len(row.target)} prompt tokens + max_new_tokens {max_new} = {need} exceeds the "
           f"capacity {self.capacity} (max_cache_length {self.max_cache_length}, max_position_embeddings "
           f"{self.model_config.max_position_embeddings})")
    if self.on_overflow == "raise":
      raise ValueError(msg + "; shorten the history or set on_overflow='report'")
    if len(row.target) + 1 > self.capacity:
      row.fits = False  # not even one reply token fits: reported as cache_full with no tokens
    log.warning("%s: decoding until the cache is full (finish_reason 'cache_full')", msg)

  def _batch_bucket(self, rows: int) -> int:
    return _row_bucket(math.ceil(rows / self.batch_shards)) * self.batch_shards

  def _cache_bucket(self, rows: list[_Row], max_new: int) -> int:
    need = max(min(len(r.target) + max_new, self.capacity) for r in rows)
    sources = {id(r.source._store): r.source._store.cache.positions.shape[1] for r in rows if r.source}
    return max(min(pow2_at_least(need, MIN_CACHE), self.capacity), *sources.values(), 0)

  def _source_cache(self, rows: list[_Row], batch: int, cache_len: int) -> KVCache:
    """The starting cache of this call's prompt rows: gathered from their conversations, or empty."""
    stores = list({id(r.source._store): r.source._store for r in rows if r.source}.values())
    if not stores:
      return self._init_jit(batch, cache_len)
    caches = [s.cache if s.cache.positions.shape[1] == cache_len else self._resize_jit(s.cache, cache_len)
              for s in stores]
    offsets = np.cumsum([0] + [c.end_index.shape[0] for c in caches])
    where = {id(s): int(o) for s, o in zip(stores, offsets)}
    index = np.zeros(batch, np.int32)  # fresh and padding rows take row 0 and roll back to keep = 0
    for slot, r in enumerate(rows):
      if r.source:
        index[slot] = where[id(r.source._store)] + r.source._row
    combined = caches[0] if len(caches) == 1 else jax.tree.map(
        lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim == 5 else 0), *caches)
    cache, _ = self._gather_jit(combined, None, self._rows(index))
    return cache

  def _prefill(self, rows: list[_Row], batch: int, cache_len: int) -> tuple[KVCache, jax.Array]:
    """Append each row's unseen prompt tokens in chunks; returns the cache and each row's last hidden state."""
    cache = self._source_cache(rows, batch, cache_len)
    pending = [r.target[r.keep:] for r in rows]
    keep = np.zeros(batch, np.int32)
    keep[:len(rows)] = [r.keep for r in rows]
    done = np.zeros(len(rows), np.int64)
    hidden = jax.device_put(np.zeros((batch, self.model_config.hidden_size), np.float32), self._row_sharding)
    self.stats["prefilled_tokens"] += sum(len(p) for p in pending)
    while True:
      left = np.zeros(batch, np.int64)
      left[:len(rows)] = [len(p) - d for p, d in zip(pending, done)]
      if not left.any():
        return cache, hidden
      width = min(pow2_at_least(int(left.max()), MIN_CHUNK), self.prefill_chunk)
      while int(keep.max()) + width > cache_len:  # a chunk's padded tail must fit in every row's cache
        width //= 2
      lengths = np.minimum(left, width).astype(np.int32)
      ids = np.zeros((batch, width), np.int32)
      for b, p in enumerate(pending):
        ids[b, :lengths[b]] = p[done[b]:done[b] + lengths[b]]
      cache, hidden = self._extend_jit(self._params, cache, self._rows(ids), self._rows(lengths),
                                       self._rows(keep), hidden)
      # New arrays, never in-place: a host buffer handed to an async dispatch may still be read.
      keep = keep + lengths
      done = done + lengths[:len(rows)]

  def _run(self, rows: list[_Row], params: SamplingParams, seed: int) -> dict[int, list[SampleOutput]]:
    n = params.n
    stop_ids, stop_strings = self._stops(params)
    cache_len = self._cache_bucket(rows, params.max_new_tokens)
    prefill_batch = self._batch_bucket(len(rows))
    cache, hidden = self._prefill(rows, prefill_batch, cache_len)

    # n samples per prompt: copy each prefilled row n times (one prefill, never n).
    decode_rows = len(rows) * n
    batch = self._batch_bucket(decode_rows)
    source = np.zeros(batch, np.int32)
    source[:decode_rows] = np.repeat(np.arange(len(rows)), n)
    if n > 1 or batch != prefill_batch:
      cache, hidden = self._gather_jit(cache, hidden, self._rows(source))
    uids = np.zeros(batch, np.uint32)
    uids[:decode_rows] = np.repeat([select.uid_to_int(r.uid) for r in rows], n)
    sample_index = np.zeros(batch, np.int64)
    sample_index[:decode_rows] = np.tile(np.arange(n), len(rows))
    keys = jax.device_put(select.row_keys(seed, uids, sample_index), self._row_sharding)
    active = np.arange(batch) < decode_rows
    capacity = min(cache_len, self.capacity)
    stops = np.full(pow2_at_least(len(stop_ids), STOP_SLOTS), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    row_params = loop.RowParams(
        temperature=self._rows(np.full(batch, params.temperature, np.float32)),
        top_k=self._rows(np.full(batch, params.top_k, np.int32)),
        top_p=self._rows(np.full(batch, params.top_p, np.float32)),
        capacity=self._rows(np.full(batch, capacity, np.int32)),
        max_new=jax.device_put(np.int32(params.max_new_tokens), self._replicated),
        stop_ids=jax.device_put(stops, self._replicated))
    state = self._decode_jit(self._params, cache, hidden, keys, row_params, self._rows(active),
                             max_tokens=pow2_at_least(params.max_new_tokens, MIN_TOKENS))
    tokens, logprobs, sampling_lp, finish, steps, ends = jax.device_get(
        (state.tokens, state.logprobs, state.sampling_logprobs, state.finish, state.step, state.cache.end_index))
    store = _CacheStore(state.cache, id(self))
    self.stats["generate_calls"] += 1
    self.stats["decode_steps"] += int(steps)

    out: dict[int, list[SampleOutput]] = {}
    for k, row in enumerate(rows):
      samples = []
      for j in range(n):
        b = k * n + j
        samples.append(self._sample_output(row, b, tokens[b], logprobs[b], sampling_lp[b], int(finish[b]),
                                           int(ends[b]), store, stop_strings, params))
      out[row.index] = samples
    return out

  def _sample_output(self, row: _Row, b: int, tokens, logprobs, sampling_lp, finish: int, cached: int,
                     store: _CacheStore, stop_strings, params: SamplingParams) -> SampleOutput:
    if finish == loop.RUNNING:
      raise RuntimeError(f"prompt {row.uid!r}: the decode loop ended with a running row")
    length = cached - len(row.target) + 1  # the last sampled token is not fed yet
    ids = tokens[:length].tolist()
    reason = loop.FINISH_REASONS[finish]
    text = None
    if self.tokenizer is not None:
      text = reply_text(self.tokenizer, ids, reason)
      if stop_strings:
        ids, text, hit = self._apply_stop_strings(ids, text, stop_strings)
        reason = "stop" if hit else reason
        length = len(ids)
    conversation = Conversation(tuple(row.target) + tuple(ids), min(cached, len(row.target) + length), store, b)
    return SampleOutput(
        token_ids=ids, text=text, logprobs=np.asarray(logprobs[:length], np.float32), finish_reason=reason,
        prompt_tokens=len(row.target),
        sampling_logprobs=np.asarray(sampling_lp[:length], np.float32) if params.sampling_logprobs else None,
        conversation=conversation)

  def _apply_stop_strings(self, ids: list[int], text: str, stop_strings) -> tuple[list[int], str, bool]:
    """Cut text before the first stop string, ids after the token that completes it."""
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
      return ids, text, False
    at, s = min(hits)
    lo, hi = 1, len(ids)  # smallest prefix of ids whose text contains the stop string
    while lo < hi:
      mid = (lo + hi) // 2
      if s in self.tokenizer.decode(ids[:mid]):
        hi = mid
      else:
        lo = mid + 1
    return ids[:lo], text[:at], True
