"""PyramidKV: SnapKV selection with per-layer budgets that shrink with depth.

Cai et al. observe "pyramidal information funneling": lower layers spread attention over
the whole context, upper layers concentrate it on a few events. So lower layers keep more
events and upper layers fewer, on an arithmetic schedule whose total equals a uniform
per-layer budget; within a layer the events are chosen as SnapKV chooses them
(:func:`~malloc_jax.compressors.eviction.snapkv_votes`, reused here). This module is the
whole method: its factory and its spec.
"""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp

from malloc_jax.cache import pad_capacity
from malloc_jax.compressors.base import Compressor, init_empty
from malloc_jax.compressors.eviction import (
  check_int,
  check_snapkv_args,
  kept_memory,
  pad_slots,
  require_signals,
  slot_ranks,
  snapkv_votes,
  top_slots,
  window_budget_candidates,
)
from malloc_jax.compressors.spec import MethodSpec


def pyramid_budgets(budget: int, window: int, num_layers: int, beta: int = 20) -> tuple:
  """Per-layer budgets (bottom layer first) of PyramidKV's arithmetic schedule.

  With a = budget - window selected events per layer on average: the top layer selects
  a_top = a // beta, the bottom layer a_0 = 2a - a_top, and layer l the arithmetic value
  a_0 - (a_0 - a_top) l / (L - 1). Those values sum to L a exactly; they are rounded to
  integers by largest remainder (ties to the lower layer) so the integer budgets sum to
  L a as well. Every layer also keeps the ``window`` observation events.

  Returns:
    (b_0, ..., b_{L-1}) with sum = L * budget, b_l = a_l + window, non-increasing.
  """
  a = budget - window
  if num_layers == 1:
    return (budget,)
  top = a // beta
  bottom = 2 * a - top
  exact = [Fraction(bottom) - Fraction(bottom - top) * l / (num_layers - 1)
           for l in range(num_layers)]
  base = [int(x) for x in exact]  # floor (all values are >= 0)
  left = num_layers * a - sum(base)
  order = sorted(range(num_layers), key=lambda l: (-(exact[l] - base[l]), l))
  for l in order[:left]:
    base[l] += 1
  return tuple(x + window for x in base)


def pyramidkv(budget: int, window: int = 8, kernel: int = 5, pool: str = "avg",
              beta: int = 20) -> Compressor:
  """PyramidKV: SnapKV per layer at budgets b_l from :func:`pyramid_budgets`.

  Exact rule, per layer l, user and head: the ``window`` newest events stay; SnapKV's pooled
  votes of the last ``window`` queries rank the events before the window (see
  :func:`~malloc_jax.compressors.eviction.snapkv`), and the top b_l - window of them are
  kept, ties to the smaller position. A row holding at most b_l events keeps them all (the
  paper moves a short prompt's unused budget between layers; here it is simply not used).

  Args:
    budget: the uniform per-layer budget the schedule averages to (>= window).
    window, kernel, pool: SnapKV's observation window, pooling size (odd) and kind.
    beta: the schedule's steepness: the top layer selects (budget - window) // beta events
      (the paper's default 20).

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) whose slot axis is padded to the largest
    layer budget b_0 (the serving buffer). Stored bytes count only the real kept events,
    per user: sum over layers l and heads of min(n, b_l) * ((Dk + Dv) * itemsize + 8) + 4
    for a user holding n events. State: EmptyState; needs ``signals``.

  References: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling" (arXiv 2406.02069, 2024).
  """
  beta = check_int("pyramidkv", "beta", beta, 1)
  budget, window, kernel = check_snapkv_args("pyramidkv", budget, window, kernel, pool)


  def compress(cache, state, signals=None):
    signals = require_signals("pyramidkv", signals)
    budgets = pyramid_budgets(budget, window, cache.num_layers, beta)
    cap = budgets[0]
    votes = snapkv_votes(signals, cache, window, kernel, pool)  # [L, B, H, T]
    if cache.capacity < cap:
      cache = pad_capacity(cache, cap)
    votes = pad_slots(votes, cache.capacity)
    valid, _, newest = slot_ranks(cache)
    tier = jnp.where(valid & (newest < window), 2, jnp.where(valid, 1, 0))
    sels, pickeds = [], []
    for l, b in enumerate(budgets):  # static per-layer budgets
      sel, picked = top_slots(tier[l:l + 1], votes[l:l + 1], cache.pos[l:l + 1], b)
      pad = [(0, 0)] * 3 + [(0, cap - b)]
      sels.append(jnp.pad(sel, pad))
      pickeds.append(jnp.pad(picked, pad))
    sel, picked = jnp.concatenate(sels), jnp.concatenate(pickeds)  # [L, B, H, cap]
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


SPECS = (MethodSpec(
    name="pyramidkv", factory=pyramidkv, granularity="token", tuned="budget",
    candidates=window_budget_candidates, needs_signals=True,
    limits={"budget": "capacity", "window": "capacity"},
    example={"budget": 5, "window": 2, "beta": 2},
    reference="Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal "
    "Information Funneling, 2024"),)
