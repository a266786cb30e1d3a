"""The Pareto plot's latency panel: latency per request batch against stored bytes."""

import numpy as np
import pytest

from malloc_jax import report


def _row(method, family, bytes_, ndcg, latency):
  return {"dataset": "ml-1m", "model": "hstu", "method": method, "family": family,
          "granularity": "token", "seed": 0, "params": {}, "NDCG@10": ndcg,
          "stored_bytes": bytes_, "stores_memory": True, "latency_p50_ms": latency,
          "cost_batch": 64}


# (method, family, bytes per user, NDCG@10, latency ms): native is slowest, h2o fastest.
CELLS = [("native", "native", 160_000, 0.060, 500.0), ("kivi2", "kivi", 25_000, 0.059, 300.0),
         ("lowrank@8x", "lowrank", 20_000, 0.050, 130.0), ("h2o@8x", "h2o", 20_000, 0.055,
                                                           80.0),
         ("uniform8", "uniform", 40_000, 0.0601, 350.0)]


def _figure(tmp_path, monkeypatch, rows):
  pytest.importorskip("matplotlib")
  from matplotlib.figure import Figure
  figs = []
  orig = Figure.savefig
  monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self),
                                                                orig(self, *a, **k))[1])
  report.pareto_plot(rows, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 10_000
  return figs[0]


def test_latency_panel_plots_latency_against_bytes(tmp_path, monkeypatch):
  fig = _figure(tmp_path, monkeypatch, [_row(*c) for c in CELLS])
  panels = [ax for ax in fig.axes if "latency" in ax.get_ylabel()]
  assert len(panels) == 1 and len(fig.axes) == 2
  ax = panels[0]
  assert ax.get_ylabel() == "latency per request batch of 64 users, p50 ms"
  assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
  points = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
  assert points == sorted((float(b), float(t)) for _, _, b, _, t in CELLS)
  # frontier (fewer bytes and lower latency): h2o (20 kB, 80 ms) beats every other row
  (line,) = ax.get_lines()
  np.testing.assert_array_equal(line.get_xdata(), [20_000])
  np.testing.assert_array_equal(line.get_ydata(), [80.0])


def test_plot_without_latency_has_the_metric_panels_only(tmp_path, monkeypatch):
  rows = [_row(*c) for c in CELLS]
  for r in rows:
    del r["latency_p50_ms"]
  rows[0]["latency_p50_ms"] = float("nan")  # not a latency either
  fig = _figure(tmp_path, monkeypatch, rows)
  assert len(fig.axes) == 1 and "latency" not in fig.axes[0].get_ylabel()
  assert fig.axes[0].get_ylabel() == "NDCG@10"
