"""The device side of sampling: prefill a chunk into the KV cache, fork rows, and the `lax.while_loop` decode.

Pure functions of (model, arrays); `Sampler` jits them once per bucket. Cache layout invariant, kept by every
function here: a row's conversation token at index i lives in cache slot i with position i, for
i < end_index[row]; every slot from end_index on holds position -1 (never attended). So rolling a row back to
its first `keep` tokens is one `where` on the positions, and every turn appends right after the last one — no
holes, no left padding, the cache holds exactly the conversation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rise_jax.models import decode as decode_lib
from rise_jax.models.transformer import KVCache
from rise_jax.sampling import select

RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}


@flax.struct.dataclass
class RowParams:
  """Traced per-row sampling parameters: changing any value never recompiles.

  temperature, top_p: [batch] float32; top_k: [batch] int32; capacity: [batch] int32, the most tokens a row
  may hold (prompt + reply) before it stops with `cache_full`; max_new: [] int32; stop_ids: [slots] int32,
  padded with -1.
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  capacity: jax.Array
  max_new: jax.Array
  stop_ids: jax.Array


@flax.struct.dataclass
class DecodeState:
  """The while-loop carry; every shape static. `step` counts tokens sampled so far (the same for all running
  rows: they start together), `last_token` is each row's newest token, sampled but not yet fed to the cache."""
  step: jax.Array               # []
  done: jax.Array               # [batch] bool
  finish: jax.Array             # [batch] int32 (RUNNING, STOP, LENGTH, CACHE_FULL)
  last_token: jax.Array         # [batch] int32
  tokens: jax.Array             # [batch, max_tokens] int32
  logprobs: jax.Array           # [batch, max_tokens] float32, raw log-softmax at the chosen token
  sampling_logprobs: jax.Array  # [batch, max_tokens] float32
  cache: decode_lib.DecodeCache  # the decode layout while the loop runs
  keys: jax.Array               # [batch] typed keys of (seed, uid, sample index)
  rows: RowParams


def rollback(cache: KVCache, keep: jax.Array) -> KVCache:
  """Keep each row's first `keep[row]` tokens; later slots become empty (position -1)."""
  slots = jnp.arange(cache.positions.shape[1], dtype=jnp.int32)[None, :]
  return cache.replace(positions=jnp.where(slots < keep[:, None], cache.positions, -1),
                       end_index=keep.astype(jnp.int32))


def extend(model, cache: KVCache, ids: jax.Array, lengths: jax.Array, keep: jax.Array,
           last_hidden: jax.Array) -> tuple[KVCache, jax.Array]:
  """Roll each row back to `keep` tokens, then append its first `lengths[row]` ids (right-padded chunk).

  Returns the cache and the final hidden state of each row's last appended token ([batch, d]; rows that append
  nothing keep `last_hidden`). The padded tail of a chunk is written as empty slots and overwritten by the
  next write, so the cache stays hole-free. Requires keep + ids.shape[1] <= cache length for every row.
  """
  cache = rollback(cache, keep)
  width = ids.shape[1]
  offsets = jnp.arange(width, dtype=jnp.int32)[None, :]
  mask = offsets < lengths[:, None]
  hidden, cache = model.hidden(ids, positions=keep[:, None] + offsets, attention_mask=mask, cache=cache)
  cache = cache.replace(end_index=(keep + lengths).astype(jnp.int32))
  last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return cache, jnp.where((lengths > 0)[:, None], last.astype(last_hidden.dtype), last_hidden)


def gather_rows(cache: KVCache, last_hidden: jax.Array | None, rows: jax.Array):
  """The cache (and last hidden states) of `rows`, in that order: n samples copy one prefilled row n times."""
  take = lambda x, axis: jnp.take(x, rows, axis=axis)
  cache = KVCache(k=take(cache.k, 1), v=take(cache.v, 1), positions=take(cache.positions, 0),
                  end_index=take(cache.end_index, 0))
  return cache, None if last_hidden is None else take(last_hidden, 0)


