"""The rollout engine's host-side block bookkeeping: reference counts and a content-addressed prefix cache.

    blocks = BlockTable(num_blocks)
    ids = blocks.allocate(3)                      # fresh blocks, each with one reference
    blocks.register(ids[0], digest)               # ids[0] holds a full block whose token chain hashes to `digest`
    hit = blocks.lookup(digests)                  # the longest cached run of `digests`, one reference taken on each
    blocks.release(ids)                           # drop one reference each

A full block's digest names its tokens and every token before it (`chain_digests`), so equal digests mean equal
keys and values: a block written by one conversation can be read by any later one that starts with the same
tokens — the n samples of a prompt, the next turn of a conversation (its history is the last prompt plus the
chosen reply), a windowed history sharing the instruction and question. A block whose last reference goes is
kept, still findable, in least-recently-released order, and evicted only when `allocate` runs out of never-used
blocks, so the cache costs no memory that a running request needs. The partly filled last block of a sequence is
never registered (its content is still growing), so a cached block is never written again.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

RESERVED = 0  # block 0 is the pool's trash block: never handed out


def chain_digests(tokens: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
  """One digest per full block of `tokens`: block j's hashes block j - 1's digest (`parent` for the first: the
  digest of the block before `tokens`, empty at a sequence's start) and its own tokens."""
  digests = []
  ids = np.asarray(tokens, np.int64)
  for j in range(len(ids) // block_size):
    parent = hashlib.blake2b(parent + ids[j * block_size:(j + 1) * block_size].tobytes(), digest_size=16).digest()
    digests.append(parent)
  return digests


class BlockTable:
  """Reference counts of the pool's blocks, the free list, and the cache of released full blocks."""

  def __init__(self, num_blocks: int):
    self.num_blocks = int(num_blocks)
    self._free = list(range(self.num_blocks - 1, RESERVED, -1))  # pop() hands out low ids first
    self._refs = np.zeros(self.num_blocks, np.int32)
    self._digest_of: dict[int, bytes] = {}
    self._block_of: dict[bytes, int] = {}
    self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced: LRU first
    self.stats = collections.Counter()

  @property
  def available(self) -> int:
    """Blocks `allocate` can hand out now (never used, or cached without a reference)."""
    return len(self._free) + len(self._idle)

  @property
  def in_use(self) -> int:
    """Blocks some request holds a reference to."""
    return self.num_blocks - 1 - self.available

  @property
  def cached(self) -> int:
    return len(self._block_of)

  def allocate(self, count: int) -> list[int]:
    if count > self.available:
      raise RuntimeError(f"BlockTable: {count} blocks wanted, {self.available} available")
    out = []
    for _ in range(count):
      if self._free:
        block = self._free.pop()
      else:  # evict the least recently released cached block
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._digest_of.pop(block)]
        self.stats["evicted"] += 1
      self._refs[block] = 1
      out.append(block)
    return out

  def release(self, blocks: Sequence[int]) -> None:
    """Drop one reference on each block. Unreferenced cached blocks are evicted in the order they are released
    here, so pass a sequence's blocks tail first: its prefix, the part other sequences share, stays longest."""
    for block in blocks:
      if self._refs[block] < 1:
        raise RuntimeError(f"BlockTable: block {block} released more often than it was taken")
      self._refs[block] -= 1
      if self._refs[block] == 0:
        if block in self._digest_of:
          self._idle[block] = None
        else:
          self._free.append(block)

  def register(self, block: int, digest: bytes) -> None:
    """`block` (referenced, full, its keys and values written or being written by an earlier dispatch) holds the
    chain `digest`. A digest already cached keeps its first block; this one stays private."""
    if self._refs[block] < 1:
      raise RuntimeError(f"BlockTable: block {block} registered without a reference")
    if digest in self._block_of or block in self._digest_of:
      return
    self._block_of[digest] = block
    self._digest_of[block] = digest

  def forget_cached(self) -> None:
    """Empty the cache (the model's weights changed): unreferenced cached blocks become free; a block still
    referenced keeps its contents for its holder but can no longer be found."""
    for block in self._idle:
      self._free.append(block)
    self._idle.clear()
    self._block_of.clear()
    self._digest_of.clear()

  def lookup(self, digests: Sequence[bytes]) -> list[int]:
    """The blocks of the longest cached prefix of `digests`, one reference taken on each (release them)."""
    hit = []
    for digest in digests:
      block = self._block_of.get(digest)
      if block is None:
        break
      hit.append(block)
    for block in hit:
      if self._refs[block] == 0:
        del self._idle[block]
      self._refs[block] += 1
    self.stats["lookup_blocks"] += len(digests)
    self.stats["hit_blocks"] += len(hit)
    return hit


class KVBlocks:
  """The engine's pool bookkeeping per request and sample, over a `BlockTable`: how many blocks a sample needs,
  a prompt's cached prefix and fresh blocks, a sample's own blocks, and what goes back (or into the prefix cache)
  when a sample or request ends. Works on the scheduler's records (`scheduler.Group`, `scheduler.Slot`)."""

  def __init__(self, num_blocks: int, block_size: int, capacity: int, prefix_cache: bool):
    self.table = BlockTable(num_blocks)  # block 0 (the pool's trash block) is never handed out
    self.block_size = block_size
    self.capacity = capacity
    self.prefix_cache = prefix_cache
    self._after_chunk: list[int] = []  # partial prompt blocks whose copies the next chunk makes

  def reset(self) -> None:
    """Forget every reference (a stream abandoned mid-run); the prefix cache goes with them."""
    self.table = BlockTable(self.table.num_blocks)
    self._after_chunk.clear()

  @property
  def pending_release(self) -> bool:
    return bool(self._after_chunk)

  def budget(self, prompt_len: int, max_new: int) -> int:
    """Tokens a sample may hold in the pool: its last sampled token is never fed."""
    return min(prompt_len + max_new, self.capacity) - 1

  def own_blocks(self, prompt_len: int, max_new: int) -> int:
    """Blocks one sample needs beyond the prompt's shared full blocks (its partial-block copy included)."""
    return -(-self.budget(prompt_len, max_new) // self.block_size) - prompt_len // self.block_size

  def prompt_blocks(self, prompt_len: int) -> int:
    return -(-prompt_len // self.block_size)

  def cached_prefix(self, group) -> list[int]:
    """The blocks of the longest cached prefix of the group's prompt (a reference taken on each), leaving at
    least its last token to prefill: the first sampled token needs that token's hidden state."""
    if not self.prefix_cache:
      return []
    if not group.digests:
      group.digests = chain_digests(group.prompt, self.block_size)
    return self.table.lookup(group.digests[:(len(group.prompt) - 1) // self.block_size])

  def store_prompt(self, group) -> tuple[list[int], list[tuple[int, bytes]]]:
    """Fresh blocks for the prompt past its cached prefix: (those blocks, the (block, digest) pairs to register
    once the prefill that writes them is dispatched). Sets the group's shared full blocks and partial block."""
    prompt_len = len(group.prompt)
    fresh = self.table.allocate(self.prompt_blocks(prompt_len) - len(group.cached_blocks))
    blocks = group.cached_blocks + fresh
    full = prompt_len // self.block_size
    group.shared_blocks, group.partial_block = blocks[:full], (blocks[full] if len(blocks) > full else None)
    group.live = group.request.n
    registered = ([(blocks[j], group.digests[j]) for j in range(len(group.cached_blocks), full)]
                  if self.prefix_cache else [])
    return fresh, registered

  def admit(self, group) -> tuple[list[int], tuple[int, int] | None] | None:
    """One sample's own blocks and its copy-on-write pair (partial prompt block -> its first own block), or None
    when the free blocks cannot hold its whole budget yet."""
    need = self.own_blocks(len(group.prompt), group.request.max_new_tokens)
    if need > self.table.available:
      return None
    own = self.table.allocate(need)
    return own, (None if group.partial_block is None else (group.partial_block, own[0]))

  def all_admitted(self, group) -> None:
    """Every sample has its own copy of the partial prompt block: the group's copy goes back once the next chunk
    (which makes the copies) is dispatched; freed now, a prefill before it could overwrite it."""
    if group.partial_block is not None:
      self._after_chunk.append(group.partial_block)
      group.partial_block = None

  def chunk_dispatched(self) -> None:
    self.table.release(self._after_chunk)
    self._after_chunk.clear()

  def finish_slot(self, slot) -> None:
    """A sample in a slot ended: its full blocks (prompt and reply up to its last fed token) join the prefix
    cache — the next turn's prompt is this conversation plus the feedback, so it prefills only what follows
    them — and its own blocks go back."""
    group = slot.group
    prompt_full = len(group.prompt) // self.block_size
    full = slot.length // self.block_size
    if self.prefix_cache and full > prompt_full:
      fed = group.prompt + slot.tokens[:slot.length - len(group.prompt)]
      parent = group.digests[prompt_full - 1] if prompt_full else b""
      digests = chain_digests(fed[prompt_full * self.block_size:full * self.block_size], self.block_size, parent)
      for own, digest in zip(slot.own_blocks, digests):
        self.table.register(own, digest)
    self.table.release(slot.own_blocks[::-1])
    self.finish_sample(group)

  def finish_sample(self, group) -> None:
    """One sample of `group` is done: the last one returns the shared prompt blocks."""
    group.live -= 1
    if group.live == 0:
      self.table.release(group.shared_blocks[::-1])
      group.shared_blocks = []

  def drop_lookup(self, group) -> None:
    """A looked-up prefix the scheduler did not prefill after all: its references go back."""
    self.table.release(group.cached_blocks[::-1])
    group.cached_blocks = []
