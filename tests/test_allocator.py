"""The per-user byte budget allocator: exact DP against brute force, the greedy against the DP
and its bound, the accuracy curve and the paired CI against closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from malloc_jax import allocator as A
from malloc_jax.metrics import retrieval_metrics


def brute_force(value, cost, budget):
  best = -np.inf
  for choice in itertools.product(range(value.shape[1]), repeat=value.shape[0]):
    idx = (np.arange(value.shape[0]), np.array(choice))
    if cost[idx].sum() <= budget:
      best = max(best, value[idx].sum())
  return best


def random_problem(rng, N, R, max_cost=20):
  cost = rng.integers(1, max_cost, size=(N, R)).astype(np.float64)
  value = rng.uniform(0, 1, size=(N, R))
  lo, hi = cost.min(1).sum(), cost.max(1).sum()
  return value, cost, float(rng.integers(lo, hi + 1))


def max_step(value, cost):
  """The largest value gain of one hull step over all users (the greedy's bound)."""
  out = 0.0
  for i in range(value.shape[0]):
    h = A._hull(value[i], cost[i])
    out = max([out] + [value[i, h[j]] - value[i, h[j - 1]] for j in range(1, len(h))])
  return out


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_the_brute_force_optimum_and_greedy_within_its_bound(seed):
  rng = np.random.default_rng(seed)
  value, cost, budget = random_problem(rng, N=6, R=4)
  want = brute_force(value, cost, budget)
  dp = A.allocate_dp(value, cost, budget)
  idx = (np.arange(6), dp.choice)
  assert cost[idx].sum() <= budget and dp.cost == cost[idx].sum()
  assert np.isclose(dp.value, want) and np.isclose(value[idx].sum(), dp.value)
  g = A.allocate_greedy(value, cost, budget)
  gidx = (np.arange(6), g.choice)
  assert cost[gidx].sum() <= budget and np.isclose(g.value, value[gidx].sum())
  assert g.value <= want + 1e-12 and g.value >= want - max_step(value, cost) - 1e-12
  assert g.bound >= want - 1e-12


def test_greedy_on_many_users_close_to_the_dp():
  # Bytes like an eviction memory: min(n, T / r) events at 8 bytes; the value rises with the
  # kept fraction, more for long histories.
  rng = np.random.default_rng(0)
  N, ratios = 400, np.array([1, 2, 4, 8, 16])
  n = rng.integers(8, 200, size=N)
  kept = np.minimum(n[:, None], 200 // ratios[None])
  cost = kept * 8.0
  value = 0.1 * (kept / n[:, None]) ** 0.5 + rng.normal(0, 0.002, size=(N, len(ratios)))
  for r in (2, 3, 4):  # uniform 4x, 8x, 16x totals
    budget = cost[:, r].sum()
    dp = A.allocate_dp(value, cost, budget)
    g = A.allocate_greedy(value, cost, budget)
    assert g.cost <= budget and dp.cost <= budget
    assert dp.value - max_step(value, cost) <= g.value <= dp.value + 1e-9 <= g.bound + 1e-9
    assert dp.value >= value[:, r].sum() - 1e-9  # never worse than the uniform ratio
    assert A.allocate(value, cost, budget).value == dp.value
  with pytest.raises(ValueError, match="max_cells"):
    A.allocate_dp(value, cost, budget, max_cells=10)
  with pytest.raises(ValueError, match="cheapest"):
    A.allocate(value, cost, cost.min(1).sum() - 1)


def test_hull_drops_dominated_and_concave_options():
  # Options (cost, value): (1, .1), (2, .05) dominated, (3, .2) below the chord from (1, .1)
  # to (4, .5), (4, .5), (6, .6).
  v, c = np.array([.1, .05, .2, .5, .6]), np.array([1., 2., 3., 4., 6.])
  assert A._hull(v, c) == [0, 3, 4]
  plan = A.allocate_greedy(v[None], c[None], 5.0)
  assert plan.choice.tolist() == [3] and np.isclose(plan.bound, 0.5 + 0.1 * 1 / 2)


def test_accuracy_curve_by_hand_and_errors():
  lengths = np.array([5, 12, 30, 7, 50])
  per_user = {4: [0.1, 0.2, 0.3, 0.5, 0.0], 1: [1.0, 0.0, 0.5, 0.0, 1.0]}
  curve = A.accuracy_curve(lengths, per_user, edges=(0, 10, 40, 100))
  assert curve.ratios.tolist() == [1, 4] and curve.counts.tolist() == [2, 2, 1]
  np.testing.assert_allclose(curve.metric, [[0.5, 0.3], [0.25, 0.25], [1.0, 0.0]])
  np.testing.assert_allclose(curve.expected([99, 0]), [[1.0, 0.0], [0.5, 0.3]])
  with pytest.raises(ValueError, match="length 100"):
    curve.expected([100])
  with pytest.raises(ValueError, match=r"bucket \[40, 45\) has no validation users"):
    A.accuracy_curve(lengths, per_user, edges=(0, 10, 40, 45, 100))
  with pytest.raises(ValueError, match="ratio 4"):
    A.accuracy_curve(lengths, {4: [0.1]}, edges=(0, 100))
  ranks = np.array([0, 3, 9, 10, 250])
  np.testing.assert_allclose(A.ndcg_per_user(ranks).mean(), retrieval_metrics(ranks)["NDCG@10"])


def test_paired_ci_closed_form():
  rng = np.random.default_rng(3)
  a, b = rng.normal(0.3, 0.1, 50), rng.normal(0.28, 0.1, 50)
  d = a - b
  half = stats.t.ppf(0.975, 49) * d.std(ddof=1) / np.sqrt(50)
  mean, lo, hi = A.paired_ci(a, b)
  np.testing.assert_allclose([mean, lo, hi], [d.mean(), d.mean() - half, d.mean() + half])
