"""Per-user byte budgets: choose each user's compression ratio under one total byte budget.

Operators budget memory for the whole user base, not per user. Given N users, a ratio axis
(the sweep's ratios of one method family), each user's expected metric at each ratio (from a
per-length accuracy curve estimated on validation users) and each user's stored bytes at each
ratio, :func:`allocate` picks one ratio per user to maximise the sum of expected metrics with
total bytes <= the budget: a multiple-choice knapsack. ::

  curve = accuracy_curve(val_lengths, {r: ndcg_per_user(val_ranks[r], 10) for r in ratios},
                         edges=(0, 50, 100, 200, 400, 10**9))
  value = curve.expected(test_lengths)                   # [N, R]
  cost = np.stack([stored_bytes[r] for r in ratios], 1)  # [N, R] exact bytes per user
  budget = cost[:, ratios.index(8)].sum()                # the uniform 8x total
  plan = allocate(value, cost, budget)                   # plan.choice [N]: a ratio index each

Pure NumPy, host-side (planning, not serving).

References: multiple-choice knapsack, exact dynamic programming and the LP-relaxation greedy
with its additive bound (Sinha & Zoltners, "The Multiple-Choice Knapsack Problem", Operations
Research 27(3), 1979; Kellerer, Pferschy & Pisinger, "Knapsack Problems", Springer 2004, ch. 11).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class AccuracyCurve(NamedTuple):
  """Mean metric per history-length bucket and ratio, from validation users.

  edges [K + 1] increasing bucket boundaries (bucket k: edges[k] <= length < edges[k + 1]);
  ratios [R]; metric [K, R] float64 mean metric of the bucket's users at each ratio;
  counts [K] users per bucket.
  """

  edges: np.ndarray
  ratios: np.ndarray
  metric: np.ndarray
  counts: np.ndarray

  def bucket(self, lengths) -> np.ndarray:
    """[N] bucket index of each history length; ValueError for lengths outside the edges."""
    lengths = np.asarray(lengths)
    k = np.searchsorted(self.edges, lengths, side="right") - 1
    bad = (k < 0) | (k >= len(self.edges) - 1)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(f"accuracy curve: user {i} has history length {int(lengths[i])}, "
                       f"outside the bucket edges [{self.edges[0]}, {self.edges[-1]})")
    return k

  def expected(self, lengths) -> np.ndarray:
    """[N, R] expected metric of users with these history lengths at each ratio."""
    return self.metric[self.bucket(lengths)]


def ndcg_per_user(ranks, k: int = 10) -> np.ndarray:
  """[M] per-user NDCG@k from 0-based target ranks (their mean is ``metrics``' NDCG@k)."""
  ranks = np.asarray(ranks, np.float64)
  return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def accuracy_curve(lengths, per_user: Mapping[float, Sequence[float]],
                   edges: Sequence[int]) -> AccuracyCurve:
  """The per-length accuracy curve from a sweep's per-user results on validation users.

  Args:
    lengths: [M] history length of each validation user.
    per_user: ``{ratio: [M] per-user metric}`` for the same users in the same order, one
      entry per ratio of the family's sweep cells (e.g. ``ndcg_per_user`` of each cell's
      ranks; the native cell as ratio 1).
    edges: increasing bucket boundaries covering every length.

  Returns:
    AccuracyCurve with ratios sorted ascending.

  Raises:
    ValueError: mismatched lengths, non-increasing edges, or a bucket without users (the
      message names it; merge it with a neighbour).
  """
  lengths = np.asarray(lengths)
  edges = np.asarray(edges)
  if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"accuracy_curve: edges={edges.tolist()} must be increasing, >= 2 values")
  ratios = np.asarray(sorted(per_user), np.float64)
  cols = []
  for r in ratios:
    m = np.asarray(per_user[r], np.float64)
    if m.shape != lengths.shape:
      raise ValueError(f"accuracy_curve: ratio {r} has {m.shape} per-user values, lengths "
                       f"has {lengths.shape}")
    cols.append(m)
  values = np.stack(cols, axis=1)  # [M, R]
  curve = AccuracyCurve(edges, ratios, np.zeros((len(edges) - 1, len(ratios))),
                        np.zeros(len(edges) - 1, np.int64))
  k = curve.bucket(lengths)
  counts = np.bincount(k, minlength=len(edges) - 1)
  if np.any(counts == 0):
    e = int(np.flatnonzero(counts == 0)[0])
    raise ValueError(f"accuracy_curve: bucket [{edges[e]}, {edges[e + 1]}) has no validation "
                     "users; merge it with a neighbour")
  metric = np.stack([np.bincount(k, weights=values[:, j], minlength=len(counts)) / counts
                     for j in range(len(ratios))], axis=1)
  return curve._replace(metric=metric, counts=counts)


