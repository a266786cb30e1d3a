"""K-norm eviction: keep the events whose keys have the smallest L2 norm.

Devoto et al. observe that in trained attention the keys with a *small* L2 norm receive high
attention, so a cache can be pruned by key norm alone: no attention scores are needed, which
makes the rule compatible with fused attention kernels and with memories read back from a
store (no signals). This module is the whole method: its factory and its spec.
"""

from __future__ import annotations

import jax.numpy as jnp

from malloc_jax.cache import pad_capacity
from malloc_jax.compressors.base import Compressor, init_empty
from malloc_jax.compressors.eviction import check_int, kept_memory, slot_ranks, top_slots
from malloc_jax.compressors.spec import CacheShape, MethodSpec


def knorm(budget: int, recent: int = 0) -> Compressor:
  """Keeps the ``budget`` events with the smallest key L2 norm, per layer, user and head.

  Exact rule, per layer, user and head: the ``recent`` newest events always stay; among the
  other real events the ``budget - recent`` with the smallest ||k||_2 (computed in float32)
  are kept, ties to the smaller position; a NaN norm ranks last. A row holding at most
  ``budget`` events keeps all of them; empty slots are never kept. Kept slots are compacted
  and ordered by position, with their original positions and timestamps (see
  :mod:`malloc_jax.compressors.eviction`). Once evicted an event never returns: each call
  chooses among the events its input holds.

  Args:
    budget: kept events per head (>= 1). recent: newest events always kept
      (0 <= recent <= budget; 0 is the paper's rule).

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity ``budget``; state:
    EmptyState; no signals needed.

  References: Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based
    Strategy for KV Cache Compression", EMNLP 2024 (arXiv 2406.11430).
  """
  budget = check_int("knorm", "budget", budget, 1)
  recent = check_int("knorm", "recent", recent, 0)
  if recent > budget:
    raise ValueError(f"knorm: recent={recent} must be <= budget={budget}")

  def compress(cache, state, signals=None):
    del signals
    if cache.capacity < budget:
      cache = pad_capacity(cache, budget)
    valid, _, newest = slot_ranks(cache)  # [L, B, H, T]
    norm = jnp.linalg.norm(cache.k.astype(jnp.float32), axis=-1)  # [L, B, H, T]
    tier = jnp.where(valid & (newest < recent), 2, jnp.where(valid, 1, 0))
    sel, picked = top_slots(tier, -norm, cache.pos, budget)  # larger score = smaller norm
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


def _candidates(shape: CacheShape, fixed: dict) -> list[dict]:
  recent = fixed.get("recent", 0)
  return [{**fixed, "budget": b} for b in range(max(1, recent), shape.capacity + 1)]


SPECS = (MethodSpec(
    name="knorm", factory=knorm, granularity="token", tuned="budget", candidates=_candidates,
    limits={"budget": "capacity", "recent": "capacity"},
    example={"budget": 5, "recent": 2},
    reference="Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache "
    "Compression, EMNLP 2024"),)
