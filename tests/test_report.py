"""Reports: CSV, Markdown grouped by granularity, Pareto plot, budget answer, projection."""

import csv

import numpy as np
import pytest

from malloc_jax import report
from malloc_jax.report import best_under, pareto_front, projection_lines, write_report
from malloc_jax.sweep import RESULTS, append_result


def _row(dataset, model, method, family, gran, ndcg, bytes_, seed=0, **extra):
  return {"cell": f"{dataset}/{model}/{method}/s{seed}#x", "dataset": dataset, "model": model,
          "method": method, "family": family, "granularity": gran, "seed": seed,
          "params": {}, "NDCG@10": ndcg, "HR@10": 2 * ndcg, "stream4/NDCG@10": ndcg * 0.9,
          "AUC": 0.7, "GAUC": 0.68, "logloss": 0.6, "bytes_per_user": bytes_,
          "compression_ratio": 160_000 / bytes_, "stores_memory": True,
          "flops_per_request": 3e5, "latency_p50_ms": 1.0, "latency_p99_ms": 2.0,
          "users_per_s": 1e4, "num_users": 943, **extra}


ROWS = [
    _row("ml-100k", "hstu", "native", "native", "none", 0.055, 160_000),
    _row("ml-100k", "hstu", "native", "native", "none", 0.053, 160_000, seed=1),
    _row("ml-100k", "hstu", "recompute", "recompute", "none", 0.055, 1_604,
         stores_memory=False, compression_ratio=None),
    _row("ml-100k", "hstu", "h2o@4x", "h2o", "token", 0.052, 40_000),
    _row("ml-100k", "hstu", "kivi2", "kivi", "precision", 0.0555, 44_000),
    _row("ml-100k", "hstu", "lowrank@8x", "lowrank", "low rank", 0.058, 20_000),
    _row("ml-100k", "hstu_gqa", "native", "native", "head", 0.050, 80_000),
    _row("ml-100k", "hstu", "snapkv+kivi4", "chain", "chain", 0.054, 38_000),
    _row("synthetic", "hstu", "native", "native", "none", 0.30, 8_000_000),
    _row("synthetic", "hstu", "h2o@8x", "h2o", "token", 0.10, 1_000_000),
]


def test_pareto_front_reference():
  b = np.array([5.0, 1.0, 3.0, 3.0, 8.0, 2.0])
  m = np.array([0.5, 0.1, 0.4, 0.2, 0.5, 0.05])
  # brute force: i is on the front unless some j has <= bytes and >= metric, one strictly
  ref = [i for i in range(6) if not any(
      b[j] <= b[i] and m[j] >= m[i] and (b[j] < b[i] or m[j] > m[i]) for j in range(6))]
  assert sorted(pareto_front(b, m).tolist()) == ref == [0, 1, 2]


def _write(tmp_path):
  for r in ROWS:
    append_result(tmp_path / RESULTS, r)
  with open(tmp_path / RESULTS, "ab") as f:
    f.write(b'{"cell": "torn')  # a sweep killed mid-write: ignored by the report


def test_report_writes_csv_and_markdown_and_answers(tmp_path):
  _write(tmp_path)
  printed = []
  paths = write_report(tmp_path, tmp_path / "out", budget_bytes=45_000, plot=False,
                       print_fn=printed.append)
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 9  # two seeds of native merged
  native = next(r for r in rows if r["model"] == "hstu" and r["method"] == "native"
                and r["dataset"] == "ml-100k")
  assert float(native["NDCG@10"]) == pytest.approx(0.054)
  assert float(native["NDCG@10_std"]) == pytest.approx(np.std([0.055, 0.053], ddof=1))
  assert native["seeds"] == "2"
  md = paths["markdown"].read_text()
  assert "## ml-100k" in md and "## synthetic" in md and "r=4 NDCG@10" in md
  section = md.split("## synthetic")[0]
  order = [line.split("|")[1].strip() for line in section.splitlines()
           if line.startswith("| ") and not line.startswith("| granularity")]
  assert order == ["none", "none", "token", "precision", "low rank", "head", "chain"]
  assert "0.0540 ± 0.0014" in md and "160.0 TB" in md
  # best under 45 kB/user: lowrank@8x (recompute stores no memory and does not compete)
  assert any("best under 45,000 bytes/user on ml-100k: hstu/lowrank@8x NDCG@10 0.0580" in p
             for p in printed)
  assert any("on synthetic: none fits" in p for p in printed)
  proj = [p for p in printed if p.startswith("projection ml-100k")][0]
  assert "hstu/native 160.0 TB" in proj and "hstu/lowrank@8x 20.0 TB" in proj
  assert "recompute" not in proj
  assert "synthetic, 10^9 users: hstu/native 8.0 PB" in projection_lines(ROWS)[1]
  assert best_under(ROWS, 10) == {}


