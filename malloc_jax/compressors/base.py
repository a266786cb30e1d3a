"""The compressor interface (optax-style) and the memory types compressors return.

A compressor is a NamedTuple of two pure functions, like ``optax.GradientTransformation``::

  comp = lowrank(bases)              # hyperparameters live in the closure
  state = comp.init(cache)           # everything that changes lives in the state
  memory, state = comp.compress(cache, state, signals)
  dense = memory.materialize()       # a Cache again, for the model to read

A *memory* is a registered dataclass whose leaves are what a serving batch holds per user.
Two exact byte figures, per user (see :func:`stored_bytes` and :func:`buffer_bytes`):

* ``stored_bytes(memory, state)`` [B]: what each user's memory needs in a variable-length
  store: only the user's real kept or quantized events, their packed codes
  (``ceil(bits * count / 8)``), scales and minima of real groups, positions and time stamps
  where the index needs them, the residual events only, plus per-user compressor state a
  later request needs (H2O's accumulated attention). Each memory type owns its closed form
  (a ``stored_bytes`` method, formula in its docstring). Compression ratios use this figure.
* ``buffer_bytes(memory, state)`` [B]: the static-capacity buffer of a serving batch, the
  ``nbytes`` of every per-user leaf (empty slots included) divided by the batch size.
  ``nbytes``, ``bytes_per_user`` are this buffer figure.

Leaves named in ``shared_fields`` (e.g. low-rank bases, one copy for all users) count in
neither and are reported by ``shared_nbytes``.

Every compressor works under ``jax.jit`` and ``jax.vmap`` (over a leading users axis of
stacked caches); capacities are static and lengths are arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache, Signals
from malloc_jax.compressors.spec import MethodSpec


class Memory(Protocol):
  """What a compressor returns: stored leaves plus a way back to a dense Cache."""

  shared_fields: ClassVar[tuple[str, ...]]

  def materialize(self) -> Cache:
    ...


class Compressor(NamedTuple):
  """A compressor: ``init(cache) -> state``, ``compress(cache, state, signals) -> (memory, state)``."""

  init: Callable[[Cache], Any]
  compress: Callable[[Cache, Any, Signals | None], tuple[Any, Any]]


class EmptyState(NamedTuple):
  """State of a stateless compressor."""


def init_empty(cache) -> EmptyState:
  """The ``init`` of every stateless compressor (as ``optax.init_empty_state``)."""
  del cache
  return EmptyState()


# ----------------------------------------------------------------------------------------
# Index: which event each stored slot holds.


@struct.dataclass
class DenseIndex:
  """Index of a contiguous cache: slot t of every layer and head holds event t.

  ts [B, T] int32; length [B] int32. Positions are implicit, so nothing per head is stored.
  """

  ts: jax.Array
  length: jax.Array

  def expand(self, num_layers: int, num_heads: int) -> tuple[jax.Array, jax.Array]:
    B, T = self.ts.shape
    slot = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = jnp.where(slot < self.length[:, None], slot, -1)
    shape = (num_layers, B, num_heads, T)
    pos = jnp.broadcast_to(pos[None, :, None, :], shape)
    ts = jnp.broadcast_to(jnp.where(pos >= 0, self.ts[None, :, None, :], 0), shape)
    return pos, ts


@struct.dataclass
class SparseIndex:
  """Index of a cache where heads keep different events: pos, ts [L, B, H, T]; length [B]."""

  pos: jax.Array
  ts: jax.Array
  length: jax.Array

  def expand(self, num_layers: int, num_heads: int) -> tuple[jax.Array, jax.Array]:
    del num_layers, num_heads
    return self.pos, self.ts


def index_of(cache: Cache) -> DenseIndex | SparseIndex:
  """The smallest index that describes ``cache``'s slots."""
  if cache.contiguous:
    return DenseIndex(ts=cache.ts[0, :, 0], length=cache.length)
  return SparseIndex(pos=cache.pos, ts=cache.ts, length=cache.length)


def cache_from(index: DenseIndex | SparseIndex, k: jax.Array, v: jax.Array) -> Cache:
  """Rebuilds a dense Cache from an index and dense k [L,B,H,T,Dk], v [L,B,H,T,Dv]."""
  pos, ts = index.expand(k.shape[0], k.shape[2])
  return Cache(k=k, v=v, pos=pos, ts=ts, length=index.length,
               contiguous=isinstance(index, DenseIndex))


