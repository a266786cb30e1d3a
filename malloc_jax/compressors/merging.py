"""Token merging: evict as H2O does, but fold every evicted key and value into a kept one.

References: Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Long-Context
  Inference of Large Language Models", 2024; Zhang et al., "CaM: Cache Merging for
  Memory-efficient LLMs Inference", ICML 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.compressors.base import Compressor
from malloc_jax.compressors.eviction import (
  H2OState,
  check_int,
  h2o_scores,
  h2o_select,
  heavy_recent_candidates,
  kept_memory,
  mark_slots,
  take_slots,
)
from malloc_jax.compressors.spec import MethodSpec


def merge_evicted(heavy: int, recent: int, accumulate: bool = True,
                  eps: float = 1e-12) -> Compressor:
  """H2O eviction whose evicted events are merged into their most similar kept event.

  Exact rule, per layer, user and head (a_i = accumulated attention of event i, as in
  :func:`~malloc_jax.compressors.eviction.h2o`):

  1. The kept set S is H2O's: the ``recent`` newest events plus the ``heavy`` events with the
     largest a_i among the rest (ties to the smaller position). E = the other real events.
  2. Each evicted e in E picks the target s(e) = argmax_{s in S} cos(k_e, k_s), the cosine
     similarity of the keys (norms floored at ``eps``); ties go to the kept event with the
     smaller position.
  3. Every kept s with at least one merged event, G_s = {s} ∪ {e : s(e) = s}, becomes
     k_s <- sum_{i in G_s} a_i k_i / sum_{i in G_s} a_i, and the same for v_s (computed in
     float32). If that mass is zero, k_s and v_s stay unchanged; kept events with nothing
     merged into them are bit-for-bit unchanged. The kept event's position and timestamp
     stay its own; its accumulated mass in the state becomes sum_{i in G_s} a_i.

  The similarities take O(T * budget) memory per layer, user and head (a [L, B, H, T, budget]
  float32 array); the folding itself is a segment sum.

  Args:
    heavy: number of heavy hitters (>= 0). recent: recent window (>= 0).
    accumulate: carry accumulated attention in the state across calls (as h2o).
    eps: floor of the key norms in the cosine similarity.

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity heavy + recent; state:
    :class:`~malloc_jax.compressors.eviction.H2OState`. Needs signals.

  References: Wan et al., D2O (2024); Zhang et al., CaM (ICML 2024); eviction as
    Zhang et al., H2O (NeurIPS 2023).
  """
  heavy = check_int("merge_evicted", "heavy", heavy)
  recent = check_int("merge_evicted", "recent", recent)
  budget = heavy + recent
  if budget < 1:
    raise ValueError(f"merge_evicted: heavy + recent must be >= 1; got heavy={heavy}, "
                     f"recent={recent}")

  def init(cache):
    return H2OState(jnp.zeros(cache.pos.shape[:3] + (budget,), jnp.float32))

  def compress(cache, state, signals=None):
    cache, acc = h2o_scores("merge_evicted", cache, state, signals, budget, accumulate)
    sel, picked = h2o_select(cache, acc, heavy, recent)  # [L, B, H, b]
    T = cache.capacity
    k = cache.k.astype(jnp.float32)  # [L, B, H, T, Dk]
    v = cache.v.astype(jnp.float32)  # [L, B, H, T, Dv]
    kept_k, kept_v = take_slots(k, sel), take_slots(v, sel)  # [L, B, H, b, D]
    kept_a = jnp.where(picked, take_slots(acc, sel), 0.0)  # [L, B, H, b]
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    sim = jnp.einsum("lbhtd,lbhsd->lbhts", unit(k), unit(kept_k))  # [L, B, H, T, b]
    sim = jnp.where(picked[..., None, :], sim, -jnp.inf)
    target = jnp.argmax(sim, axis=-1).astype(jnp.int32)  # [L, B, H, T], first max wins
    evicted = (cache.pos >= 0) & ~mark_slots(sel, picked, T)  # [L, B, H, T]
    w = jnp.where(evicted, acc, 0.0)  # [L, B, H, T]
    # Per row, sum the evicted events' weighted keys and values into their targets.
    rows = int(np.prod(target.shape[:-1]))
    seg = lambda x, ids: jax.vmap(lambda d, i: jax.ops.segment_sum(d, i, budget))(
        x.reshape((rows, T) + x.shape[4:]), ids.reshape(rows, T)).reshape(
            target.shape[:-1] + (budget,) + x.shape[4:])
    ids = jnp.where(evicted, target, budget)  # out-of-range ids are dropped
    mass = kept_a + seg(w, ids)  # [L, B, H, b]
    merged = seg(evicted.astype(jnp.int32), ids) > 0  # [L, B, H, b]
    safe = jnp.where(mass > 0, mass, 1.0)[..., None]
    new_k = (seg(w[..., None] * k, ids) + kept_a[..., None] * kept_k) / safe
    new_v = (seg(w[..., None] * v, ids) + kept_a[..., None] * kept_v) / safe
    use = (merged & (mass > 0))[..., None]
    new_k = jnp.where(use, new_k, take_slots(cache.k, sel).astype(jnp.float32))
    new_v = jnp.where(use, new_v, take_slots(cache.v, sel).astype(jnp.float32))
    memory = kept_memory(cache, sel, picked, k=new_k, v=new_v)
    return memory, H2OState(jnp.where(picked, mass, 0.0))

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# Registration (see malloc_jax.compressors.spec).

SPECS = (MethodSpec(
    name="merge_evicted", factory=merge_evicted, granularity="token", tuned="budget",
    candidates=heavy_recent_candidates, needs_signals=True,
    limits={"heavy": "capacity", "recent": "capacity"},
    example={"heavy": 2, "recent": 2},
    reference="Wan et al., D2O (2024); Zhang et al., CaM (ICML 2024)"),)
