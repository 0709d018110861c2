"""The rollout engine's device side: a paged KV pool, prefill into it, first tokens, and multi-step decode chunks.

Pure functions of (model, arrays); `engine.Engine` jits them and owns every decision (which block, which slot).
Pool layout: per layer one [num_blocks, kv_heads, block_size, head_dim] array (per-layer arrays, not one stacked
array: XLA:CPU copies a dynamically indexed layer out every step, see `rise_jax.models.decode`). Head-major
blocks: a slot's gathered blocks transpose into the contiguous decode cache's [kv_heads, tokens, head_dim] inside
the gather's own fusion, so the attention is the contiguous cache's (measured on CPU: the token-major [blocks, block_size,
kv_heads, head_dim] pool's attention was 1.14x slower, `benchmarks/paged_attention.py`). Token i of a slot's
conversation lives at offset i % block_size of block `block_table[slot, i // block_size]`; positions are
implicit (token i has position i, no holes), so a slot needs no positions array. Block `TRASH_BLOCK` is never
allocated: idle slots and padding write there, and no live table points at it below a row's length.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from rise_jax.models import attention as attention_lib
from rise_jax.models import decode as decode_lib
from rise_jax.sampling import select

TRASH_BLOCK = 0
# On CPU a span of PIECED_SPAN_TOKENS or more is attended PIECE_TOKENS at a time with an online softmax: the whole
# gathered span read at once outgrows the caches (SmolLM2's shape, 64 slots, `benchmarks/decode_span.py`: 1.16x a
# step at 512 tokens, 1.28x at 1,024, 2.15x at 2,048). Shorter spans (the toy's) stay whole. Off on accelerators,
# where each piece is more kernel launches.
PIECED_SPAN_TOKENS, PIECE_TOKENS = 512, 128
RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}


@flax.struct.dataclass
class PagedPool:
  """Every layer's keys and values, in blocks shared by all slots (device state, donated through each call)."""
  k: tuple[jax.Array, ...]  # per layer [num_blocks, kv_heads, block_size, head_dim]
  v: tuple[jax.Array, ...]


@flax.struct.dataclass
class SlotBatch:
  """Per-slot inputs of one decode chunk, rebuilt by the host scheduler before every chunk ([slots] unless noted).

  A slot is `active` when it holds a request that has not finished; `length` tokens of its conversation are in
  the pool and `last_token` (its newest sampled token, index `length`) is the next to feed. `generated` counts
  the tokens sampled so far (its own `max_new` ends it). `copy_src -> copy_dst`: the copy-on-write block copies
  (the partly filled last block of a shared prompt) applied before the first step; TRASH_BLOCK -> TRASH_BLOCK
  pads them.
  """
  block_table: jax.Array   # [slots, max_blocks] int32
  length: jax.Array        # int32
  last_token: jax.Array    # int32
  generated: jax.Array     # int32
  active: jax.Array        # bool
  max_new: jax.Array       # int32
  capacity: jax.Array      # int32: most tokens (prompt + reply) the row may hold
  key_ids: jax.Array       # [slots, 3] uint32: (seed, uid, sample), the row's key (`select.row_keys`)
  temperature: jax.Array   # float32
  top_k: jax.Array         # int32
  top_p: jax.Array         # float32
  stop_ids: jax.Array      # [slots, stop_slots] int32, padded with -1
  copy_src: jax.Array      # int32
  copy_dst: jax.Array      # int32


@flax.struct.dataclass
class ChunkOutput:
  """What one decode chunk sampled. A slot that runs at the chunk's start writes columns 0 .. produced - 1."""
  tokens: jax.Array             # [slots, chunk] int32
  logprobs: jax.Array           # [slots, chunk] float32, raw log-softmax at the token
  sampling_logprobs: jax.Array  # [slots, chunk] float32
  produced: jax.Array           # [slots] int32
  finish: jax.Array             # [slots] int32 (RUNNING, STOP, LENGTH, CACHE_FULL)
  steps: jax.Array              # [] int32, decode steps the chunk ran (it ends early when every slot is done)


def init_pool(config, num_blocks: int, block_size: int, dtype) -> PagedPool:
  shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return PagedPool(k=zeros(), v=zeros())


