"""ThinK: prune each head's key channels by their query-weighted magnitude; values untouched.

Xu et al. observe that key caches have a few dominant channels and that which channels matter
depends on the queries. Per layer, user and head, channel i scores
||Q_i K_i^T||_F = ||Q_i|| ||K_i||, the norm of the i-th column of the last W queries times
that of the stored keys; the ``channels`` best-scoring channels are kept, the others pruned
(the query's pruned channels then contribute nothing to q . k). This module is the whole
method: its factory, memory and spec.

Needs ``signals.window_queries`` [L, B, H, W, Dk] (the last W real queries, rows marked by
``signals.window_valid``), an optional Signals field: a model that does not return its
queries cannot use ThinK (the compressor says so).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache
from malloc_jax.compressors.base import (
  Compressor,
  cache_from,
  index_of,
  index_stored_bytes,
  init_empty,
  row_counts,
)
from malloc_jax.compressors.codebook_quant import index_dtype
from malloc_jax.compressors.eviction import check_int, require_signals
from malloc_jax.compressors.spec import MethodSpec

# Not a budgeted method (no ``tuned``): values are untouched, so even one key channel per head
# stays below the sweep's smallest ratio, 2x; ``channels`` is set directly or "auto".


@struct.dataclass
class ThinKMemory:
  """Stored per user: k [L, B, H, T, c] the kept key channels (ascending channel order),
  channels [L, B, H, c] their indices (uint8 / uint16), v [L, B, H, T, Dv], the index."""

  index: Any
  k: jax.Array
  channels: jax.Array
  v: jax.Array
  dk: int = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    """Keys back at their channels with the pruned channels 0 (so q . k sums kept ones)."""
    hit = (jnp.arange(self.dk)[:, None] == self.channels[..., None, :].astype(jnp.int32))
    # [L, B, H, T, c] x [L, B, H, Dk, c] -> [L, B, H, T, Dk]
    k = jnp.einsum("lbhtc,lbhdc->lbhtd", self.k.astype(jnp.float32), hit.astype(jnp.float32))
    return cache_from(self.index, k.astype(self.k.dtype), self.v)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64 bytes of each user's real events in a variable-length store. With n_r the
    events of the user's (layer, head) row r, c the kept channels, s_k, s_v the itemsizes and
    i the channel index itemsize (a row without events stores no channel indices)::

      sum_r n_r (c s_k + Dv s_v) + [n_r > 0] c i + index_stored_bytes

    (DenseIndex: n s_ts + s_len; SparseIndex: sum_r n_r (s_pos + s_ts) + s_len).
    """
    L, _, H, _, c = self.k.shape
    n = row_counts(self.index, L, H)  # [L, B, H]
    kv = n * (c * self.k.dtype.itemsize + self.v.shape[-1] * self.v.dtype.itemsize)
    idx = (n > 0) * c * self.channels.dtype.itemsize
    return (kv + idx).sum(axis=(0, 2)) + index_stored_bytes(self.index, n)


def think_scores(cache: Cache, queries: jax.Array, valid: jax.Array) -> jax.Array:
  """[L, B, H, Dk] ||Q_i|| ||K_i|| over the real window queries and the real stored keys."""
  q = jnp.where(valid[None, :, None, :, None], queries.astype(jnp.float32), 0)
  k = jnp.where((cache.pos >= 0)[..., None], cache.k.astype(jnp.float32), 0)
  return jnp.linalg.norm(q, axis=3) * jnp.linalg.norm(k, axis=3)


def think(channels: int) -> Compressor:
  """ThinK query-driven key channel pruning.

  Args:
    channels: key channels kept per layer, user and head (1 .. Dk; the paper prunes 40-50%).

  Returns:
    A Compressor; memory: :class:`ThinKMemory` (bytes per user: L H (T c s_k + c i + T Dv
    s_v) + the index); state: EmptyState; needs ``signals.window_queries``.

  References: Xu, Jie, Yang, Zhou, Yan, Liu, Sahoo, "ThinK: Thinner Key Cache by Query-Driven
    Pruning", ICLR 2025 (arXiv 2407.21018).
  """
  channels = check_int("think", "channels", channels, 1)


  def compress(cache, state, signals=None):
    signals = require_signals("think", signals)
    if signals.window_queries is None:
      raise ValueError("think needs signals.window_queries (the last W queries, [L, B, H, W, "
                       "Dk]); this model's prefill / extend does not return them")
    dk = cache.k.shape[-1]
    if channels > dk:
      raise ValueError(f"think: channels={channels} exceeds the key dimension {dk}")
    score = think_scores(cache, signals.window_queries, signals.window_valid)
    _, top = jax.lax.top_k(score, channels)  # ties: the smaller channel first
    top = jnp.sort(top, axis=-1)  # [L, B, H, c]
    k = jnp.take_along_axis(cache.k, top[..., None, :], axis=-1)  # [L, B, H, T, c]
    k = jnp.where((cache.pos >= 0)[..., None], k, 0)
    memory = ThinKMemory(index=index_of(cache), k=k, channels=top.astype(index_dtype(dk)),
                         v=jnp.where((cache.pos >= 0)[..., None], cache.v, 0), dk=dk)
    return memory, state

  return Compressor(init_empty, compress)


SPECS = (MethodSpec(
    name="think", factory=think, granularity="head", needs_signals=True, limits={"channels": "head_dim"},
    auto={"channels": lambda shape: shape.dk - int(np.floor(0.4 * shape.dk))},
    example={"channels": 3},
    reference="Xu et al., ThinK: Thinner Key Cache by Query-Driven Pruning, ICLR 2025"),)
