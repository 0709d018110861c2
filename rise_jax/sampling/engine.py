"""`Engine`: continuous batching over a paged KV pool, one shared copy of each prompt's cache.

    engine = Engine(model, slots=64, max_seq_len=1024)
    outs = engine.run([Request(prompt_ids, uid="q17", n=16, max_new_tokens=300, temperature=1.0)], seed=0)
    outs[i][j].token_ids / .logprobs / .finish_reason          # sample j of request i

The project's one generator: the rollout policies, the pipeline, the CLIs, the notebook and the benchmarks
sample through it. A fixed set of `slots` decode rows runs jitted chunks of `chunk_steps` decode steps; each row
has its own token count, `max_new_tokens`, stops and capacity, and between chunks the host moves finished rows
out and prefills queued requests into the free slots, so the slots stay full (a static batch decodes until its
longest row finishes: on GSM8K-length replies ~40% of its decode slots produce a token).

Roles. `Engine` (here) holds the weights, the pool and the jitted device programs (`paged.py`: prefill with
first-token sampling, multi-step decode chunks) and checks requests; `EngineStream` (`scheduler.py`) is one open
queue and owns its state: queued requests, prefilled ones waiting for slots, the slots, the finished; `KVBlocks`
(`blocks.py`) accounts the pool's blocks per request and sample over a reference-counted `BlockTable`.

Memory. Keys and values live in a pool of `block_size`-token blocks (`paged.PagedPool`); a slot reads its
conversation through its row of the block table. A request's prompt is prefilled once into blocks its n samples
share (host reference counts free them with the last sample); only the partly filled last prompt block is copied
per sample (copy-on-write), so an extra sample costs its own tokens plus at most one block. Blocks are reserved
for a sample's whole budget (min(prompt + max_new, capacity) - 1 tokens) when it enters a slot, so a running row
never runs out of blocks (no preemption); a row that stops early returns the unused rest at once.

Guarantees. Token t of sample j of request `uid` is drawn with the key fold_in(seed, uid, j, position) and
`select`'s rule, so output does not depend on slot assignment, queue order or slot count; it equals a
re-forward of the whole sequence at every step (tests/reference_generator.py) token for token, and greedy
decoding equals transformers `generate` on real weights; log-probabilities agree to float32 rounding.
Overflow raises (`on_overflow="raise"`) or decodes to `cache_full` ("report"), never drops a request.

Shapes (compiles are bounded and counted by `compile_counts()`). A decode chunk runs the occupied slots packed
into the smallest of CHUNK_ROW_BUCKETS row buckets (slots, slots / 2, slots / 4, slots / 8) that holds them, with
the attention span bucketed by `scheduler.span_bucket` (powers of two of blocks from MIN_SPAN_TOKENS, quarter
octaves past FINE_SPAN_TOKENS): <= CHUNK_ROW_BUCKETS x (log2(max_blocks) + 1 + 3 x octaves past FINE_SPAN_TOKENS)
chunk programs. A prefill call is a (width, context) bucket: tail width a power of two >= the block size, cached
prefix a power of two of blocks (0 without one), at the most rows (a power of 4) with rows x width <=
prefill_tokens and rows x (context + width) <= scheduler.PREFILL_KEYS x prefill_tokens, so one program per bucket
met; the scheduler fills a call with the oldest queued request and the queued ones of its bucket. Its first-token
sampling is padded to a power of 4 >= max(16, rows) samples (one bucket per row bucket when n = 1).

Mesh: rows over data and fsdp, kv heads over tensor; the pool's blocks are replicated over data
(any slot may read any block), so each step's new keys and values reach every data shard.

Prefix cache (`prefix_cache=True`). Every full block is registered under a digest of its tokens and all before
them (`blocks.BlockTable`), prompts' blocks at prefill and each finished sample's reply blocks; a new request
takes the longest cached run of its prompt's blocks and prefills only the rest, attending to the cached keys and
values. Continuation of a conversation is therefore just a request for its next prompt: the previous turn's
prompt and reply come from the cache, and only the feedback is prefilled (equal to a re-prefill to float
rounding). Blocks nobody holds stay cached until a request needs them, least recently released first.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rise_jax import sharding as sharding_lib
from rise_jax.config import ON_OVERFLOW
from rise_jax.sampling import blocks as blocks_lib
from rise_jax.sampling import paged
from rise_jax.sampling.requests import Request, SampleResult
from rise_jax.sampling.scheduler import CHUNK_ROW_BUCKETS, MIN_SPAN_TOKENS, EngineStream

__all__ = ["CHUNK_ROW_BUCKETS", "Engine", "EngineStream", "MIN_SPAN_TOKENS", "default_num_blocks", "swapped_params"]


def swapped_params(params, model_or_state, shardings, who: str):
  """New weights in the layout of `params` (same structure and shapes, cast to its dtypes, placed by
  `shardings`): the compiled programs keep working, only values change."""
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


def default_num_blocks(slots: int, capacity: int, block_size: int) -> int:
  """Every slot at full length, plus the trash block and one spare (what `Engine` allocates unless told)."""
  return slots * -(-capacity // block_size) + 2


class Engine:
  """Continuous-batching generation over a paged KV pool (see the module docstring)."""

  def __init__(self, model: nnx.Module, *, slots: int = 64, max_seq_len: int, block_size: int = 16,
               num_blocks: int | None = None, chunk_steps: int = 8, prefill_tokens: int = 4096,
               on_overflow: str = "raise", vocab_limit: int | None = None, prefix_cache: bool = True, mesh=None,
               rules=sharding_lib.SAMPLE_RULES):
    """
    Args:
      model: the Transformer (any sharding; its weights are resharded to the sampling layout).
      slots: decode rows run together in every chunk.
      max_seq_len: the most tokens a sample may hold (prompt + reply), capped by max_position_embeddings.
      block_size: tokens per pool block (a power of two).
      num_blocks: pool size in blocks; default enough for every slot at full length plus one more, so any
        mix of requests that individually fit can run.
      chunk_steps: decode steps per jitted chunk (a finished row waits at most this many steps for a refill).
      prefill_tokens: most padded prompt tokens prefilled in one call (bounds prefill activations).
      on_overflow: "raise" when prompt + max_new_tokens exceeds the capacity, or "report" (decode until full,
        finish_reason "cache_full").
      vocab_limit: ids >= it are never sampled (a model vocabulary padded past the tokenizer's).
      prefix_cache: keep finished conversations' full blocks, content-addressed (`blocks.BlockTable`), so a
        later prompt starting with the same tokens (the next turn of a conversation, a windowed history's
        question) prefills only what follows them; they are evicted least recently used when blocks run out.
      mesh: a ('data', 'fsdp', 'tensor') mesh; None = one device. Chunk and prefill rows are spread over data and
        fsdp (a row bucket they do not divide is replicated), kv heads of the pool and the weights over tensor
        (`rules`); the pool's blocks are whole on every data shard, since any slot may read any block.
      rules: the logical-axis rules of weights, pool and rows (default: `sharding.SAMPLE_RULES`).
    """
    if on_overflow not in ON_OVERFLOW:
      raise ValueError(f"Engine.on_overflow: {on_overflow!r} is not one of {ON_OVERFLOW}")
    if block_size < 1 or block_size & (block_size - 1):
      raise ValueError(f"Engine.block_size: must be a power of two, got {block_size}")
    self.config = model.config
    self.slots = int(slots)
    self.block_size = int(block_size)
    self.chunk_steps = int(chunk_steps)
    self.capacity = min(int(max_seq_len), self.config.max_position_embeddings)
    if self.capacity < 2:
      raise ValueError(f"Engine.max_seq_len: {max_seq_len} leaves no room to generate")
    self.max_blocks = -(-self.capacity // self.block_size)
    self.num_blocks = int(num_blocks) if num_blocks is not None else default_num_blocks(
        self.slots, self.capacity, self.block_size)
    self.prefill_tokens = max(int(prefill_tokens), self.block_size)
    self.on_overflow = on_overflow
    self.vocab_limit = vocab_limit
    self.mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
    self.rules = rules
    self.graphdef, state = nnx.split(model)
    self._param_shardings = sharding_lib.state_shardings(state, self.mesh, rules)
    self._params = jax.device_put(state, self._param_shardings)
    new_pool = lambda: paged.init_pool(self.config, self.num_blocks, self.block_size, model.dtype)
    self._pool_sharding = jax.tree.map(lambda x: self._sharding((None, "kv_heads", None, "head_dim"), x.shape),
                                       jax.eval_shape(new_pool))
    self._pool = jax.jit(new_pool, out_shardings=self._pool_sharding)()  # created in place on its shards
    self.prefix_cache = bool(prefix_cache)
    self.kv = blocks_lib.KVBlocks(self.num_blocks, self.block_size, self.capacity, self.prefix_cache)
    self._stream: EngineStream | None = None
    self.stats: collections.Counter = collections.Counter()
    merge = lambda p: nnx.merge(self.graphdef, p)
    self._prefill_jit = jax.jit(self._prefill, donate_argnums=(1,))
    self._first_jit = jax.jit(self._first_tokens)
    pieced = self.mesh.devices.flat[0].platform == "cpu"  # long spans in pieces: CPU caches (paged.py)
    self._chunk_jit = jax.jit(
        lambda p, pool, slots, span: self._pin_pool(paged.decode_chunk(merge(p), pool, slots, self.chunk_steps,
                                                                       span, self.vocab_limit, pieced)),
        static_argnums=(3,), donate_argnums=(1,))

  def _prefill(self, params, pool, ids, lengths, block_ids, context_table, cached):
    return self._pin_pool(paged.prefill(nnx.merge(self.graphdef, params), pool, ids, lengths, block_ids,
                                        context_table, cached))

  def _first_tokens(self, params, hidden, *first_token_args):
    return paged.first_tokens(nnx.merge(self.graphdef, params), hidden, *first_token_args, self.vocab_limit)

  # -- layout ------------------------------------------------------------------------------------------------

  def _sharding(self, logical_axes, shape) -> NamedSharding:
    spec = list(sharding_lib.logical_to_spec(logical_axes, shape, self.mesh, self.rules, "replicate", "engine",
                                             warn=False))
    while spec and spec[-1] is None:  # jit returns specs without trailing Nones: an equal key, no second compile
      spec.pop()
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  def _pin_pool(self, outputs):
    """(pool, rest) with the pool kept in its layout, so the donated buffer is reused call after call."""
    pool, rest = outputs
    return jax.lax.with_sharding_constraint(pool, self._pool_sharding), rest

  def _rows(self, tree):
    """Host arrays whose first axis is rows, placed with rows over the mesh's data and fsdp axes."""
    shardings = jax.tree.map(lambda x: self._sharding(("batch",) + (None,) * (x.ndim - 1), x.shape), tree)
    return jax.device_put(tree, shardings)  # one transfer call for the whole tree, not one per array

  def update_params(self, model_or_state) -> None:
    """Swap in new weights (compiled programs reused) and empty the prefix cache,
    whose keys and values the old weights computed."""
    self._params = swapped_params(self._params, model_or_state, self._param_shardings, "Engine.update_params")
    self.forget_prefix_cache()

  def forget_prefix_cache(self) -> None:
    """Empty the prefix cache: unheld cached blocks become free; held ones stay their holders' but unfindable."""
    self.kv.table.forget_cached()

  def compile_counts(self) -> dict[str, int]:
    """Entries in each jitted function's compilation cache (bounded by the buckets in the module docstring)."""
    jits = dict(prefill=self._prefill_jit, first_tokens=self._first_jit, chunk=self._chunk_jit)
    return {name: f._cache_size() for name, f in jits.items()}

  @property
  def blocks_in_use(self) -> int:
    """Blocks a queued or running request holds (cached blocks nobody references are free to take)."""
    return self.kv.table.in_use

  @property
  def blocks_cached(self) -> int:
    return self.kv.table.cached

  # -- request checks ----------------------------------------------------------------------------------------

  def check(self, index: Any, request: Request) -> list[int]:
    """The request's prompt ids, refused (ValueError naming it) when it can never run here.""" 
    prompt = [int(t) for t in request.prompt]
    if not prompt:
      raise ValueError(f"request {index}: empty prompt")
    if any(not 0 <= t < self.config.vocab_size for t in prompt):
      raise ValueError(f"request {index}: token ids outside the vocabulary [0, {self.config.vocab_size})")
    need = len(prompt) + request.max_new_tokens
    if need > self.capacity:
      msg = (f"request {request.uid!r}: {len(prompt)} prompt tokens + max_new_tokens {request.max_new_tokens} = "
             f"{need} exceeds the capacity {self.capacity}")
      if self.on_overflow == "raise":
        raise ValueError(msg + "; shorten the prompt or use on_overflow='report'")
    blocks = self.kv.prompt_blocks(len(prompt)) + self.kv.own_blocks(len(prompt), request.max_new_tokens)
    if len(prompt) < self.capacity and blocks > self.num_blocks - 1:
      raise ValueError(f"request {request.uid!r}: its prompt and one sample need {blocks} blocks, the pool has "
                       f"{self.num_blocks - 1}; raise num_blocks")
    return prompt

  # -- the run -----------------------------------------------------------------------------------------------

  def run(self, requests: Sequence[Request], seed: int = 0) -> list[list[SampleResult]]:
    """Every sample of every request; `outs[i][j]` is sample j of request i. Raises on overflow (see __init__)."""
    stream = self.stream(seed)
    for i, request in enumerate(requests):  # every request is checked before any work starts
      stream.submit(request, tag=i)
    results: list[list[SampleResult] | None] = [None] * len(requests)
    while stream.busy:
      for i, samples in stream.step():
        results[i] = samples
    return results

  def stream(self, seed: int = 0) -> EngineStream:
    """An open queue over this engine (see `EngineStream`); opening one closes any earlier stream, and one that
    still held blocks (its caller raised or stopped reading) gives them all back with the prefix cache."""
    if self._stream is not None:
      self._stream.closed = True
      if self._stream.holds_blocks or self.kv.pending_release:
        self.kv.reset()
    self._stream = EngineStream(self, seed)
    return self._stream

  # -- device calls (the scheduler's) ------------------------------------------------------------------------

  def prefill_call(self, prefill_arrays, first_token_arrays) -> tuple[np.ndarray, ...]:
    """`paged.prefill` then `paged.first_tokens` on host arrays; the first-token outputs. Two programs, not one:
    prefill shapes are (width, context) buckets and first-token shapes sample-count buckets, so each compiles per
    bucket of its own instead of once per combination."""
    self._pool, hidden = self._prefill_jit(self._params, self._pool, *self._rows(prefill_arrays))
    return jax.device_get(self._first_jit(self._params, hidden, *self._rows(first_token_arrays)))

  def chunk_call(self, batch: paged.SlotBatch, span_blocks: int) -> paged.ChunkOutput:
    """One decode chunk (`paged.decode_chunk`) on a host slot batch; its outputs on the host."""
    self._pool, out = self._chunk_jit(self._params, self._pool, self._rows(batch), span_blocks)
    return jax.device_get(out)