class Allocation(NamedTuple):
  """choice [N] option index per user; value, cost: the plan's totals; bound: for the greedy,
  an upper bound on the optimum's value (value <= optimum <= bound); the DP's is its value."""

  choice: np.ndarray
  value: float
  cost: float
  bound: float


def _check(value, cost, budget):
  value, cost = np.asarray(value, np.float64), np.asarray(cost, np.float64)
  if value.ndim != 2 or value.shape != cost.shape:
    raise ValueError(f"allocate: value {value.shape} and cost {cost.shape} must both be [N, R]")
  if not (np.all(np.isfinite(value)) and np.all(np.isfinite(cost)) and np.all(cost >= 0)):
    raise ValueError("allocate: value and cost must be finite, cost >= 0")
  floor = cost.min(axis=1).sum()
  if budget < floor:
    raise ValueError(f"allocate: budget {budget:.0f} is below {floor:.0f}, the total of every "
                     "user's cheapest option")
  return value, cost


def allocate_dp(value, cost, budget: float, max_cells: int = 50_000_000) -> Allocation:
  """The exact optimum by dynamic programming over integer costs (divided by their gcd).

  O(N R C) time and N C memory, C = budget / gcd; for small N or coarse costs.

  Raises:
    ValueError: non-integer costs, or N C > ``max_cells`` (use :func:`allocate_greedy`).
  """
  value, cost = _check(value, cost, budget)
  if np.any(cost != np.round(cost)):
    raise ValueError("allocate_dp: costs must be integers (bytes)")
  c = cost.astype(np.int64)
  g = math.gcd(*c.ravel().tolist()) or 1
  c //= g
  C = int(budget // g)
  N, R = c.shape
  if N * (C + 1) > max_cells:
    raise ValueError(f"allocate_dp: {N} users x {C + 1} budget cells exceed max_cells="
                     f"{max_cells}; use allocate_greedy")
  best = np.zeros(C + 1)  # best[b]: the best value of the users so far within b cells
  pick = np.zeros((N, C + 1), np.int16)
  for i in range(N):
    new = np.full(C + 1, -np.inf)
    for r in range(R):
      if c[i, r] > C:
        continue
      cand = np.full(C + 1, -np.inf)
      cand[c[i, r]:] = best[:C + 1 - c[i, r]] + value[i, r]
      better = cand > new
      new[better], pick[i, better] = cand[better], r
    best = new
  choice = np.zeros(N, np.int64)
  b = C
  for i in range(N - 1, -1, -1):
    choice[i] = pick[i, b]
    b -= c[i, choice[i]]
  total = float(value[np.arange(N), choice].sum())
  return Allocation(choice, total, float(cost[np.arange(N), choice].sum()), total)


def _hull(v, c):
  """Indices of one user's options on the upper concave hull of (cost, value), from the
  cheapest (highest value among the cheapest) up, dominated options removed."""
  order = sorted(range(len(c)), key=lambda r: (c[r], -v[r], r))
  pts = []
  for r in order:
    if pts and v[r] <= v[pts[-1]]:
      continue  # costs as much or more for no more value
    while len(pts) >= 2:  # pop the last point if it lies on or below the chord
      a, b = pts[-2], pts[-1]
      if (v[b] - v[a]) * (c[r] - c[a]) <= (v[r] - v[a]) * (c[b] - c[a]):
        pts.pop()
      else:
        break
    pts.append(r)
  return pts


def allocate_greedy(value, cost, budget: float) -> Allocation:
  """The LP-relaxation greedy: every user starts at its cheapest option, then hull steps are
  taken in decreasing value per byte (the Lagrangian sweep) while they fit; a step that does
  not fit blocks that user's later steps. O(N R log(N R)).

  Bound: value >= optimum - (the largest value gain of one hull step), and
  ``Allocation.bound`` (the LP optimum) >= optimum.
  """
  value, cost = _check(value, cost, budget)
  N = value.shape[0]
  hulls = [_hull(value[i], cost[i]) for i in range(N)]
  choice = np.array([h[0] for h in hulls], np.int64)
  spent = float(cost[np.arange(N), choice].sum())
  steps = []  # (-efficiency, user, step) so that sorting ascending takes the best first
  for i, h in enumerate(hulls):
    for j in range(1, len(h)):
      dv, dc = value[i, h[j]] - value[i, h[j - 1]], cost[i, h[j]] - cost[i, h[j - 1]]
      steps.append((-dv / dc, i, j, dv, dc))
  steps.sort()
  blocked = np.zeros(N, bool)
  lp_full = False  # the LP relaxation has used up the budget
  total = float(value[np.arange(N), choice].sum())
  lp_total = total
  lp_left = budget - spent
  for _, i, j, dv, dc in steps:
    if not lp_full:  # the LP relaxation takes the same order, a fraction of the last step
      if dc <= lp_left:
        lp_total, lp_left = lp_total + dv, lp_left - dc
      else:
        lp_full, lp_total = True, lp_total + dv * lp_left / dc
    if blocked[i]:
      continue
    if spent + dc <= budget:
      choice[i], spent, total = hulls[i][j], spent + dc, total + dv
    else:
      blocked[i] = True
  return Allocation(choice, total, spent, lp_total)


def allocate(value, cost, budget: float, method: str = "auto") -> Allocation:
  """Each user's option maximising the total value with total cost <= ``budget``.

  Args:
    value: [N, R] expected metric of user n at ratio r (e.g. ``AccuracyCurve.expected``).
    cost: [N, R] stored bytes of user n at ratio r (e.g. each sweep cell's
      ``memory.stored_bytes()``).
    budget: total bytes for the N users (e.g. ``cost[:, r].sum()`` of a uniform ratio).
    method: "dp" (exact), "greedy" (LP greedy), or "auto" (dp when it fits in 5e7 cells).

  Returns:
    Allocation (``choice`` indexes the ratio axis).
  """
  if method not in ("auto", "dp", "greedy"):
    raise ValueError(f"allocate: method={method!r}; expected 'auto', 'dp' or 'greedy'")
  if method == "greedy":
    return allocate_greedy(value, cost, budget)
  try:
    return allocate_dp(value, cost, budget)
  except ValueError as e:
    if method == "dp" or ("max_cells" not in str(e) and "integers" not in str(e)):
      raise
    return allocate_greedy(value, cost, budget)


def paired_ci(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
  """Mean of the per-user differences a - b and its two-sided t confidence interval
  (``scipy.stats.ttest_rel``): (mean, low, high), e.g. allocated vs uniform NDCG@10 on the
  same test users."""
  from scipy import stats

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"paired_ci: a {a.shape} and b {b.shape} must be equal 1-D, >= 2 users")
  ci = stats.ttest_rel(a, b).confidence_interval(confidence)
  return float(np.mean(a - b)), float(ci.low), float(ci.high)
