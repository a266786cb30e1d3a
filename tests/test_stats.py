"""malloc_jax.stats against independent float64 NumPy references on fixed inputs."""

import math

import numpy as np
import pytest

from malloc_jax import stats
from malloc_jax.metrics import retrieval_metrics


def _percentile_ref(x, q):
  """Linear-interpolation percentile written out (the 'linear' method of Hyndman-Fan 7)."""
  s = sorted(float(v) for v in x)
  h = (len(s) - 1) * q / 100.0
  lo = math.floor(h)
  hi = min(lo + 1, len(s) - 1)
  return s[lo] + (h - lo) * (s[hi] - s[lo])


def _bootstrap_ref(a, b, resamples, seed, level):
  """Paired bootstrap with an explicit loop over resamples and over users."""
  rng = np.random.default_rng(seed)
  n = len(a)
  draws = rng.integers(0, n, size=(resamples, n))
  means = []
  for r in range(resamples):
    total = 0.0
    for i in draws[r]:
      total += float(a[i]) - float(b[i])
    means.append(total / n)
  return (sum(float(x) - float(y) for x, y in zip(a, b)) / n,
          _percentile_ref(means, 50 * (1 - level)), _percentile_ref(means, 50 * (1 + level)))


def test_paired_bootstrap_matches_loop_reference():
  rng = np.random.default_rng(123)
  ref = rng.random(60)
  val = ref - 0.05 + 0.1 * rng.standard_normal(60)
  got = stats.paired_bootstrap(val, ref, resamples=300, seed=7)
  diff, lo, hi = _bootstrap_ref(val, ref, 300, 7, 0.95)
  assert got["diff"] == pytest.approx(diff, abs=1e-12)
  assert got["ci_low"] == pytest.approx(lo, abs=1e-12)
  assert got["ci_high"] == pytest.approx(hi, abs=1e-12)
  assert got["contains_zero"] == (lo <= 0 <= hi)
  assert got["num_users"] == 60


def test_paired_bootstrap_width_matches_normal_theory():
  # Large U: the percentile interval approaches mean +- 1.96 * sd / sqrt(U).
  rng = np.random.default_rng(0)
  ref = rng.random(4000)
  val = ref + 0.02 + 0.3 * rng.standard_normal(4000)
  got = stats.paired_bootstrap(val, ref)
  d = val - ref
  se = d.std(ddof=1) / math.sqrt(len(d))
  assert got["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
  assert got["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
  assert not got["contains_zero"]  # the shift is ~4 standard errors


def test_identical_methods_contain_zero_and_seed_is_reproducible():
  v = np.random.default_rng(1).random(100)
  same = stats.paired_bootstrap(v, v)
  assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
  assert same["contains_zero"]
  w = v + np.random.default_rng(2).normal(0, 0.1, 100)
  assert stats.paired_bootstrap(w, v, seed=3) == stats.paired_bootstrap(w, v, seed=3)
  assert stats.paired_bootstrap(w, v, seed=3) != stats.paired_bootstrap(w, v, seed=4)


def test_paired_bootstrap_rejects_unpaired_inputs():
  with pytest.raises(ValueError, match="same users"):
    stats.paired_bootstrap(np.zeros(3), np.zeros(4))


def test_per_user_metric_averages_to_retrieval_metrics():
  ranks = np.array([0, 1, 3, 9, 10, 50, 199, 200, 3000])
  ref = retrieval_metrics(ranks, (10, 200))
  for m in ("NDCG@10", "HR@10", "NDCG@200", "MRR"):
    assert stats.per_user_metric(ranks, m).mean() == pytest.approx(ref[m], abs=1e-15)
  # closed form for one user: rank 3 -> NDCG@10 = 1 / log2(5)
  assert stats.per_user_metric(np.array([3]), "NDCG@10")[0] == pytest.approx(1 / math.log2(5))
  with pytest.raises(ValueError, match="NDCG@K"):
    stats.per_user_metric(ranks, "AUC")


def test_length_breakdown_buckets():
  lengths = np.array([5, 200, 201, 512, 513, 2000])
  values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  ref = np.zeros(6)
  got = stats.length_breakdown(values, lengths, ref, resamples=50)
  assert list(got) == ["<=200", "201-512", ">512"]
  assert got["<=200"]["num_users"] == 2 and got["<=200"]["mean"] == 1.5
  assert got["201-512"]["mean"] == 3.5 and got[">512"]["mean"] == 5.5
  assert got[">512"]["diff"] == 5.5 and not got[">512"]["contains_zero"]
  empty = stats.length_breakdown(values[:2], lengths[:2])
  assert empty[">512"]["num_users"] == 0 and math.isnan(empty[">512"]["mean"])


def test_order_at_budgets_marks_significance():
  rng = np.random.default_rng(5)
  base = rng.random(500)
  per_user = {"native": base, "a": base - 0.2, "b": base - 0.001 * rng.random(500),
              "c": base + rng.normal(0, 0.05, 500)}
  rows = [{"method": m, "NDCG@10": float(v.mean()), "bytes_per_user": by}
          for (m, v), by in zip(per_user.items(), (1000, 100, 400, 500))]
  out = stats.order_at_budgets(rows, per_user, budgets=[500, 100])
  top = out[0]["order"]
  assert [e["method"] for e in top][-1] == "a" and top[-1]["mark"] == "*"
  assert top[0]["mark"] == "best" and "native" not in [e["method"] for e in top]
  assert [e["method"] for e in out[1]["order"]] == ["a"]


def test_seed_spread():
  s = stats.seed_spread([0.1, 0.2, 0.3])
  assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1)
