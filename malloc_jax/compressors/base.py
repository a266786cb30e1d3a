"""The compressor interface (optax-style) and the memory types compressors return.

A compressor is a NamedTuple of two pure functions, like ``optax.GradientTransformation``::

  comp = lowrank(bases)              # hyperparameters live in the closure
  state = comp.init(cache)           # everything that changes lives in the state
  memory, state = comp.compress(cache, state, signals)
  dense = memory.materialize()       # a Cache again, for the model to read

A *memory* is a registered dataclass whose leaves are exactly what is stored per user.
``nbytes(memory)`` is the sum of those leaves' ``nbytes`` as stored (packed codes, scales,
kept positions and time stamps all count); leaves named in ``shared_fields`` (e.g. low-rank
bases, one copy for all users) are reported separately by ``shared_nbytes``.

Every compressor works under ``jax.jit`` and ``jax.vmap`` (over a leading users axis of
stacked caches); capacities are static and lengths are arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
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
  """Bytes of every per-user leaf of ``memory`` as stored (all users of the batch)."""
  return int(sum(x.nbytes for x in _split_leaves(memory)[0]))


def shared_nbytes(memory) -> int:
  """Bytes stored once for all users (e.g. low-rank bases)."""
  return int(sum(x.nbytes for x in _split_leaves(memory)[1]))


def batch_size(memory) -> int:
  """Number of users in a memory (the length of its index's ``length`` leaf)."""
  return int(memory.index.length.shape[-1])


def bytes_per_user(memory) -> float:
  """Per-user bytes of a batched memory: ``nbytes(memory) / batch_size(memory)``."""
  return nbytes(memory) / batch_size(memory)


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