def resize(cache: KVCache, length: int) -> KVCache:
  """The same rows in a longer cache (new slots empty)."""
  pad = length - cache.positions.shape[1]
  pad_kv = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
  return cache.replace(k=jnp.pad(cache.k, pad_kv), v=jnp.pad(cache.v, pad_kv),
                       positions=jnp.pad(cache.positions, ((0, 0), (0, pad)), constant_values=-1))


def finish_code(token: jax.Array, count: jax.Array, position: jax.Array, stop_ids: jax.Array, max_new: jax.Array,
                capacity: jax.Array) -> jax.Array:
  """[rows] finish code after sampling `token` (the `count`-th token of its row, at conversation index
  `position`): STOP on a stop id (stop_ids [1 or rows, k], padded with -1), else LENGTH at `max_new` tokens, else
  CACHE_FULL when the token fills the row's `capacity`, else RUNNING. The engine and the sampler share it."""
  stop = jnp.any(token[:, None] == stop_ids, axis=-1)
  return jnp.where(stop, STOP, jnp.where(count >= max_new, LENGTH,
                                         jnp.where(position + 1 >= capacity, CACHE_FULL, RUNNING)))


def _record(state: DecodeState, logits: jax.Array, cache: KVCache, vocab_limit: int | None) -> DecodeState:
  """Sample each running row's next token from `logits`, store it, and settle who is finished."""
  rows = state.rows
  position = cache.end_index  # the new token's index in its conversation (slot == position)
  keys = select.token_keys(state.keys, position)
  token, logprob, sampling_logprob = select.select_tokens(logits, keys, rows.temperature, rows.top_k, rows.top_p,
                                                           vocab_limit)
  running = ~state.done
  count = state.step + 1
  finish = jnp.where(running, finish_code(token, count, position, rows.stop_ids[None, :], rows.max_new,
                                         rows.capacity), state.finish)
  at = lambda buf, value, fill: buf.at[:, state.step].set(jnp.where(running, value, fill))
  return state.replace(
      step=count, done=finish != RUNNING, finish=finish, last_token=jnp.where(running, token, state.last_token),
      tokens=at(state.tokens, token, 0), logprobs=at(state.logprobs, logprob, 0.0),
      sampling_logprobs=at(state.sampling_logprobs, sampling_logprob, 0.0), cache=cache)


def decode(model, cache: KVCache, last_hidden: jax.Array, keys: jax.Array, rows: RowParams, active: jax.Array,
           max_tokens: int, vocab_limit: int | None = None) -> DecodeState:
  """Sample up to `rows.max_new` tokens per active row (buffers sized `max_tokens`, a static bucket).

  The first token comes from the prefill's last hidden state; each loop step feeds every running row's newest
  token at its own position (`rise_jax.models.decode.decode_hidden`) and samples the next. Finished rows write an empty
  slot and keep their end_index, so their cache ends exactly after their last fed token.
  """
  batch = active.shape[0]
  state = DecodeState(
      step=jnp.zeros((), jnp.int32), done=~active, finish=jnp.full((batch,), RUNNING, jnp.int32),
      last_token=jnp.zeros((batch,), jnp.int32), tokens=jnp.zeros((batch, max_tokens), jnp.int32),
      logprobs=jnp.zeros((batch, max_tokens), jnp.float32),
      sampling_logprobs=jnp.zeros((batch, max_tokens), jnp.float32), cache=decode_lib.DecodeCache.from_kv(cache),
      keys=keys, rows=rows)
  state = _record(state, model.unembed(last_hidden), state.cache, vocab_limit)

  def cond(state: DecodeState):
    return (state.step < max_tokens) & ~jnp.all(state.done)

  layers = decode_lib.layer_weights(model)

  def body(state: DecodeState):
    hidden, cache = decode_lib.decode_hidden(model, state.last_token, ~state.done, state.cache, layers)
    return _record(state, model.unembed(hidden), cache, vocab_limit)

  state = jax.lax.while_loop(cond, body, state)
  return state.replace(cache=state.cache.to_kv())
