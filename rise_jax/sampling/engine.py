"""`Engine`: continuous batching over a paged KV pool, one shared copy of each prompt's cache.

    engine = Engine(model, slots=64, max_seq_len=1024)
    outs = engine.run([Request(prompt_ids, uid="q17", n=16, max_new_tokens=300, temperature=1.0)], seed=0)
    outs[i][j].token_ids / .logprobs / .finish_reason          # sample j of request i

The project's one generator: the rollout policies, the pipeline, the CLIs, the notebook and the benchmarks
sample through it. A fixed set of `slots` decode rows runs jitted chunks of `chunk_steps` decode steps; each row
has its own token count, `max_new_tokens`, stops and capacity, and between chunks the host moves finished rows
out and prefills queued requests into the free slots, so the slots stay full (a static batch decodes until its
longest row finishes: on GSM8K-length replies ~40% of its decode slots produce a token).

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
the attention span bucketed to a power of two of blocks, at least MIN_SPAN_TOKENS: <= CHUNK_ROW_BUCKETS x
(log2(max_blocks) + 1) chunk programs. A prefill batch is (rows, width) with rows a power of 4 (1, 4, 16, 64,
...) and width a power of two >= the block size, rows x width <= prefill_tokens; its first-token sampling is
padded to a power of 4 >= max(16, rows) samples (one bucket per row bucket when n = 1): with n = 1, <= 4 x
(widths met) prefill programs for 64 slots.

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
import dataclasses
import math
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
from rise_jax.sampling import select
from rise_jax.sampling.requests import STOP_SLOTS, Request, SampleResult

MIN_FIRST_TOKENS = 16   # smallest first-token batch bucket (a power of 4)
MIN_SPAN_TOKENS = 64    # smallest attention-span bucket (fewer chunk compiles for short conversations)
CHUNK_ROW_BUCKETS = 4   # decode chunks run slots, slots / 2, slots / 4 or slots / 8 rows (the occupied ones)


def pow2_at_least(x: int, floor: int = 1) -> int:
  """The smallest power of two >= x and >= floor (the engine's shape buckets)."""
  return max(floor, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def pow4_at_least(x: int, floor: int = 1) -> int:
  """The smallest power of 4 >= x and >= floor: the prefill row buckets (half the programs powers of two need)."""
  p = pow2_at_least(x, floor)
  return p * 2 if (p.bit_length() - 1) % 2 else p


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

@dataclasses.dataclass(eq=False)  # identity: the host loops compare groups and slots with `is` / `in`
class _Group:
  """A request on the host: its prompt blocks (shared by its samples) and the samples still to run."""
  tag: Any                                  # the submitter's name for it (`run`: its index)
  request: Request
  prompt: list[int]
  results: list                             # sample j's SampleResult once it finished, else None
  pending: int                              # samples without a result yet
  key_data: np.ndarray | None = None        # [n, 2] uint32 row keys of its samples (made at its prefill)
  waiting: collections.deque = dataclasses.field(default_factory=collections.deque)  # sample indices
  first: dict = dataclasses.field(default_factory=dict)   # sample -> (token, logprob, sampling_logprob)
  digests: list[bytes] = dataclasses.field(default_factory=list)  # chain digests of the full prompt blocks
  cached_blocks: list[int] = dataclasses.field(default_factory=list)  # its prompt's prefix found in the cache
  shared_blocks: list[int] = dataclasses.field(default_factory=list)  # full prompt blocks (cached ones first)
  partial_block: int | None = None          # the partly filled last prompt block, copied per sample
  live: int = 0                             # samples waiting or in a slot (the shared blocks' reference count)


@dataclasses.dataclass(eq=False)
class _Slot:
  """One occupied decode slot on the host."""
  group: _Group
  sample: int
  own_blocks: list[int]
  length: int
  last_token: int
  tokens: list[int]
  logprobs: list[float]
  sampling_logprobs: list[float]


def default_num_blocks(slots: int, capacity: int, block_size: int) -> int:
  """Every slot at full length, plus the trash block and one spare (what `Engine` allocates unless told)."""
  return slots * -(-capacity // block_size) + 2


class EngineStream:
  """`Engine.run` for a queue that grows while it runs: submit requests at any time, take each request's samples
  as soon as its last one finishes. RISE asks for a conversation's next turn only once its turn has been graded;
  submitted then, it fills slots that would otherwise idle while the rest of the turn drains.

      stream = engine.stream(seed=0)
      stream.submit(request, tag="q17/t1")
      while stream.busy:
        for tag, samples in stream.step():   # refills, then one decode chunk
          ...                                # may submit more

  Samples are `run`'s, whatever the submission times (keys are (seed, uid, sample, position)). One stream per
  engine at a time: opening another abandons this one (a `closed` stream refuses further use).
  """

  def __init__(self, engine: Engine, seed: int):
    self.engine = engine
    self.seed = int(seed)
    self.closed = False

  def submit(self, request: Request, tag: Any) -> None:
    """Queue `request` (checked now: overflow raises here, as in `run`); `tag` comes back with its samples."""
    self._open()._submit(request, tag)

  def step(self) -> list[tuple[Any, list[SampleResult]]]:
    """Refill free slots from the queue and run one decode chunk; (tag, samples) of every request finished."""
    return self._open()._step()

  @property
  def busy(self) -> bool:
    """Whether anything is queued, running, or finished and not yet returned by `step`."""
    return not self.closed and self.engine._busy()

  def _open(self) -> Engine:
    if self.closed:
      raise RuntimeError("EngineStream: closed (another stream was opened on its engine)")
    return self.engine


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
    self._blocks = blocks_lib.BlockTable(self.num_blocks)  # block 0 (paged.TRASH_BLOCK) is never handed out
    self._free_after_chunk: list[int] = []  # partial prompt blocks whose copies the next chunk makes
    # The open stream's state: queued requests, prefilled ones with samples waiting for a slot, the slots, and
    # requests whose every sample finished since the last step.
    self._stream: EngineStream | None = None
    self._queue: collections.deque[_Group] = collections.deque()
    self._ready: collections.deque[_Group] = collections.deque()
    self._slots: list[_Slot | None] = [None] * self.slots
    self._finished: list[_Group] = []
    self.stats: collections.Counter = collections.Counter()
    merge = lambda p: nnx.merge(self.graphdef, p)
    self._prefill_jit = jax.jit(self._prefill_and_sample, donate_argnums=(1,))
    self._chunk_jit = jax.jit(
        lambda p, pool, slots, span: self._pin_pool(paged.decode_chunk(merge(p), pool, slots, self.chunk_steps,
                                                                       span, self.vocab_limit)),
        static_argnums=(3,), donate_argnums=(1,))

  def _prefill_and_sample(self, params, pool, ids, lengths, block_ids, context_table, cached, *first_token_args):
    """One dispatch per refill: prefill the prompts into the pool, then sample every sample's first token."""
    model = nnx.merge(self.graphdef, params)
    pool, hidden = paged.prefill(model, pool, ids, lengths, block_ids, context_table, cached)
    return self._pin_pool((pool, paged.first_tokens(model, hidden, *first_token_args, self.vocab_limit)))

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
    self._blocks.forget_cached()

  def compile_counts(self) -> dict[str, int]:
    """Entries in each jitted function's compilation cache (bounded by the buckets in the module docstring)."""
    jits = dict(prefill=self._prefill_jit, chunk=self._chunk_jit)
    return {name: f._cache_size() for name, f in jits.items()}

  @property
  def blocks_in_use(self) -> int:
    """Blocks a queued or running request holds (cached blocks nobody references are free to take)."""
    return self._blocks.in_use

  @property
  def blocks_cached(self) -> int:
    return self._blocks.cached

  # -- request checks ----------------------------------------------------------------------------------------

  def _budget(self, prompt_len: int, max_new: int) -> int:
    """Tokens a sample may hold in the pool: its last sampled token is never fed."""
    return min(prompt_len + max_new, self.capacity) - 1

  def _own_blocks(self, prompt_len: int, max_new: int) -> int:
    """Blocks one sample needs beyond the prompt's shared full blocks (its partial-block copy included)."""
    return -(-self._budget(prompt_len, max_new) // self.block_size) - prompt_len // self.block_size

  def _check(self, index: Any, request: Request) -> list[int]:
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
    blocks = -(-len(prompt) // self.block_size) + self._own_blocks(len(prompt), request.max_new_tokens)
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
    """An open queue over this engine (see `EngineStream`); opening one abandons any earlier stream still busy."""
    if self._stream is not None:
      self._stream.closed = True
    if self._ready or any(self._slots) or self._free_after_chunk:  # blocks still held by an unfinished stream
      self._abandon()
    self._stream = EngineStream(self, seed)
    self._slots = [None] * self.slots
    self._queue.clear()
    self._ready.clear()
    self._finished.clear()
    return self._stream

  def _abandon(self) -> None:
    """Forget a stream left busy (its caller raised or stopped reading): a fresh block table frees every block
    its requests held; the prefix cache goes with it."""
    self._blocks = blocks_lib.BlockTable(self.num_blocks)
    self._free_after_chunk.clear()

  def _submit(self, request: Request, tag: Any) -> None:
    prompt = self._check(tag, request)
    group = _Group(tag, request, prompt, [None] * request.n, request.n,
                   waiting=collections.deque(range(request.n)))
    if len(prompt) >= self.capacity:  # not even one reply token fits (report mode)
      empty = SampleResult([], np.zeros(0, np.float32), np.zeros(0, np.float32), "cache_full", len(prompt))
      for j in range(request.n):
        self._deliver(group, j, empty)
      return
    self._queue.append(group)

  def _busy(self) -> bool:
    return bool(self._queue or self._ready or self._finished or any(self._slots))

  def _step(self) -> list[tuple[Any, list[SampleResult]]]:
    """Refill the free slots, run one decode chunk; the requests whose last sample finished meanwhile."""
    if any(self._slots) or self._queue or self._ready:
      copies = self._fill(self._slots, self._ready, self._queue)
      if any(self._slots):
        self._run_chunk(self._slots, copies)
      elif self._ready or self._queue:
        raise RuntimeError("Engine: no request fits in the free blocks with every slot idle (pool too small)")
      # Partial prompt blocks go back once the chunk that copies them ran (or none will: no slot took them).
      self._blocks.release(self._free_after_chunk)
      self._free_after_chunk.clear()
    done = [(group.tag, group.results) for group in self._finished]
    self._finished.clear()
    return done

  def _deliver(self, group: _Group, sample: int, result: SampleResult) -> None:
    group.results[sample] = result
    group.pending -= 1
    if group.pending == 0:
      self._finished.append(group)

  def _key_data(self, samples: list[tuple[int, _Group, int]], m: int) -> np.ndarray:
    """The raw [m, 2] keys of `samples` padded to m (one program per first-token bucket): (seed, uid, sample j),
    select.row_keys elementwise, so a sample's key does not depend on the batch it was prefilled in."""
    uids = np.zeros(m, np.uint32)
    index = np.zeros(m, np.uint32)
    uids[:len(samples)] = [select.uid_to_int(g.request.uid) for _, g, _ in samples]
    index[:len(samples)] = [j for _, _, j in samples]
    return np.asarray(jax.random.key_data(select.row_keys(self._stream.seed, uids, index)))

  def _fill(self, slots, ready, queue) -> list[tuple[int, int]]:
    """Admit waiting samples into free slots, prefilling queued requests as needed; the copy-on-write pairs."""
    copies = []
    free = [s for s in range(len(slots) - 1, -1, -1) if slots[s] is None]  # popped lowest first
    while free:
      if not ready:
        if not queue or not self._prefill_some(len(free), ready, queue):
          break
        continue
      group = ready[0]
      if not group.waiting:
        ready.popleft()
        continue
      need = self._own_blocks(len(group.prompt), group.request.max_new_tokens)
      if need > self._blocks.available:
        break  # wait for running rows to return blocks
      sample = group.waiting.popleft()
      own = self._blocks.allocate(need)
      if group.partial_block is not None:
        copies.append((group.partial_block, own[0]))
      token, logprob, sampling_logprob, _ = group.first[sample]
      slots[free.pop()] = _Slot(group, sample, own, len(group.prompt), token, [token], [logprob],
                                [sampling_logprob])
      self.stats["admitted"] += 1
      if not group.waiting:
        self._release_partial(group)
    self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.blocks_in_use)
    return copies

  def _prefill_some(self, free_slots: int, ready, queue) -> bool:
    """Prefill queued requests (FIFO) while their prompts and the samples `free_slots` can take fit the free
    blocks; False when not even the next request's prompt and one sample fit now."""
    taken = 0
    batch: list[_Group] = []
    width = context = 0
    while queue and free_slots > 0:
      group = queue[0]
      prompt_len = len(group.prompt)
      group.cached_blocks = self._cached_prefix(group)
      cached = len(group.cached_blocks)
      prompt_blocks = -(-prompt_len // self.block_size) - cached
      own = self._own_blocks(prompt_len, group.request.max_new_tokens)
      free_blocks = self._blocks.available - taken
      by_blocks = (free_blocks - prompt_blocks) // own if own else free_slots
      takes = min(group.request.n, free_slots, by_blocks)
      new_width = max(width, pow2_at_least(prompt_len - cached * self.block_size, self.block_size))
      new_context = max(context, pow2_at_least(cached) if cached else 0)
      too_wide = pow4_at_least(len(batch) + 1) * (new_width + new_context * self.block_size) > self.prefill_tokens
      if takes < 1 or (batch and too_wide):
        self._blocks.release(group.cached_blocks[::-1])
        group.cached_blocks = []
        break
      batch.append(queue.popleft())
      width, context, free_slots = new_width, new_context, free_slots - takes
      taken += prompt_blocks + takes * own
    if not batch:
      return False
    self._prefill(batch, width, context)
    for group in batch:
      self._finish_early_samples(group)
      ready.append(group)
    return True

  def _cached_prefix(self, group: _Group) -> list[int]:
    """The blocks of the longest cached prefix of the group's prompt (a reference taken on each), leaving at
    least its last token to prefill: the first sampled token needs that token's hidden state."""
    if not self.prefix_cache:
      return []
    if not group.digests:
      group.digests = blocks_lib.chain_digests(group.prompt, self.block_size)
    return self._blocks.lookup(group.digests[:(len(group.prompt) - 1) // self.block_size])

  def _prefill(self, batch: list[_Group], width: int, context: int) -> None:
    """One prefill call for `batch`: store each prompt past its cached prefix in fresh blocks (the prefix read
    from its `context` blocks), then sample every sample's first token."""
    rows = pow4_at_least(len(batch))
    ids = np.zeros((rows, width), np.int32)
    lengths = np.zeros(rows, np.int32)
    block_ids = np.full((rows, width // self.block_size), paged.TRASH_BLOCK, np.int32)
    context_table = np.full((rows, context), paged.TRASH_BLOCK, np.int32)
    cached_lengths = np.zeros(rows, np.int32)
    registered = []
    for r, group in enumerate(batch):
      prompt_len = len(group.prompt)
      start = len(group.cached_blocks) * self.block_size
      ids[r, :prompt_len - start] = group.prompt[start:]
      lengths[r], cached_lengths[r] = prompt_len - start, start
      context_table[r, :len(group.cached_blocks)] = group.cached_blocks
      blocks = self._blocks.allocate(-(-prompt_len // self.block_size) - len(group.cached_blocks))
      block_ids[r, :len(blocks)] = blocks
      blocks = group.cached_blocks + blocks
      full = prompt_len // self.block_size
      group.shared_blocks, group.partial_block = blocks[:full], (blocks[full] if len(blocks) > full else None)
      group.live = group.request.n
      registered += [(blocks[j], group.digests[j]) for j in range(len(group.cached_blocks), full)
                     if self.prefix_cache]
    samples = [(r, g, j) for r, g in enumerate(batch) for j in range(g.request.n)]
    self._pool, outputs = self._prefill_jit(self._params, self._pool, *self._rows(
        (ids, lengths, block_ids, context_table, cached_lengths, *self._first_token_inputs(samples, rows))))
    # Registered after the batch's lookups: no prompt of a call reads blocks that the same call writes.
    for block, digest in registered:
      self._blocks.register(block, digest)
    self.stats["prefill_calls"] += 1
    self.stats["prefill_tokens"] += int(lengths.sum())
    self.stats["cached_tokens"] += int(cached_lengths.sum())
    # The prompts' blocks are held here even when every sample ends at its first token (never admitted to a slot).
    self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.blocks_in_use)
    outputs = jax.device_get(outputs)
    for s, (_, group, j) in enumerate(samples):
      group.first[j] = tuple(x[s].item() for x in outputs)  # token, logprob, sampling logprob, finish code

  def _first_token_inputs(self, samples: list[tuple[int, _Group, int]], rows: int) -> tuple[np.ndarray, ...]:
    """`paged.first_tokens`' per-sample inputs, padded to a bucket (>= the prefill rows: one bucket for n=1)."""
    m = pow4_at_least(len(samples), max(MIN_FIRST_TOKENS, rows))
    column = lambda values, dtype: np.asarray(list(values) + [0] * (m - len(samples)), dtype)
    key_data = self._key_data(samples, m)
    for s, (_, g, j) in enumerate(samples):
      if g.key_data is None:
        g.key_data = np.zeros((g.request.n, 2), np.uint32)
      g.key_data[j] = key_data[s]
    stop_ids = np.full((m, STOP_SLOTS), -1, np.int32)
    for s, (_, g, _) in enumerate(samples):
      stop_ids[s, :len(g.request.stop_ids)] = g.request.stop_ids
    return (column((r for r, _, _ in samples), np.int32), key_data,
            column((len(g.prompt) for _, g, _ in samples), np.int32),
            column((g.request.temperature for _, g, _ in samples), np.float32),
            column((g.request.top_k for _, g, _ in samples), np.int32),
            column((g.request.top_p for _, g, _ in samples), np.float32), stop_ids,
            column((g.request.max_new_tokens for _, g, _ in samples), np.int32), np.full(m, self.capacity, np.int32))

  def _finish_early_samples(self, group: _Group) -> None:
    """Samples whose first token already ends them (a stop id, max_new 1, a full capacity) never take a slot."""
    for j in list(group.waiting):
      token, logprob, sampling_logprob, code = group.first[j]
      if code != paged.RUNNING:
        group.waiting.remove(j)
        self._deliver(group, j, SampleResult([token], np.asarray([logprob], np.float32),
                                             np.asarray([sampling_logprob], np.float32), paged.FINISH_REASONS[code],
                                             len(group.prompt), len(group.cached_blocks) * self.block_size))
        self._release_sample(group)
    if not group.waiting:
      self._release_partial(group)

  def _release_partial(self, group: _Group) -> None:
    """Every sample has its own copy of the partial prompt block: the group's copy goes back to the pool once
    the next chunk (which makes the copies) is dispatched; freed now, a prefill before it could overwrite it."""
    if group.partial_block is not None:
      self._free_after_chunk.append(group.partial_block)
      group.partial_block = None

  def _register_reply(self, slot: _Slot) -> None:
    """Cache the finished sample's own full blocks (prompt and reply up to its last fed token): the next turn's
    prompt is this conversation plus the feedback, so it prefills only what follows them."""
    if not self.prefix_cache:
      return
    prompt_full = len(slot.group.prompt) // self.block_size
    full = slot.length // self.block_size
    if full <= prompt_full:
      return
    fed = slot.group.prompt + slot.tokens[:slot.length - len(slot.group.prompt)]
    parent = slot.group.digests[prompt_full - 1] if prompt_full else b""
    digests = blocks_lib.chain_digests(fed[prompt_full * self.block_size:full * self.block_size], self.block_size,
                                       parent)
    for own, digest in zip(slot.own_blocks, digests):
      self._blocks.register(own, digest)

  def _release_sample(self, group: _Group) -> None:
    """One sample of `group` is done: the last one returns the shared prompt blocks."""
    group.live -= 1
    if group.live == 0:
      self._blocks.release(group.shared_blocks[::-1])
      group.shared_blocks = []

  # -- one chunk ---------------------------------------------------------------------------------------------

  def _chunk_rows(self, occupied: int) -> int:
    """The chunk's row bucket: the smallest of slots, slots / 2, ... slots / 2**(CHUNK_ROW_BUCKETS - 1) (rounded
    up) holding every occupied slot, so a draining queue's last rows do not pay for every idle slot."""
    return min(b for b in (-(-self.slots // 2**k) for k in range(CHUNK_ROW_BUCKETS)) if b >= occupied)

  def _slot_batch(self, occupied: list[_Slot], rows: int, copies: list[tuple[int, int]]) -> paged.SlotBatch:
    """The chunk's inputs: row r runs occupied[r] (rows past them idle); where a slot sits on the host is
    irrelevant, its keys and position decide what it samples. Built a column at a time from Python lists."""
    n = len(occupied)
    requests = [slot.group.request for slot in occupied]

    def column(values, dtype):
      out = np.zeros(rows, dtype)
      out[:n] = values
      return out

    table = np.full((rows, self.max_blocks), paged.TRASH_BLOCK, np.int32)
    stop_ids = np.full((rows, STOP_SLOTS), -1, np.int32)
    for s, slot in enumerate(occupied):
      blocks = slot.group.shared_blocks + slot.own_blocks
      table[s, :len(blocks)] = blocks
      stop_ids[s, :len(slot.group.request.stop_ids)] = slot.group.request.stop_ids
    key_data = np.zeros((rows, 2), np.uint32)
    if n:
      key_data[:n] = [slot.group.key_data[slot.sample] for slot in occupied]
    copy_src, copy_dst = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for i, (src, dst) in enumerate(copies):  # at most one per slot admitted since the last chunk
      copy_src[i], copy_dst[i] = src, dst
    return paged.SlotBatch(
        block_table=table, active=np.arange(rows) < n, key_data=key_data, stop_ids=stop_ids,
        length=column([slot.length for slot in occupied], np.int32),
        last_token=column([slot.last_token for slot in occupied], np.int32),
        generated=column([len(slot.tokens) for slot in occupied], np.int32),
        max_new=column([r.max_new_tokens for r in requests], np.int32),
        capacity=column(self.capacity, np.int32),
        top_k=column([r.top_k for r in requests], np.int32),
        temperature=column([r.temperature for r in requests], np.float32),
        top_p=column([r.top_p for r in requests], np.float32), copy_src=copy_src, copy_dst=copy_dst)

  def _span_blocks(self, slots: list[_Slot | None]) -> int:
    """The attention span bucket: a power of two of blocks covering every active slot through this chunk."""
    longest = max(slot.length for slot in slots if slot is not None) + self.chunk_steps
    return min(pow2_at_least(-(-longest // self.block_size), MIN_SPAN_TOKENS // self.block_size), self.max_blocks)

  def _run_chunk(self, slots: list[_Slot | None], copies: list[tuple[int, int]]) -> None:
    where = [s for s, slot in enumerate(slots) if slot is not None]
    rows = self._chunk_rows(len(where))
    batch = self._slot_batch([slots[s] for s in where], rows, copies)
    self._pool, out = self._chunk_jit(self._params, self._pool, self._rows(batch), self._span_blocks(slots))
    out = jax.device_get(out)
    steps = int(out.steps)
    self.stats["chunks"] += 1
    self.stats["decode_steps"] += steps
    self.stats["slot_steps"] += steps * rows  # rows the chunk computed, idle ones included
    self.stats["chunk_rows_below_slots"] += rows < self.slots
    self.stats["cow_copies"] += len(copies)
    n = len(where)  # each output array to Python lists once, then sliced per row
    produced_all, finish = out.produced[:n].tolist(), out.finish[:n].tolist()
    tokens, logprobs, sampling_logprobs = (x[:n].tolist() for x in (out.tokens, out.logprobs,
                                                                    out.sampling_logprobs))
    self.stats["decode_tokens"] += sum(produced_all)
    for r, s in enumerate(where):
      slot = slots[s]
      produced = produced_all[r]
      slot.tokens += tokens[r][:produced]
      slot.logprobs += logprobs[r][:produced]
      slot.sampling_logprobs += sampling_logprobs[r][:produced]
      slot.length += produced
      slot.last_token = slot.tokens[-1]
      if finish[r] != paged.RUNNING:
        group = slot.group
        self._deliver(group, slot.sample, SampleResult(
            slot.tokens, np.asarray(slot.logprobs, np.float32), np.asarray(slot.sampling_logprobs, np.float32),
            paged.FINISH_REASONS[finish[r]], len(group.prompt), len(group.cached_blocks) * self.block_size))
        self._register_reply(slot)
        self._blocks.release(slot.own_blocks[::-1])
        self._release_sample(group)
        slots[s] = None
