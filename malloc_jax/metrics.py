"""Retrieval metrics over the full item corpus (leave-one-out, one target per user).

Also the ranking (CTR-style) metrics of scored impressions: AUC, GAUC and logloss.
"""

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


# ------------------------------------------------------------------------------------------
# Ranking (CTR-style) metrics: AUC, GAUC, logloss. NumPy, run outside jit on collected scores.


def _average_ranks(x: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
  """1-based ranks of x [N] within each group (ties get the average of their ranks).

  ``group`` [N] int (default: one group). Equivalent to ``scipy.stats.rankdata(x, "average")``
  applied to each group separately.
  """
  x = np.asarray(x, np.float64)
  group = np.zeros(len(x), np.int64) if group is None else np.asarray(group, np.int64)
  order = np.lexsort((x, group))  # by group, then score
  xs, gs = x[order], group[order]
  n = len(x)
  new_group = np.r_[True, gs[1:] != gs[:-1]] if n else np.zeros(0, bool)
  group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0)) if n else new_group
  new_tie = new_group | np.r_[True, xs[1:] != xs[:-1]] if n else new_group
  tie_id = np.cumsum(new_tie) - 1
  pos = np.arange(n) - group_start + 1.0  # rank within the group, ties unresolved
  tie_sum = np.bincount(tie_id, weights=pos)
  tie_cnt = np.bincount(tie_id)
  ranks = np.empty(n)
  ranks[order] = (tie_sum / np.maximum(tie_cnt, 1))[tie_id]
  return ranks


def _check_binary(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple:
  labels = np.asarray(labels).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if labels.shape != scores.shape:
    raise ValueError(f"{what}: labels {labels.shape} and scores {scores.shape} differ in size")
  if labels.size and not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"{what}: labels must be 0 or 1")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{what}: scores must be finite")
  return labels.astype(np.int64), scores


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC (Mann-Whitney U with tied scores counting one half).

  Args:
    labels: [N] 0/1. scores: [N] finite, larger = more likely positive.

  Returns:
    P(score of a random positive > score of a random negative) + P(tie) / 2; NaN if a class
    is absent.
  """
  labels, scores = _check_binary(labels, scores, "auc")
  pos = int(labels.sum())
  neg = len(labels) - pos
  if pos == 0 or neg == 0:
    return float("nan")
  ranks = _average_ranks(scores)
  return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
  """Group AUC: per-user AUC averaged with weights = the user's number of impressions.

  Users whose impressions are all positive or all negative have no AUC; they are skipped and
  counted (as FuxiCTR / DIN's gAUC does).

  Args:
    users: [N] user id of each impression (any integers). labels: [N] 0/1. scores: [N].

  Returns:
    {"GAUC": weighted mean (NaN if every user is skipped), "gauc_users": users averaged,
    "gauc_skipped": single-class users skipped}.

  References: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
  """
  labels, scores = _check_binary(labels, scores, "gauc")
  users = np.asarray(users).reshape(-1)
  if users.shape != labels.shape:
    raise ValueError(f"gauc: users {users.shape} and labels {labels.shape} differ in size")
  _, uid = np.unique(users, return_inverse=True)
  uid = uid.reshape(-1)
  n = np.bincount(uid).astype(np.float64)
  pos = np.bincount(uid, weights=labels).astype(np.float64)
  neg = n - pos
  ranks = _average_ranks(scores, uid)
  rank_sum = np.bincount(uid, weights=ranks * labels, minlength=len(n))
  ok = (pos > 0) & (neg > 0)
  per_user = (rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
  w = n[ok]
  value = float(np.sum(w * per_user) / np.sum(w)) if ok.any() else float("nan")
  return {"GAUC": value, "gauc_users": int(ok.sum()), "gauc_skipped": int((~ok).sum())}


def logloss_from_logits(labels: np.ndarray, z: np.ndarray) -> float:
  """Mean binary cross-entropy of p = sigmoid(z), computed stably from the logits z [N].

  Probabilities are clipped to [1e-7, 1 - 1e-7] as sklearn's ``log_loss`` (and FuxiCTR) do.
  """
  labels, z = _check_binary(labels, z, "logloss")
  if labels.size == 0:
    raise ValueError("logloss: no impressions")
  eps = 1e-7
  lim = np.log((1 - eps) / eps)  # clipping p to [eps, 1 - eps] clips z to [-lim, lim]
  z = np.clip(z, -lim, lim)
  # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z)
  loss = np.where(labels == 1, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))
  return float(loss.mean())


def ranking_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                    temperature: float = 1.0) -> dict[str, float]:
  """AUC, GAUC and logloss of impressions scored by a model.

  Args:
    users: [N] user of each impression; labels: [N] 0/1; logits: [N] model scores.
    temperature: logloss uses p = sigmoid(logits * temperature). Our backbones' logits are
      cosine / temperature, so passing the model's temperature gives p = sigmoid(cosine):
      a fixed, documented calibration (no parameters are fitted on test data). AUC and GAUC
      depend only on the order of the scores.

  Returns:
    {"AUC", "GAUC", "gauc_users", "gauc_skipped", "logloss", "impressions"}.
  """
  logits = np.asarray(logits, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  out = {"AUC": auc(labels, logits), **gauc(users, labels, logits),
         "logloss": logloss_from_logits(labels, logits * temperature),
         "impressions": int(labels.size)}
  return out
