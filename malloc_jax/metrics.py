"""Retrieval metrics over the full item corpus (leave-one-out, one target per user)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def target_rank(logits: jax.Array, target: jax.Array) -> jax.Array:
  """0-based rank of each target: the number of items scored strictly higher.

  logits [B, V + 1] (padding item 0 at -inf), target [B] -> [B] int32. Ties favour the
  target (pessimistic tie handling would be ``>=``); NaN scores raise the rank to V.
  """
  t = jnp.take_along_axis(logits, target[:, None], axis=1)
  higher = (logits > t) | jnp.isnan(t)
  return jnp.sum(higher, axis=1).astype(jnp.int32)


def retrieval_metrics(ranks: np.ndarray, ks=(10, 50, 200)) -> dict[str, float]:
  """HR@K, NDCG@K and MRR from 0-based ranks (one held-out target per user)."""
  ranks = np.asarray(ranks, np.float64)
  if ranks.size == 0:
    raise ValueError("retrieval_metrics: no users to average over")
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"HR@{k}"] = float(hit.mean())
    out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
  return out


def popularity_ranks(popularity: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Ranks of targets when every user's scores are the items' training counts [V + 1]."""
  pop = np.asarray(popularity, np.float64).copy()
  pop[0] = -np.inf
  order = np.sort(pop)
  t = pop[target]
  # number of items with a strictly larger count
  return (len(pop) - np.searchsorted(order, t, side="right")).astype(np.int64)