def prefill(model, pool: PagedPool, ids: jax.Array, lengths: jax.Array, block_ids: jax.Array,
            context_table: jax.Array, cached: jax.Array) -> tuple[PagedPool, jax.Array]:
  """Prefill right-padded prompt tails ids [rows, width] (width a multiple of the block size) after each row's
  `cached[r]` tokens (a multiple of the block size) already in the pool's blocks context_table[r] [rows,
  context_blocks; 0 blocks: no row has a cached prefix], and store the tails' keys and values: block j of row r's
  tail goes to block_ids[r, j] (TRASH_BLOCK for blocks past the prompt).

  Each layer writes the tail's keys and values into their blocks, then attends the tail's queries over the row's
  blocks (cached prefix, then tail) read from the pool through its block table. Returns the pool and
  each row's last hidden state [rows, d] (float32), which samples every sample's first token.
  """
  c = model.config
  rows, width = ids.shape
  block_size = pool.k[0].shape[2]
  offsets = jnp.arange(width, dtype=jnp.int32)[None, :]
  positions = jnp.where(offsets < lengths[:, None], cached[:, None] + offsets, -1)  # -1: padding, never attended
  context = context_table.shape[1] * block_size
  key_index = jnp.arange(context, dtype=jnp.int32)[None, :]
  key_positions = jnp.concatenate([jnp.where(key_index < cached[:, None], key_index, -1), positions], axis=1)
  flat_ids = block_ids.reshape(-1)
  table = jnp.concatenate([context_table, block_ids], axis=1)  # the row's blocks: cached prefix, then its tail
  # [rows, width, kv_heads, d] -> [rows * width / block_size, kv_heads, block_size, d] (the pool's blocks)
  as_blocks = lambda x: jnp.swapaxes(x.reshape(rows * (width // block_size), block_size, *x.shape[2:]), 1, 2)
  # the row's blocks [rows, blocks, kv_heads, block_size, d] -> [rows, context + width, kv_heads, d]
  as_tokens = lambda p: jnp.swapaxes(p[table], 2, 3).reshape(rows, context + width, c.num_kv_heads, c.head_dim)

  def attend(q, k, v, layer_pool):
    # Written first, then read back with the prefix: a read of the pool before the in-place write made XLA copy
    # the whole pool (CPU, toy model: ~8x a prefill call with a cached prefix; docs/benchmarks.md).
    k_pool = layer_pool[0].at[flat_ids].set(as_blocks(k.astype(layer_pool[0].dtype)))
    v_pool = layer_pool[1].at[flat_ids].set(as_blocks(v.astype(layer_pool[1].dtype)))
    out = attention_lib.xla_attention(q, as_tokens(k_pool).astype(q.dtype), as_tokens(v_pool).astype(q.dtype),
                                      positions, key_positions, window=c.sliding_window)
    return out, (k_pool, v_pool)

  hidden, kv = decode_lib.cached_layers(model, ids, jnp.maximum(positions, 0), decode_lib.layer_weights(model),
                                        list(zip(pool.k, pool.v)), attend)
  last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return PagedPool(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv)), last


def finish_code(token: jax.Array, count: jax.Array, position: jax.Array, stop_ids: jax.Array, max_new: jax.Array,
                capacity: jax.Array) -> jax.Array:
  """[rows] finish code after sampling `token` (the `count`-th token of its row, at conversation index
  `position`): STOP on a stop id (stop_ids [1 or rows, k], padded with -1), else LENGTH at `max_new` tokens, else
  CACHE_FULL when the token fills the row's `capacity`, else RUNNING. Prefill's first tokens and decode share it."""
  stop = jnp.any(token[:, None] == stop_ids, axis=-1)
  return jnp.where(stop, STOP, jnp.where(count >= max_new, LENGTH,
                                         jnp.where(position + 1 >= capacity, CACHE_FULL, RUNNING)))


def first_tokens(model, hidden: jax.Array, rows: jax.Array, key_ids: jax.Array, position: jax.Array,
                 temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, stop_ids: jax.Array,
                 max_new: jax.Array, capacity: jax.Array, vocab_limit: int | None):
  """Sample j's first token from its prompt's last hidden state hidden[rows[j]], drawn at conversation index
  `position[j]` (the prompt length) with `select`'s key rule: (tokens, logprobs, sampling_logprobs, finish
  codes); a sample whose first token finishes it never takes a decode slot."""
  return sample_step(model, jnp.take(hidden, rows, axis=0), _keys(key_ids), position,
                     jnp.ones_like(position), temperature, top_k, top_p, stop_ids, max_new, capacity, vocab_limit)


def _keys(key_ids: jax.Array) -> jax.Array:
  return select.row_keys(key_ids[:, 0], key_ids[:, 1], key_ids[:, 2])


def sample_step(model, hidden, keys, position, count, temperature, top_k, top_p, stop_ids, max_new, capacity,
                vocab_limit: int | None):
  """The one sampling step of prefill and decode: each row's next token from its final hidden state, drawn at
  conversation index `position` with `select`'s key rule (its `count`-th sampled token): (tokens, raw logprobs,
  sampling logprobs, finish codes)."""
  token, logprob, sampling_logprob = select.select_tokens(model.unembed(hidden), select.token_keys(keys, position),
                                                          temperature, top_k, top_p, vocab_limit)
  return token, logprob, sampling_logprob, finish_code(token, count, position, stop_ids, max_new, capacity)


def copy_blocks(pool: PagedPool, src: jax.Array, dst: jax.Array) -> PagedPool:
  """Block dst[i] becomes a copy of block src[i] in every layer (copy-on-write of a shared partial block)."""
  copy = lambda p: p.at[dst].set(p[src])
  return PagedPool(k=tuple(map(copy, pool.k)), v=tuple(map(copy, pool.v)))


def _pieced_attention(q, k_pool, v_pool, table, visible, piece: int):
  """`attention.decode_attention` over the blocks `table` [slots, span] names, gathered `piece` blocks at a time
  and combined with an online softmax (one piece: the whole span gathered at once, the plain decode attention)."""
  slots, span = table.shape
  kv_heads, block_size, d = k_pool.shape[1:]
  # [slots, piece, kv_heads, block_size, d] -> the contiguous decode cache's [slots, kv_heads, tokens, d]
  gather = lambda p, t: jnp.swapaxes(p[t], 1, 2).reshape(slots, kv_heads, t.shape[1] * block_size, d)
  if piece == span:
    return attention_lib.decode_attention(q, gather(k_pool, table), gather(v_pool, table), visible)
  pieces = span // piece
  tables = jnp.swapaxes(table.reshape(slots, pieces, piece), 0, 1)
  masks = jnp.swapaxes(visible.reshape(slots, pieces, piece * block_size), 0, 1)

  def step(state, xs):
    t, mask = xs
    return attention_lib.online_softmax_step(state, q, gather(k_pool, t), gather(v_pool, t), mask), None

  state, _ = jax.lax.scan(step, attention_lib.online_softmax_init(q, kv_heads), (tables, masks))
  return attention_lib.online_softmax_result(state)


def paged_decode_hidden(model, layers, pool: PagedPool, tokens: jax.Array, length: jax.Array, active: jax.Array,
                        block_table: jax.Array, span_blocks: int, pieced: bool = False
                        ) -> tuple[jax.Array, PagedPool]:
  """Feed tokens[s] at position length[s] for active slots, attending through each slot's block table.

  Only the first `span_blocks` table entries are read (a static bucket covering every active slot's length);
  keys past a slot's position are masked, so the blocks there (unallocated: TRASH_BLOCK) are never attended.
  `pieced` (the engine sets it on CPU): a span of PIECED_SPAN_TOKENS or more is read PIECE_TOKENS at a time.
  Inactive slots write into TRASH_BLOCK. Returns the final normed hidden states [slots, d] and the pool.
  """
  c = model.config
  slots = tokens.shape[0]
  block_size = pool.k[0].shape[2]
  max_blocks = block_table.shape[1]
  own_block = jnp.take_along_axis(block_table, jnp.minimum(length // block_size, max_blocks - 1)[:, None], 1)[:, 0]
  write_block = jnp.where(active, own_block, TRASH_BLOCK)
  write_offset = length % block_size
  table = block_table[:, :span_blocks]
  key_index = jnp.arange(span_blocks * block_size, dtype=jnp.int32)[None, :]
  visible = key_index <= length[:, None]
  if c.sliding_window is not None:
    visible &= length[:, None] - key_index < c.sliding_window
  piece = span_blocks
  if pieced and span_blocks * block_size >= PIECED_SPAN_TOKENS:
    piece = math.gcd(span_blocks, max(1, PIECE_TOKENS // block_size))

  def attend(q, k, v, layer_pool):
    k_pool, v_pool = layer_pool
    k_pool = k_pool.at[write_block, :, write_offset].set(k.astype(k_pool.dtype))
    v_pool = v_pool.at[write_block, :, write_offset].set(v.astype(v_pool.dtype))
    # XLA:CPU materialises the gather (its reduce fusions take no gather), once per layer, step and piece.
    out = _pieced_attention(q, k_pool, v_pool, table, visible, piece)
    return out, (k_pool, v_pool)

  hidden, kv = decode_lib.decode_layers(model, tokens, length, layers, list(zip(pool.k, pool.v)), attend)
  return hidden, PagedPool(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))


@flax.struct.dataclass
class _ChunkCarry:
  step: jax.Array
  pool: PagedPool
  length: jax.Array
  last_token: jax.Array
  generated: jax.Array
  done: jax.Array
  finish: jax.Array
  out: ChunkOutput


def decode_chunk(model, pool: PagedPool, slots: SlotBatch, chunk_steps: int, span_blocks: int,
                 vocab_limit: int | None, pieced: bool = False) -> tuple[PagedPool, ChunkOutput]:
  """Up to `chunk_steps` decode steps for every active slot, each row with its own count, stops and capacity.

  Step: feed each running slot's last token at its own position, sample the next (key = (seed, uid, sample,
  position)), settle who finished (`finish_code`). Ends early when no slot runs.
  """
  pool = copy_blocks(pool, slots.copy_src, slots.copy_dst)
  layers = decode_lib.layer_weights(model)
  keys = _keys(slots.key_ids)
  n = slots.length.shape[0]
  out = ChunkOutput(tokens=jnp.zeros((n, chunk_steps), jnp.int32),
                    logprobs=jnp.zeros((n, chunk_steps), jnp.float32),
                    sampling_logprobs=jnp.zeros((n, chunk_steps), jnp.float32),
                    produced=jnp.zeros((n,), jnp.int32), finish=jnp.full((n,), RUNNING, jnp.int32),
                    steps=jnp.zeros((), jnp.int32))
  carry = _ChunkCarry(step=jnp.zeros((), jnp.int32), pool=pool, length=slots.length, last_token=slots.last_token,
                      generated=slots.generated, done=~slots.active, finish=out.finish, out=out)

  def cond(carry: _ChunkCarry):
    return (carry.step < chunk_steps) & ~jnp.all(carry.done)

  def body(carry: _ChunkCarry):
    running = ~carry.done
    hidden, pool = paged_decode_hidden(model, layers, carry.pool, carry.last_token, carry.length, running,
                                       slots.block_table, span_blocks, pieced)
    position = carry.length + 1  # the new token's index in its conversation
    count = carry.generated + 1
    token, logprob, sampling_logprob, code = sample_step(
        model, hidden, keys, position, count, slots.temperature, slots.top_k, slots.top_p, slots.stop_ids,
        slots.max_new, slots.capacity, vocab_limit)
    finish = jnp.where(running, code, carry.finish)
    at = lambda buf, value: buf.at[:, carry.step].set(jnp.where(running, value, buf[:, carry.step]))
    out = carry.out.replace(tokens=at(carry.out.tokens, token), logprobs=at(carry.out.logprobs, logprob),
                            sampling_logprobs=at(carry.out.sampling_logprobs, sampling_logprob),
                            produced=carry.out.produced + running)
    keep = lambda new, old: jnp.where(running, new, old)
    return _ChunkCarry(step=carry.step + 1, pool=pool, length=keep(position, carry.length),
                       last_token=keep(token, carry.last_token), generated=keep(count, carry.generated),
                       done=finish != RUNNING, finish=finish, out=out)

  carry = jax.lax.while_loop(cond, body, carry)
  return carry.pool, carry.out.replace(finish=carry.finish, steps=carry.step)
