"""Compressors of per-user KV memories: pure functions over the Cache pytree.

Usage::

  from malloc_jax import compressors
  comp = compressors.chain(compressors.native())
  memory, _ = comp.compress(cache, comp.init(cache), signals)
"""

from malloc_jax.compressors.base import (
    ChainState,
    Compressor,
    DenseIndex,
    DenseMemory,
    EmptyState,
    Signals,
    SparseIndex,
    batch_size,
    bytes_per_user,
    cache_from,
    chain,
    identity,
    index_of,
    native,
    nbytes,
    shared_nbytes,
)
from malloc_jax.compressors.lowrank import LowRankBases, LowRankMemory, fit_lowrank, lowrank

__all__ = [
    "ChainState", "Compressor", "DenseIndex", "DenseMemory", "EmptyState", "LowRankBases",
    "LowRankMemory", "Signals", "SparseIndex", "batch_size", "bytes_per_user", "cache_from",
    "chain", "fit_lowrank", "identity", "index_of", "lowrank", "native", "nbytes",
    "shared_nbytes",
]