@struct.dataclass
class DenseMemory:
  """Keys and values stored as they are (native cache, or the kept events after eviction)."""

  index: Any
  k: jax.Array  # [L, B, H, T, Dk]
  v: jax.Array  # [L, B, H, T, Dv]
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    return cache_from(self.index, self.k, self.v)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64: stored bytes of each user's kept events.

    With m = the slots a (layer, head) row stores (up to its last occupied slot, see
    :func:`row_counts`; = the events kept), s_k, s_v the itemsizes::

      sum_rows m * (Dk * s_k + Dv * s_v) + index_stored_bytes
    """
    L, B, H = self.k.shape[:3]
    if isinstance(self.index, SparseIndex) and self.index.pos.shape[-1] == 0:
      # The Cache view of a fixed-size state (models.variants.common.FixedState: Linformer,
      # RWKV, linear attention), passed through native(): the state packed into k [L, B, 1,
      # 1, S] with no slot index. It stores its whole buffer and its length, as the state
      # itself does (stored_bytes of a FixedState).
      per_user = (self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize) // B
      return np.full((B,), per_user + self.index.length.dtype.itemsize, np.int64)
    m = row_counts(self.index, L, H, last_occupied=True)  # [L, B, H]
    per = self.k.shape[-1] * self.k.dtype.itemsize + self.v.shape[-1] * self.v.dtype.itemsize
    return m.sum(axis=(0, 2)) * per + index_stored_bytes(self.index, m)


# ----------------------------------------------------------------------------------------
# Bytes.


def _split_leaves(memory) -> tuple[list, list]:
  """(per-user leaves, shared leaves) of a memory; nested memories are walked.

  Static fields (``pytree_node=False``: layouts, flags) are aux data, not stored bytes.
  """
  per_user, shared = [], []
  names = getattr(memory, "shared_fields", ())
  if dataclasses.is_dataclass(memory):
    for field in dataclasses.fields(memory):
      if not field.metadata.get("pytree_node", True):
        continue
      value = getattr(memory, field.name)
      if field.name in names:
        shared.extend(jax.tree.leaves(value))
      elif dataclasses.is_dataclass(value):
        p, s = _split_leaves(value)
        per_user.extend(p)
        shared.extend(s)
      else:
        per_user.extend(jax.tree.leaves(value))
  else:
    per_user.extend(jax.tree.leaves(memory))
  return per_user, shared


def nbytes(memory) -> int:
  """Buffer bytes of every per-user leaf of ``memory`` (all users of the batch, empty slots
  included): ``sum(buffer_bytes(memory))``."""
  return int(sum(x.nbytes for x in _split_leaves(memory)[0]))


def shared_nbytes(memory) -> int:
  """Bytes stored once for all users (e.g. low-rank bases)."""
  return int(sum(x.nbytes for x in _split_leaves(memory)[1]))


def batch_size(memory) -> int:
  """Number of users in a memory (the length of its index's ``length`` leaf)."""
  return int(memory.index.length.shape[-1])


def bytes_per_user(memory) -> float:
  """Buffer bytes per user of a batched memory: ``nbytes(memory) / batch_size(memory)``.

  The static-capacity figure (``buffer_bytes``); ratios use :func:`stored_bytes`.
  """
  return nbytes(memory) / batch_size(memory)


def row_counts(index, num_layers: int, num_heads: int, last_occupied: bool = False
               ) -> np.ndarray:
  """[L, B, H] int64: events each (layer, user, head) row of a memory holds (host NumPy).

  DenseIndex: min(length, T) for every row. SparseIndex: the occupied slots (pos >= 0), or
  with ``last_occupied`` the slots up to and including the last occupied one. The cache
  invariant (occupied slots are a prefix) makes both equal; the second also counts per-user
  slots a model keeps before its events with pos = -1 (Longformer's global tokens).
  """
  if isinstance(index, DenseIndex):
    T = index.ts.shape[-1]
    n = np.minimum(np.asarray(index.length, np.int64), T)  # [B]
    return np.broadcast_to(n[None, :, None], (num_layers, n.shape[0], num_heads)).copy()
  occupied = np.asarray(index.pos) >= 0  # [L, B, H, T]
  if not last_occupied:
    return occupied.sum(axis=-1, dtype=np.int64)
  T = occupied.shape[-1]
  last = T - np.argmax(occupied[..., ::-1], axis=-1)
  return np.where(occupied.any(axis=-1), last, 0).astype(np.int64)


def index_stored_bytes(index, counts: np.ndarray) -> np.ndarray:
  """[B] int64: stored bytes of a memory's index for rows holding ``counts`` [L, B, H] events.

  DenseIndex (positions implicit, one time stamp per event, shared by every row):
  ``n * s_ts + s_len``. SparseIndex (each row keeps its own events):
  ``sum_rows m * (s_pos + s_ts) + s_len``. The length is one number per user.
  """
  s_len = index.length.dtype.itemsize
  if isinstance(index, DenseIndex):
    return counts[0, :, 0] * index.ts.dtype.itemsize + s_len
  per = index.pos.dtype.itemsize + index.ts.dtype.itemsize
  return counts.sum(axis=(0, 2)) * per + s_len


def packed_bytes(count, bits: int):
  """Bytes of ``count`` codes of ``bits`` bits packed contiguously: ceil(bits * count / 8)."""
  return -(-(np.asarray(count, np.int64) * bits) // 8)


def _is_state_index(index) -> bool:
  """A fixed-size state's index holds only ``length`` (no positions or time stamps)."""
  return (dataclasses.is_dataclass(index)
          and [f.name for f in dataclasses.fields(index)] == ["length"])


def _state_nodes(state) -> list:
  """Compressor states in ``state`` that own per-user bytes (have ``stored_bytes``)."""
  if state is None:
    return []
  if hasattr(state, "stored_bytes"):
    return [state]
  if isinstance(state, tuple):
    return [n for s in state for n in _state_nodes(s)]
  return []


def stored_bytes(memory, state=None) -> np.ndarray:
  """[B] int64: exact bytes each user's memory needs in a variable-length store.

  The memory's closed form (``memory.stored_bytes()``, formula in each memory type's
  docstring) plus the per-user part of ``state`` (the compressor state a later request
  needs: :class:`~malloc_jax.compressors.eviction.H2OState` counts one accumulated-attention
  number per kept event; pass the state ``compress`` returned, or its abstract shape from
  ``jax.eval_shape``). Fixed-size memories (an index holding only ``length``, e.g. RWKV
  states) store their whole buffer, so stored = buffer for them.

  Args:
    memory: a batched memory with concrete leaves (the index is read on the host).
    state: the compressor's state, or None (no per-user state counted).

  Returns:
    int64 [B].

  Raises:
    TypeError: the memory type has no closed form.
  """
  if hasattr(memory, "stored_bytes"):
    out = np.asarray(memory.stored_bytes(), np.int64)
  elif _is_state_index(getattr(memory, "index", None)):
    per_user = nbytes(memory)
    B = batch_size(memory)
    if per_user % B:
      raise TypeError(f"stored_bytes: {type(memory).__name__} leaves do not split evenly "
                      f"over {B} users")
    out = np.full((B,), per_user // B, np.int64)
  else:
    raise TypeError(f"stored_bytes: {type(memory).__name__} has no stored_bytes() closed "
                    f"form; add one (see compressors.base)")
  for node in _state_nodes(state):
    out = out + np.asarray(node.stored_bytes(memory), np.int64)
  return out


def buffer_bytes(memory, state=None) -> np.ndarray:
  """[B] float64: static-capacity buffer bytes per user (``bytes_per_user``, the same for
  every user), plus the buffer of the per-user state if ``state`` is given."""
  B = batch_size(memory)
  out = np.full((B,), nbytes(memory) / B, np.float64)
  for node in _state_nodes(state):
    out = out + node.buffer_bytes()
  return out


def state_shape(compressor: Compressor, memory):
  """Abstract state (``jax.ShapeDtypeStruct`` leaves) of ``compressor`` for ``memory``'s batch:
  what :func:`stored_bytes` needs to count the per-user state without running anything."""
  return jax.eval_shape(lambda m: compressor.init(m.materialize()), memory)


def user_bytes(memory, compressor: Compressor | None = None) -> np.ndarray:
  """[2, B]: (stored_bytes, buffer_bytes) per user of ``memory``, with the per-user state of
  ``compressor`` (if given) counted in both. For result rows."""
  state = None if compressor is None else state_shape(compressor, memory)
  return np.stack([stored_bytes(memory, state).astype(np.float64),
                   buffer_bytes(memory, state)])


def events_stored_bytes(items, ts, length) -> np.ndarray:
  """[B] int64: stored bytes of raw histories (what the recompute reference keeps): one item
  id and one time stamp per real event plus the length, ``n * (s_item + s_ts) + s_len``."""
  n = np.asarray(length).astype(np.int64)
  return n * (items.dtype.itemsize + ts.dtype.itemsize) + length.dtype.itemsize


# ----------------------------------------------------------------------------------------
# Composition.


def identity() -> Compressor:
  """The native cache: stores keys and values as they are.

  References: the uncompressed KV cache of M-FALCON serving (Zhai et al., ICML 2024).
  """

  def compress(cache, state, signals=None):
    del signals
    return DenseMemory(index=index_of(cache), k=cache.k, v=cache.v), state

  return Compressor(init_empty, compress)


native = identity


class ChainState(NamedTuple):
  inner: tuple


def chain(*compressors: Compressor) -> Compressor:
  """Applies compressors in order, each to the previous one's materialized memory.

  Token-level steps (eviction, merging) go first and one encoding step (quantization, low
  rank) last, e.g. ``chain(snapkv(...), kivi(bits=2))``. Signals are passed to every step;
  steps after an eviction must not rely on them (their slots have moved). The stored memory,
  and so the bytes, are those of the last step.
  """
  if not compressors:
    raise ValueError("chain() needs at least one compressor")

  def init(cache):
    return ChainState(tuple(c.init(cache) for c in compressors))

  def compress(cache, state, signals=None):
    memory, new_states = None, []
    for i, (comp, s) in enumerate(zip(compressors, state.inner)):
      if i > 0:
        cache = memory.materialize()
        signals = None
      memory, s = comp.compress(cache, s, signals)
      new_states.append(s)
    return memory, ChainState(tuple(new_states))

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# Registration (see malloc_jax.compressors.spec).

SPECS = (MethodSpec(
    name="native", factory=identity, granularity="none",
    reference="the uncompressed KV cache of M-FALCON serving (Zhai et al., ICML 2024)"),)
