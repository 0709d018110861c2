"""The engine's scheduler: one open stream's queue, prefilled requests waiting for slots, the decode slots and the
finished requests, and the host loop that moves samples between them (`EngineStream`). Blocks are the block
manager's business (`blocks.KVBlocks`), device programs the engine's (`Engine.prefill_call`, `Engine.chunk_call`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from rise_jax.sampling import paged
from rise_jax.sampling import select
from rise_jax.sampling.requests import STOP_SLOTS, Request, SampleResult

MIN_FIRST_TOKENS = 16   # smallest first-token batch bucket (a power of 4)
MIN_SPAN_TOKENS = 64    # smallest attention-span bucket (fewer chunk compiles for short conversations)
FINE_SPAN_TOKENS = 512  # spans longer than this come in quarter octaves: there attention is most of a step
CHUNK_ROW_BUCKETS = 4   # decode chunks run slots, slots / 2, slots / 4 or slots / 8 rows (the occupied ones)
PREFILL_LOOKAHEAD = 4   # a prefill call looks this many x its rows past requests of other buckets
PREFILL_KEYS = 4        # a prefill call's keys (cached prefix + tail) may be this many x its tail tokens


def pow2_at_least(x: int, floor: int = 1) -> int:
  """The smallest power of two >= x and >= floor (the engine's shape buckets)."""
  return max(floor, 1 << max(0, (max(x, 1) - 1).bit_length()))


def span_bucket(blocks: int, block_size: int, max_blocks: int) -> int:
  """The attention span (in blocks) a chunk whose longest slot needs `blocks` runs at: a power of two of blocks,
  at least MIN_SPAN_TOKENS; past FINE_SPAN_TOKENS the next quarter octave (1.25, 1.5, 1.75 or 2 x a power of
  two), since every slot of the chunk attends over the span and attention there costs about its length."""
  p = pow2_at_least(blocks, MIN_SPAN_TOKENS // block_size)
  if p * block_size > FINE_SPAN_TOKENS:
    step = p // 8
    p = -(-blocks // step) * step
  return min(p, max_blocks)


def pow4_at_least(x: int, floor: int = 1) -> int:
  """The smallest power of 4 >= x and >= floor: the prefill row buckets (half the programs powers of two need)."""
  p = pow2_at_least(x, floor)
  return p * 2 if (p.bit_length() - 1) % 2 else p


@dataclasses.dataclass(eq=False)  # identity: the host loops compare groups and slots with `is` / `in`
class Group:
  """A request on the host: its prompt blocks (shared by its samples) and the samples still to run."""
  tag: Any                                  # the submitter's name for it (`run`: its index)
  request: Request
  prompt: list[int]
  results: list                             # sample j's SampleResult once it finished, else None
  pending: int                              # samples without a result yet
  uid_int: int = 0                          # `select.uid_to_int` of the request's uid (its keys' second id)
  waiting: collections.deque = dataclasses.field(default_factory=collections.deque)  # sample indices
  first: dict = dataclasses.field(default_factory=dict)   # sample -> (token, logprob, sampling_logprob, code)
  digests: list[bytes] = dataclasses.field(default_factory=list)  # chain digests of the full prompt blocks
  cached_blocks: list[int] = dataclasses.field(default_factory=list)  # its prompt's prefix found in the cache
  shared_blocks: list[int] = dataclasses.field(default_factory=list)  # full prompt blocks (cached ones first)
  partial_block: int | None = None          # the partly filled last prompt block, copied per sample
  live: int = 0                             # samples waiting or in a slot (the shared blocks' reference count)


@dataclasses.dataclass(eq=False)
class Slot:
  """One sample on the host from its first token on: in a decode slot, or finished at its first token."""
  group: Group
  sample: int
  own_blocks: list[int]
  length: int                               # tokens of its conversation in the pool
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  sampling_logprobs: list[float] = dataclasses.field(default_factory=list)

  def record(self, tokens, logprobs, sampling_logprobs) -> None:
    """Sampled tokens, from the prefill's first-token sampling or a decode chunk: every token but the newest is
    in the pool."""
    self.length += len(tokens) - (not self.tokens)  # the first token is sampled, not fed
    self.tokens += tokens
    self.logprobs += logprobs
    self.sampling_logprobs += sampling_logprobs

  @property
  def last_token(self) -> int:
    return self.tokens[-1]

  def result(self, code: int, block_size: int) -> SampleResult:
    group = self.group
    return SampleResult(self.tokens, np.asarray(self.logprobs, np.float32),
                        np.asarray(self.sampling_logprobs, np.float32), paged.FINISH_REASONS[code],
                        len(group.prompt), len(group.cached_blocks) * block_size)


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
  engine at a time: opening another closes this one (a closed stream refuses further use).
  """

  def __init__(self, engine, seed: int):
    self.engine = engine
    self.seed = int(seed)
    self.closed = False
    self._queue: collections.deque[Group] = collections.deque()   # submitted, not prefilled
    self._ready: collections.deque[Group] = collections.deque()   # prefilled, samples waiting for a slot
    self._slots: list[Slot | None] = [None] * engine.slots
    self._finished: list[Group] = []                             # every sample done since the last step

  def submit(self, request: Request, tag: Any) -> None:
    """Queue `request` (checked now: overflow raises here, as in `run`); `tag` comes back with its samples."""
    engine = self._open()
    prompt = engine.check(tag, request)
    group = Group(tag, request, prompt, [None] * request.n, request.n, select.uid_to_int(request.uid),
                  waiting=collections.deque(range(request.n)))
    if len(prompt) >= engine.capacity:  # not even one reply token fits (report mode)
      empty = SampleResult([], np.zeros(0, np.float32), np.zeros(0, np.float32), "cache_full", len(prompt))
      for j in range(request.n):
        self._deliver(group, j, empty)
      return
    self._queue.append(group)

  def step(self) -> list[tuple[Any, list[SampleResult]]]:
    """Refill free slots from the queue and run one decode chunk; (tag, samples) of every request finished."""
    engine = self._open()
    if any(self._slots) or self._queue or self._ready:
      copies = self._fill()
      if any(self._slots):
        self._run_chunk(copies)
      elif self._ready or self._queue:
        raise RuntimeError("Engine: no request fits in the free blocks with every slot idle (pool too small)")
      # Partial prompt blocks go back once the chunk that copies them ran (or none will: no slot took them).
      engine.kv.chunk_dispatched()
    done = [(group.tag, group.results) for group in self._finished]
    self._finished.clear()
    return done

  @property
  def busy(self) -> bool:
    """Whether anything is queued, running, or finished and not yet returned by `step`."""
    return not self.closed and bool(self._queue or self._ready or self._finished or any(self._slots))

  @property
  def holds_blocks(self) -> bool:
    return bool(self._ready or any(self._slots))

  def _open(self):
    if self.closed:
      raise RuntimeError("EngineStream: closed (another stream was opened on its engine)")
    return self.engine

  def _deliver(self, group: Group, sample: int, result: SampleResult) -> None:
    group.results[sample] = result
    group.pending -= 1
    if group.pending == 0:
      self._finished.append(group)

  # -- admission ---------------------------------------------------------------------------------------------

  def _fill(self) -> list[tuple[int, int]]:
    """Admit waiting samples into free slots, prefilling queued requests as needed; the copy-on-write pairs."""
    engine, kv = self.engine, self.engine.kv
    copies = []
    free = [s for s in range(len(self._slots) - 1, -1, -1) if self._slots[s] is None]  # popped lowest first
    while free:
      if not self._ready:
        if not self._queue or not self._prefill_some(len(free)):
          break
        continue
      group = self._ready[0]
      if not group.waiting:
        self._ready.popleft()
        continue
      admitted = kv.admit(group)
      if admitted is None:
        break  # wait for running rows to return blocks
      own, copy = admitted
      if copy is not None:
        copies.append(copy)
      sample = group.waiting.popleft()
      token, logprob, sampling_logprob, _ = group.first[sample]
      slot = Slot(group, sample, own, len(group.prompt))
      slot.record([token], [logprob], [sampling_logprob])
      self._slots[free.pop()] = slot
      engine.stats["admitted"] += 1
      if not group.waiting:
        kv.all_admitted(group)
    engine.stats["peak_blocks"] = max(engine.stats["peak_blocks"], engine.blocks_in_use)
    return copies

  def _prefill_some(self, free_slots: int) -> bool:
    """Prefill the oldest queued request with the queued requests that fit its (width, context) bucket, looking
    PREFILL_LOOKAHEAD x the call's rows into the queue, while their prompts and the samples `free_slots` can take
    fit the free blocks; False when not even the oldest request's prompt and one sample fit now.

    Requests of a call share its bucket (tail width and cached-prefix length, powers of two), so a short tail
    behind a long one waits for a call of its own size instead of being padded to it; the oldest request always
    goes first, so none waits forever. Samples do not depend on which call prefills them (the key rule)."""
    engine, kv = self.engine, self.engine.kv
    block_size = engine.block_size
    taken = 0
    batch: list[Group] = []
    passed: list[Group] = []  # looked at, another bucket's: back to the queue's front in their order
    width = context = 0
    rows = 1  # the call's rows, set by its first request's bucket
    while self._queue and free_slots > 0 and len(batch) < rows and len(passed) < PREFILL_LOOKAHEAD * rows:
      group = self._queue.popleft()
      prompt_len = len(group.prompt)
      group.cached_blocks = kv.cached_prefix(group)
      cached = len(group.cached_blocks)
      prompt_blocks = kv.prompt_blocks(prompt_len) - cached
      own = kv.own_blocks(prompt_len, group.request.max_new_tokens)
      free_blocks = kv.table.available - taken
      by_blocks = (free_blocks - prompt_blocks) // own if own else free_slots
      takes = min(group.request.n, free_slots, by_blocks)
      group_width = pow2_at_least(prompt_len - cached * block_size, block_size)
      group_context = pow2_at_least(cached) if cached else 0
      if takes < 1:  # the free blocks are short: wait for running rows to return some
        kv.drop_lookup(group)
        self._queue.appendleft(group)
        break
      if not batch:
        width, context = group_width, group_context
        rows = self._prefill_rows(width, context)
      elif group_width > width or group_context > context:
        kv.drop_lookup(group)
        passed.append(group)
        continue
      batch.append(group)
      free_slots -= takes
      taken += prompt_blocks + takes * own
    self._queue.extendleft(reversed(passed))
    if not batch:
      return False
    self._prefill(batch, width, context)
    for group in batch:
      self._finish_early_samples(group)
      self._ready.append(group)
    return True

  def _prefill(self, batch: list[Group], width: int, context: int) -> None:
    """One prefill call for `batch`: store each prompt past its cached prefix in fresh blocks (the prefix read
    from its `context` blocks), then sample every sample's first token."""
    engine, kv = self.engine, self.engine.kv
    block_size = engine.block_size
    rows = self._prefill_rows(width, context)
    ids = np.zeros((rows, width), np.int32)
    lengths = np.zeros(rows, np.int32)
    block_ids = np.full((rows, width // block_size), paged.TRASH_BLOCK, np.int32)
    context_table = np.full((rows, context), paged.TRASH_BLOCK, np.int32)
    cached_lengths = np.zeros(rows, np.int32)
    registered = []
    for r, group in enumerate(batch):
      start = len(group.cached_blocks) * block_size
      ids[r, :len(group.prompt) - start] = group.prompt[start:]
      lengths[r], cached_lengths[r] = len(group.prompt) - start, start
      context_table[r, :len(group.cached_blocks)] = group.cached_blocks
      fresh, to_register = kv.store_prompt(group)
      block_ids[r, :len(fresh)] = fresh
      registered += to_register
    samples = [(r, g, j) for r, g in enumerate(batch) for j in range(g.request.n)]
    outputs = engine.prefill_call((ids, lengths, block_ids, context_table, cached_lengths),
                                  self._first_token_inputs(samples, rows))
    # Registered after the batch's lookups: no prompt of a call reads blocks that the same call writes.
    for block, digest in registered:
      kv.table.register(block, digest)
    engine.stats["prefill_calls"] += 1
    engine.stats["prefill_tokens"] += int(lengths.sum())
    engine.stats["prefill_padded_tokens"] += ids.size
    engine.stats["cached_tokens"] += int(cached_lengths.sum())
    # The prompts' blocks are held here even when every sample ends at its first token (never admitted to a slot).
    engine.stats["peak_blocks"] = max(engine.stats["peak_blocks"], engine.blocks_in_use)
    for s, (_, group, j) in enumerate(samples):
      group.first[j] = tuple(x[s].item() for x in outputs)  # token, logprob, sampling logprob, finish code

  def _prefill_rows(self, width: int, context: int) -> int:
    """A prefill call's rows: the most (a power of 4) whose padded tail tokens fit `prefill_tokens` and whose keys
    (cached prefix and tail) fit PREFILL_KEYS x that, whatever the batch holds, so a (width, context) bucket is one
    program (padding rows cost compute, not compiles). A cached prefix token costs a key, not a forward."""
    budget = self.engine.prefill_tokens
    keys = width + context * self.engine.block_size
    rows = 1
    while rows * 4 * width <= budget and rows * 4 * keys <= PREFILL_KEYS * budget:
      rows *= 4
    return rows

  def _first_token_inputs(self, samples: list[tuple[int, Group, int]], rows: int) -> tuple[np.ndarray, ...]:
    """`paged.first_tokens`' per-sample inputs, padded to a bucket (>= the prefill rows: one bucket for n=1)."""
    m = pow4_at_least(len(samples), max(MIN_FIRST_TOKENS, rows))
    column = lambda values, dtype: np.asarray(list(values) + [0] * (m - len(samples)), dtype)
    key_ids = select.key_ids(self.seed, column((g.uid_int for _, g, _ in samples), np.uint32),
                             column((j for _, _, j in samples), np.uint32))
    stop_ids = np.full((m, STOP_SLOTS), -1, np.int32)
    for s, (_, g, _) in enumerate(samples):
      stop_ids[s, :len(g.request.stop_ids)] = g.request.stop_ids
    return (column((r for r, _, _ in samples), np.int32), key_ids,
            column((len(g.prompt) for _, g, _ in samples), np.int32),
            column((g.request.temperature for _, g, _ in samples), np.float32),
            column((g.request.top_k for _, g, _ in samples), np.int32),
            column((g.request.top_p for _, g, _ in samples), np.float32), stop_ids,
            column((g.request.max_new_tokens for _, g, _ in samples), np.int32),
            np.full(m, self.engine.capacity, np.int32))

  def _finish_early_samples(self, group: Group) -> None:
    """Samples whose first token already ends them (a stop id, max_new 1, a full capacity) never take a slot."""
    for j in list(group.waiting):
      token, logprob, sampling_logprob, code = group.first[j]
      if code != paged.RUNNING:
        group.waiting.remove(j)
        sample = Slot(group, j, [], len(group.prompt))
        sample.record([token], [logprob], [sampling_logprob])
        self._deliver(group, j, sample.result(code, self.engine.block_size))
        self.engine.kv.finish_sample(group)
    if not group.waiting:
      self.engine.kv.all_admitted(group)

  # -- one chunk ---------------------------------------------------------------------------------------------

  def _chunk_rows(self, occupied: int) -> int:
    """The chunk's row bucket: the smallest of slots, slots / 2, ... slots / 2**(CHUNK_ROW_BUCKETS - 1) (rounded
    up) holding every occupied slot, so a draining queue's last rows do not pay for every idle slot."""
    slots = self.engine.slots
    return min(b for b in (-(-slots // 2**k) for k in range(CHUNK_ROW_BUCKETS)) if b >= occupied)

  def _slot_batch(self, occupied: list[Slot], rows: int, copies: list[tuple[int, int]]) -> paged.SlotBatch:
    """The chunk's inputs: row r runs occupied[r] (rows past them idle); where a slot sits on the host is
    irrelevant, its keys and position decide what it samples. Built a column at a time from Python lists."""
    n = len(occupied)
    requests = [slot.group.request for slot in occupied]

    def column(values, dtype):
      out = np.zeros(rows, dtype)
      out[:n] = values
      return out

    table = np.full((rows, self.engine.max_blocks), paged.TRASH_BLOCK, np.int32)
    stop_ids = np.full((rows, STOP_SLOTS), -1, np.int32)
    for s, slot in enumerate(occupied):
      blocks = slot.group.shared_blocks + slot.own_blocks
      table[s, :len(blocks)] = blocks
      stop_ids[s, :len(slot.group.request.stop_ids)] = slot.group.request.stop_ids
    key_ids = select.key_ids(self.seed, column([slot.group.uid_int for slot in occupied], np.uint32),
                             column([slot.sample for slot in occupied], np.uint32))
    copy_src, copy_dst = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for i, (src, dst) in enumerate(copies):  # at most one per slot admitted since the last chunk
      copy_src[i], copy_dst[i] = src, dst
    return paged.SlotBatch(
        block_table=table, active=np.arange(rows) < n, key_ids=key_ids, stop_ids=stop_ids,
        length=column([slot.length for slot in occupied], np.int32),
        last_token=column([slot.last_token for slot in occupied], np.int32),
        generated=column([len(slot.tokens) for slot in occupied], np.int32),
        max_new=column([r.max_new_tokens for r in requests], np.int32),
        capacity=column(self.engine.capacity, np.int32),
        top_k=column([r.top_k for r in requests], np.int32),
        temperature=column([r.temperature for r in requests], np.float32),
        top_p=column([r.top_p for r in requests], np.float32), copy_src=copy_src, copy_dst=copy_dst)

  def _span_blocks(self) -> int:
    """The attention span bucket (`span_bucket`) covering every active slot through this chunk."""
    engine = self.engine
    longest = max(slot.length for slot in self._slots if slot is not None) + engine.chunk_steps
    return span_bucket(-(-longest // engine.block_size), engine.block_size, engine.max_blocks)

  def _run_chunk(self, copies: list[tuple[int, int]]) -> None:
    engine = self.engine
    where = [s for s, slot in enumerate(self._slots) if slot is not None]
    rows = self._chunk_rows(len(where))
    out = engine.chunk_call(self._slot_batch([self._slots[s] for s in where], rows, copies), self._span_blocks())
    steps = int(out.steps)
    engine.stats["chunks"] += 1
    engine.stats["decode_steps"] += steps
    engine.stats["slot_steps"] += steps * rows  # rows the chunk computed, idle ones included
    engine.stats["chunk_rows_below_slots"] += rows < engine.slots
    engine.stats["cow_copies"] += len(copies)
    n = len(where)  # each output array to Python lists once, then sliced per row
    produced_all, finish = out.produced[:n].tolist(), out.finish[:n].tolist()
    tokens, logprobs, sampling_logprobs = (x[:n].tolist() for x in (out.tokens, out.logprobs,
                                                                    out.sampling_logprobs))
    engine.stats["decode_tokens"] += sum(produced_all)
    for r, s in enumerate(where):
      slot, produced = self._slots[s], produced_all[r]
      slot.record(tokens[r][:produced], logprobs[r][:produced], sampling_logprobs[r][:produced])
      if finish[r] != paged.RUNNING:
        self._deliver(slot.group, slot.sample, slot.result(finish[r], engine.block_size))
        engine.kv.finish_slot(slot)
        self._slots[s] = None
