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
    buffer_bytes,
    bytes_per_user,
    cache_from,
    chain,
    events_stored_bytes,
    identity,
    index_of,
    index_stored_bytes,
    native,
    nbytes,
    packed_bytes,
    row_counts,
    shared_nbytes,
    state_shape,
    stored_bytes,
    user_bytes,
)
from malloc_jax.compressors.budget import (
    budget_bytes,
    cache_spec,
    cell_bytes,
    cell_bytes_row,
    full_user,
    memory_bytes,
    native_stored_bytes,
    params_for_ratio,
    ratio_table,
)
from malloc_jax.compressors.eviction import (
    H2OState,
    RandomState,
    h2o,
    random,
    snapkv,
    streaming,
    user_fingerprint,
)
from malloc_jax.compressors.lowrank import LowRankBases, LowRankMemory, fit_lowrank, lowrank
from malloc_jax.compressors.merging import merge_evicted
from malloc_jax.compressors.quantization import (
    IntactKVMemory,
    KiviMemory,
    QuantSpec,
    UniformMemory,
    intactkv,
    kivi,
    pack_codes,
    uniform,
    unpack_codes,
)
from malloc_jax.compressors.registry import FACTORIES, make_compressor, method_parameters

__all__ = [
    "ChainState", "Compressor", "DenseIndex", "DenseMemory", "EmptyState", "LowRankBases",
    "LowRankMemory", "Signals", "SparseIndex", "batch_size", "bytes_per_user", "cache_from",
    "chain", "fit_lowrank", "identity", "index_of", "lowrank", "native", "nbytes",
    "shared_nbytes",
    # bytes per user
    "buffer_bytes", "cell_bytes", "cell_bytes_row", "events_stored_bytes", "full_user", "index_stored_bytes", "native_stored_bytes", "packed_bytes",
    "row_counts", "state_shape", "stored_bytes", "user_bytes", "user_fingerprint",
    # post-hoc library
    "FACTORIES", "H2OState", "IntactKVMemory", "KiviMemory", "QuantSpec", "RandomState",
    "UniformMemory", "budget_bytes", "cache_spec", "h2o", "intactkv", "kivi", "make_compressor",
    "memory_bytes", "merge_evicted", "method_parameters", "pack_codes", "params_for_ratio",
    "random", "ratio_table", "snapkv", "streaming", "uniform", "unpack_codes",
]
