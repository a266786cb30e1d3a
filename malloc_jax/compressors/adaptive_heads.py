"""Ada-KV: one budget per layer shared by its heads, spent on the top scores across heads.

Feng et al. show that a uniform per-head budget wastes memory on heads whose attention is
concentrated and starves heads whose attention is spread; choosing the layer's events by the
top scores of all its heads together minimizes an upper bound of the eviction loss, so heads
keep different counts. Here the scores are SnapKV's pooled window votes (the paper's
Ada-SnapKV), reused from :mod:`malloc_jax.compressors.eviction`. This module is the whole
method: its factory and its spec.
"""

from __future__ import annotations

import jax.numpy as jnp

from malloc_jax.cache import pad_capacity
from malloc_jax.compressors.base import Compressor, init_empty
from malloc_jax.compressors.eviction import (
  check_snapkv_args,
  compact,
  kept_memory,
  mark_slots,
  pad_slots,
  require_signals,
  slot_ranks,
  snapkv_votes,
  top_slots,
  window_budget_candidates,
)
from malloc_jax.compressors.spec import MethodSpec


def adakv(budget: int, window: int = 8, kernel: int = 5, pool: str = "avg",
          floor: float = 0.2) -> Compressor:
  """Ada-SnapKV: per layer and user, H * (budget - window) events chosen across heads.

  Exact rule, per layer and user, with a = budget - window and f = floor(``floor`` * a):
  every head keeps its ``window`` newest events; every head first keeps its own top f events
  before the window by SnapKV's pooled votes (the safeguard of the authors' code, which
  stops a head from being emptied); the remaining H * a - (those) picks go to the
  highest-voted remaining events of *all* heads of the layer together. Ties go to the
  smaller head, then the smaller slot (= position order within a head). Heads therefore
  keep different counts, summing to at most H * budget per layer. A layer whose heads hold
  at most ``budget`` events each keeps them all.

  Args:
    budget: mean kept events per head (>= window). window, kernel, pool: SnapKV's
      observation window, pooling size (odd) and kind.
    floor: fraction of a head's mean selection guaranteed to it, in [0, 1].

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) whose slot axis holds the most one head
    may keep, min(H * a, T) + window (the serving buffer); stored bytes count the real kept
    events only: per user, sum over layers and heads of kept * ((Dk + Dv) * itemsize + 8) +
    4. State: EmptyState; needs ``signals``.

  References: Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
    Budget Allocation for Efficient LLM Inference" (arXiv 2407.11550, 2024).
  """
  budget, window, kernel = check_snapkv_args("adakv", budget, window, kernel, pool)
  if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor <= 1:
    raise ValueError(f"adakv: floor={floor!r} must be a number in [0, 1]")
  a = budget - window
  guard = int(floor * a)


  def compress(cache, state, signals=None):
    signals = require_signals("adakv", signals)
    votes = snapkv_votes(signals, cache, window, kernel, pool)  # [L, B, H, T]
    if cache.capacity < budget:
      cache = pad_capacity(cache, budget)
    L, B, H, T = cache.pos.shape
    votes = pad_slots(votes, T)
    valid, _, newest = slot_ranks(cache)
    in_window = valid & (newest < window)
    prefix = valid & ~in_window  # [L, B, H, T]
    tier = prefix.astype(jnp.int32)
    if guard:
      sel, picked = top_slots(tier, votes, cache.pos, guard)
      tier = jnp.where(mark_slots(sel, picked, T), 2, tier)
    if a:  # the layer's picks, across heads: rows [L, B, 1, H * T], head-major
      flat = lambda x: x.reshape(L, B, 1, H * T)
      sel, picked = top_slots(flat(tier), flat(votes), flat(cache.pos), H * a)
      chosen = mark_slots(sel, picked, H * T).reshape(L, B, H, T)
    else:
      chosen = jnp.zeros_like(prefix)
    keep = chosen | in_window
    cap = min(H * a + window, T)  # the most one head can keep
    sel = compact(keep, cap)
    picked = jnp.arange(cap) < jnp.sum(keep, axis=-1, keepdims=True)
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


SPECS = (MethodSpec(
    name="adakv", factory=adakv, granularity="token", tuned="budget",
    candidates=window_budget_candidates,
    needs_signals=True, limits={"budget": "capacity", "window": "capacity"},
    example={"budget": 5, "window": 2},
    reference="Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget "
    "Allocation for Efficient LLM Inference, 2024"),)
