"""The cache pytree: per-layer keys and values a recommender stores for each user.

A :class:`Cache` is the dense view every model reads and every compressor writes. All layers
are stacked on a leading axis so a compressor can treat them uniformly:

  k    [L, B, H, T, Dk]  keys (after the model's key projection)
  v    [L, B, H, T, Dv]  values
  pos  [L, B, H, T]      int32 original event index of each slot, -1 for an empty slot
  ts   [L, B, H, T]      int32 timestamp of the event in each slot (0 for empty slots)
  length [B]             int32 number of events seen so far (= position of the next event)

Capacities (T) are static; per-user lengths are arrays, so ``jax.jit`` compiles once per
shape. Occupied slots always form a prefix of the T axis (compressors compact), so the next
free slot of every head is ``fill = sum(pos[0, :, 0] >= 0)``. Evicted events keep their
original ``pos`` and ``ts`` so relative position and time biases stay exact.

``contiguous`` (static) says that every layer and head holds exactly events 0..length-1 in
slot order, as after ``prefill``; such a cache needs no per-head index when stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Cache:
  """Dense per-layer KV cache view. See module docstring for shapes."""

  k: jax.Array  # [L, B, H, T, Dk]
  v: jax.Array  # [L, B, H, T, Dv]
  pos: jax.Array  # [L, B, H, T] int32, -1 empty
  ts: jax.Array  # [L, B, H, T] int32
  length: jax.Array  # [B] int32
  contiguous: bool = struct.field(pytree_node=False, default=True)

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  @property
  def num_heads(self) -> int:
    return self.k.shape[2]

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @property
  def valid(self) -> jax.Array:
    """[L, B, H, T] bool: slot holds an event."""
    return self.pos >= 0

  @property
  def fill(self) -> jax.Array:
    """[B] int32: number of occupied slots (the same for every layer and head)."""
    return jnp.sum(self.pos[0, :, 0] >= 0, axis=-1).astype(jnp.int32)


def empty_cache(num_layers: int, batch: int, heads: int, capacity: int, dk: int, dv: int,
                dtype=jnp.float32) -> Cache:
  """An empty cache of static capacity (all slots empty, length 0)."""
  shape = (num_layers, batch, heads, capacity)
  return Cache(
      k=jnp.zeros(shape + (dk,), dtype),
      v=jnp.zeros(shape + (dv,), dtype),
      pos=jnp.full(shape, -1, jnp.int32),
      ts=jnp.zeros(shape, jnp.int32),
      length=jnp.zeros((batch,), jnp.int32),
  )


def pad_capacity(cache: Cache, capacity: int) -> Cache:
  """Returns the same cache with ``capacity`` slots (>= the current one); new slots empty."""
  extra = capacity - cache.capacity
  if extra < 0:
    raise ValueError(f"capacity {capacity} is smaller than the cache's {cache.capacity}")
  if extra == 0:
    return cache
  pad = lambda x, value: jnp.pad(
      x, [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * (x.ndim - 4), constant_values=value)
  return cache.replace(k=pad(cache.k, 0), v=pad(cache.v, 0), pos=pad(cache.pos, -1),
                       ts=pad(cache.ts, 0))


def append(cache: Cache, k: jax.Array, v: jax.Array, pos: jax.Array, ts: jax.Array) -> Cache:
  """Writes m new slots per user at each user's fill index (gemma-style update).

  The result has capacity ``T + m`` so the write can never overflow or clobber a slot,
  whatever the users' fills are; compressors bring the capacity back to their budget.

  Args:
    cache: cache to extend (any fill).
    k: [L, B, H, m, Dk] new keys; v: [L, B, H, m, Dv] new values.
    pos: [B, m] int32 positions of the new events (-1 for padding).
    ts: [B, m] int32 timestamps.

  Returns:
    The cache with the new slots written; ``length`` advanced by the number of valid events.
  """
  fill = cache.fill  # [B]
  L, _, H = cache.k.shape[:3]
  m = pos.shape[1]
  cache = pad_capacity(cache, cache.capacity + m)
  pos_lbhm = jnp.broadcast_to(pos[None, :, None, :], (L,) + pos.shape[:1] + (H, m))
  ts_lbhm = jnp.broadcast_to(ts[None, :, None, :], pos_lbhm.shape)

  def write_row(buf, new, start):  # buf [L, H, T, ...], new [L, H, m, ...]
    idx = (0, 0, start) + (0,) * (buf.ndim - 3)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), idx)

  def write(buf, new):  # batch axis 1
    return jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)(buf, new, fill)

  n_new = jnp.sum(pos >= 0, axis=-1).astype(jnp.int32)
  return cache.replace(k=write(cache.k, k), v=write(cache.v, v), pos=write(cache.pos, pos_lbhm),
                       ts=write(cache.ts, ts_lbhm), length=cache.length + n_new)


class Signals(struct.PyTreeNode):
  """Attention statistics from ``prefill`` that attention-aware compressors read.

  acc_attn   [L, B, H, T]     attention each cached key received, summed over all queries
                              (softmax probability for SASRec, |SiLU score| / N for HSTU).
  window_attn [L, B, H, W, T] attention rows of each user's last W real queries.
  window_valid [B, W]         bool, row is a real query (users shorter than W have fewer).
  window_queries [L, B, H, W, Dk] or None: those W queries (ThinK's channel scores); None
                              when the model does not return them.
  """

  acc_attn: jax.Array
  window_attn: jax.Array
  window_valid: jax.Array
  window_queries: jax.Array | None = None
