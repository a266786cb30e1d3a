"""TOVA: keep the events the newest query attends to most (averaged over heads, per layer).

Oren et al. read a transformer as a multi-state RNN whose state is the KV cache, and bound
that state with a simple policy: whenever the cache is over its budget, evict the event that
the *current* (newest) query attends to least, the attention averaged over the layer's
heads, so that every head of a layer keeps the same events. This module is the whole method:
its factory and its spec.
"""

from __future__ import annotations

import jax.numpy as jnp

from malloc_jax.cache import pad_capacity
from malloc_jax.compressors.base import Compressor, init_empty
from malloc_jax.compressors.eviction import (
  check_int,
  kept_memory,
  pad_slots,
  require_signals,
  top_slots,
)
from malloc_jax.compressors.spec import MethodSpec, budget_range


def tova_scores(signals, capacity: int) -> tuple:
  """The newest query's attention averaged over heads, [L, B, H, capacity] (equal heads).

  ``signals.window_attn`` [L, B, H, W, T] holds each user's last W queries right-aligned, so
  row W - 1 is the newest query; its attention is averaged over the H heads (float32).
  """
  win = signals.window_attn  # [L, B, H, W, T]
  newest = win[:, :, :, -1, :].astype(jnp.float32)  # [L, B, H, T]
  mean = jnp.mean(newest, axis=2, keepdims=True)  # [L, B, 1, T]
  return pad_slots(jnp.broadcast_to(mean, newest.shape), capacity)


def tova(budget: int) -> Compressor:
  """TOVA: per layer and user, keeps the ``budget`` events with the highest head-averaged
  attention from the newest query.

  Exact rule, per layer and user: score(e) = mean over heads h of the newest query's
  attention to event e (row W - 1 of ``signals.window_attn``). TOVA evicts one event at a
  time, the lowest-scoring, until ``budget`` remain; with the newest query fixed the score
  order does not change as events leave (softmax renormalizes all kept scores by one
  factor, HSTU's pointwise attention does not renormalize), so this equals keeping the top
  ``budget`` by score, ties to the smaller position. All heads of a layer keep the same
  events. Rows with at most ``budget`` events keep them all; empty slots are never kept.

  Streaming: in the streaming protocol each request's ``extend`` returns the signals of its
  queries and TOVA re-applies the rule with the newest one; with one event per request this
  is the paper's step-by-step policy exactly. With several new events per request the
  events are scored by the request's last query only (the paper would evict after each
  token with that token's query).

  Requires the heads of a layer to hold the same event in each slot (true after prefill,
  extend, and TOVA itself; not after a per-head eviction such as SnapKV).

  Args:
    budget: kept events per layer (>= 1).

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity ``budget`` (stored bytes per
    user: sum over layers and heads of kept * (Dk + Dv) * itemsize + kept * 8 index bytes +
    4); state: EmptyState; needs ``signals``.

  References: Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs",
    EMNLP 2024 (arXiv 2401.06104).
  """
  budget = check_int("tova", "budget", budget, 1)


  def compress(cache, state, signals=None):
    signals = require_signals("tova", signals)
    if signals.window_attn.shape[-1] != cache.capacity:
      raise ValueError(f"tova: signals.window_attn covers {signals.window_attn.shape[-1]} "
                       f"slots but the cache has capacity {cache.capacity}")
    if cache.capacity < budget:
      cache = pad_capacity(cache, budget)
    score = tova_scores(signals, cache.capacity)  # [L, B, H, T]
    tier = (cache.pos >= 0).astype(jnp.int32)
    sel, picked = top_slots(tier, score, cache.pos, budget)
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


SPECS = (MethodSpec(
    name="tova", factory=tova, granularity="token", tuned="budget", candidates=budget_range,
    needs_signals=True, limits={"budget": "capacity"}, example={"budget": 5},
    reference="Oren et al., Transformers are Multi-State RNNs, EMNLP 2024"),)