def test_report_draws_the_pareto_plot(tmp_path):
  pytest.importorskip("matplotlib")  # the `plot` extra
  _write(tmp_path)
  paths = write_report(tmp_path, print_fn=lambda *_: None)
  png = paths["plot"].read_bytes()
  assert paths["plot"] == tmp_path / "pareto.png"
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_pareto_plot_error_bars_from_ci(tmp_path, monkeypatch):
  """Rows carrying a paired interval to native get a bar from native + ci_low to native +
  ci_high around their own value; rows without ``ci`` get none; the PNG is written."""
  from matplotlib.axes import Axes

  native, cells = 0.060, [("h2o@8x", 0.062, 20_000, -0.001, 0.009),
                          ("random@8x", 0.050, 20_000, -0.018, -0.004)]
  rows = [_row("ml-1m", "hstu", "native", "native", "none", native, 160_000,
               ci={"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0})]
  for method, ndcg, b, lo, hi in cells:
    rows.append(_row("ml-1m", "hstu", method, method.split("@")[0], "token", ndcg, b,
                     ci={"diff": ndcg - native, "ci_low": lo, "ci_high": hi}))
  rows.append(_row("ml-1m", "hstu", "kivi2", "kivi", "precision", 0.059, 44_000))  # no ci
  calls = []
  orig = Axes.errorbar
  monkeypatch.setattr(Axes, "errorbar",
                      lambda self, x, y, **kw: (calls.append((y, kw["yerr"])),
                                                orig(self, x, y, **kw))[1])
  report.pareto_plot(rows, tmp_path / "p.png", errorbars=True)
  assert (tmp_path / "p.png").stat().st_size > 10_000
  bars = sorted((float(y), float(e[0][0]), float(e[1][0])) for y, e in calls)
  # reference: the bar spans [native + lo, native + hi] around the row's value (asymmetric:
  # h2o 0.003 below, 0.007 above; random 0.008 below, 0.006 above)
  want = sorted([(native, 0.0, 0.0)] + [(n, n - (native + lo), native + hi - n)
                                        for _, n, _, lo, hi in cells])
  np.testing.assert_allclose(bars, want, atol=1e-12)
  calls.clear()
  report.pareto_plot(rows, tmp_path / "q.png")  # default: no bars
  assert calls == [] and (tmp_path / "q.png").exists()


def test_retrieval_ci_from_per_user_ranks_matches_a_numpy_bootstrap(tmp_path):
  """report.add_retrieval_ci: the paired NDCG@10 difference to native of the same dataset,
  model and seed, pooled over seeds, with the percentile interval of 1,000 resamples of
  users; checked against a float64 NumPy bootstrap with the same resampling indices."""
  from malloc_jax import stats

  rng = np.random.default_rng(0)
  U = 200
  nat = {s: rng.integers(0, 30, U) for s in (0, 1)}
  ev = {s: np.where(rng.random(U) < 0.3, nat[s] + rng.integers(0, 20, U), nat[s]) for s in (0, 1)}
  rows = [_row("d", "hstu", "native", "native", "none", 0.1, 1000, seed=s, ranks=nat[s].tolist())
          for s in (0, 1)]
  rows += [_row("d", "hstu", "h2o@8x", "h2o", "token", 0.09, 100, seed=s, ranks=ev[s].tolist())
           for s in (0, 1)]
  rows.append(_row("d", "hstu", "old", "h2o", "token", 0.09, 100))  # no ranks: untouched
  report.add_retrieval_ci(rows, resamples=1000, seed=0)
  ndcg = lambda r: np.where(r < 10, 1.0 / np.log2(np.asarray(r, np.float64) + 2.0), 0.0)
  d = np.concatenate([ndcg(ev[s]) - ndcg(nat[s]) for s in (0, 1)])
  idx = stats.bootstrap_indices(len(d), 1000, 0)
  lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
  for r in rows[2:4]:
    assert r["ci"]["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert (r["ci"]["ci_low"], r["ci"]["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert r["ci"]["contains_zero"] == bool(lo <= 0 <= hi)
    assert r["dNDCG@10"] == r["ci"]["diff"]
  assert rows[0]["ci"]["diff"] == 0.0 and "ci" not in rows[4]
  for r in rows:
    append_result(tmp_path / RESULTS, r)
  md = write_report(tmp_path, tmp_path / "out", plot=False,
                    print_fn=lambda *_: None)["markdown"].read_text()
  want = f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] " + ("tie" if lo <= 0 <= hi else "**differs**")
  assert want in md and "| ref |" in md
