"""The sweep's task axis: ranking cells next to retrieval cells (issue 16).

A tiny sweep with both tasks, two methods and one ratio: the rows exist for both tasks, and a
ranking row's numbers equal a direct ``ranking.rank_cell`` of the same trained backbone and
NumPy float64 references of each metric (pairwise AUC, NDCG@10 of the positive's rank, binary
cross-entropy, the paired difference, its SE and percentile bootstrap interval).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from malloc_jax.sweep import expand_cells

ROOT = Path(__file__).resolve().parents[1]
quiet = lambda *a, **k: None


def sweep_config(arg):
  spec = importlib.util.spec_from_file_location("sweep_config", ROOT / "configs" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_tasks_axis_expands_ranking_cells():
  config = sweep_config("runlocal=True,methods=native+recompute+h2o,tasks=retrieval+ranking")
  cells = expand_cells(config, print_fn=quiet)
  got = {(c.task, c.method) for c in cells}
  assert got == {("retrieval", "native"), ("retrieval", "recompute"), ("retrieval", "h2o@2x"),
                 ("ranking", "native"), ("ranking", "h2o@2x")}  # no ranking recompute
  by = {(c.task, c.method): c for c in cells}
  rank, retr = by["ranking", "native"], by["retrieval", "native"]
  assert rank.run.task == "ranking" and "task" not in retr.run
  assert rank.run.train.rank_loss == "listwise" and rank.run.train.rank_tied_qk
  assert rank.train_key != retr.train_key and rank.id != retr.id
  assert rank.train_key == by["ranking", "h2o@2x"].train_key
  assert by["ranking", "h2o@2x"].steps == by["retrieval", "h2o@2x"].steps
  assert len({c.id for c in cells}) == len(cells)
  # Retrieval-only sweeps keep their cells (and ids) when the axis is left at its default.
  plain = expand_cells(sweep_config("runlocal=True,methods=native+recompute+h2o"), quiet)
  assert [c.id for c in plain] == [c.id for c in cells if c.task == "retrieval"]
  # A variant without a multi-position training pass trains one impression per window.
  mixed = expand_cells(sweep_config("runlocal=True,methods=native,tasks=ranking,"
                                    "models=hstu+hstu_linear+hstu_gqa"), quiet)
  positions = {c.model: c.run.train.rank_positions for c in mixed}
  assert positions == {"hstu": 4, "hstu_linear": 1, "hstu_gqa": 4}
  with pytest.raises(ValueError, match="tasks"):
    sweep_config("runlocal=True,tasks=retrieval+ctr")
  config.tasks = ("ranking", "ranking")
  with pytest.raises(ValueError, match="config.tasks"):
    expand_cells(config, print_fn=quiet)


def _numpy_metrics(logits):
  """Float64 NumPy references of one memory's per-user metrics (positive in column 0)."""
  s = np.asarray(logits, np.float64)
  U, C = s.shape
  auc = np.empty(U)
  ndcg = np.empty(U)
  for u in range(U):  # pairwise: P(positive above a negative), ties count 1/2
    pos, neg = s[u, 0], s[u, 1:]
    auc[u] = (np.sum(pos > neg) + 0.5 * np.sum(pos == neg)) / (C - 1)
    rank = np.sum(neg > pos) + 0.5 * np.sum(neg == pos)
    ndcg[u] = 1.0 / np.log2(rank + 2.0) if rank < 10 else 0.0
  y = np.zeros((U, C))
  y[:, 0] = 1
  p = 1.0 / (1.0 + np.exp(-s))
  bce = -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(axis=1)
  return {"auc": auc, "ndcg10": ndcg, "logloss": bce}


def test_sweep_with_both_tasks_matches_rank_cell(tmp_path):
  from malloc_jax import ranking
  from malloc_jax.experiment import load_data, ranking_eval_candidates, train_model
  from malloc_jax.report import write_report
  from malloc_jax.sweep import _Backbone, run_sweep

  config = sweep_config("runlocal=True,methods=native+streaming,tasks=retrieval+ranking,"
                        "steps=3,requests=")
  run = config.datasets.synthetic
  run.data.synthetic.update(kind="topics", topic_size=5)  # hard negatives: topic mates
  run.train.update(eval_every=0, checkpoint_every=3)
  run.eval.update(max_users=16, batch_size=8)
  config.ranking_task.synthetic.train.rank_negatives.hard = 4
  config.costs.update(warmup=0, iters=1)
  config.bootstrap.resamples = 300
  rows = run_sweep(config, tmp_path, print_fn=quiet)
  by = {(r["task"], r["method"]): r for r in rows}
  assert set(by) == {("retrieval", "native"), ("retrieval", "streaming@2x"),
                     ("ranking", "native"), ("ranking", "streaming@2x")}
  cells = {(c.task, c.method): c for c in expand_cells(config, print_fn=quiet)}
  cell = cells["ranking", "native"]
  rrun = cell.run
  data = load_data(rrun)
  model, _ = train_model(rrun, tmp_path / "models" / cell.train_key, data, quiet)  # reloads
  backbone = _Backbone(cell.train_key, model, data, rrun, {})
  split = data.eval_set(rrun.eval.split)
  cands = ranking_eval_candidates(rrun, data, rrun.eval.split)[:16]
  assert cands.shape == (16, 1 + 4 + 10)  # the target, its 4 topic mates, 10 other items
  ref = {}
  for method in ("native", "streaming@2x"):
    res = ranking.rank_cell(model, split, cands, backbone.compressor(cells["ranking", method]
                                                                     .steps),
                            batch_size=8, query_len=rrun.eval.query_len, window=rrun.eval.window)
    row = by["ranking", method]
    assert row["num_users"] == 16 and row["ranking_candidates"] == 15
    for k in ("AUC", "GAUC", "logloss"):
      assert row[k] == pytest.approx(res["metrics"][k], abs=1e-12), (method, k)
    assert row["cand_NDCG@10"] == pytest.approx(res["metrics"]["NDCG@10"], abs=1e-12)
    ref[method] = _numpy_metrics(res["logits"])
    assert row["GAUC"] == pytest.approx(ref[method]["auc"].mean(), abs=1e-9)
    assert row["cand_NDCG@10"] == pytest.approx(ref[method]["ndcg10"].mean(), abs=1e-9)
    assert row["logloss"] == pytest.approx(ref[method]["logloss"].mean(), abs=1e-6)
  nat, st = by["ranking", "native"], by["ranking", "streaming@2x"]
  R = config.bootstrap.resamples
  idx = np.random.default_rng(config.bootstrap.seed).integers(0, 16, size=(R, 16))
  for col, key in (("GAUC", "auc"), ("cand_NDCG@10", "ndcg10"), ("logloss", "logloss")):
    d = ref["streaming@2x"][key] - ref["native"][key]
    assert st[f"d{col}"] == pytest.approx(d.mean(), abs=1e-6)
    assert st[f"d{col}_se"] == pytest.approx(d.std(ddof=1) / 4.0, abs=1e-6)
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    assert (st[f"d{col}_ci_low"], st[f"d{col}_ci_high"]) == pytest.approx((lo, hi), abs=1e-6)
    assert nat[f"d{col}"] == 0.0 and nat[f"d{col}_ci_low"] == nat[f"d{col}_ci_high"] == 0.0
  assert st["ci"]["diff"] == st["dGAUC"]
  # Bytes as the retrieval rows count them: the same memories, the same users.
  assert nat["compression_ratio"] == pytest.approx(1.0)
  assert nat["stored_bytes"] == pytest.approx(by["retrieval", "native"]["stored_bytes"])
  assert st["stored_bytes"] == pytest.approx(by["retrieval", "streaming@2x"]["stored_bytes"])
  assert st["buffer_bytes"] == pytest.approx(by["retrieval", "streaming@2x"]["buffer_bytes"])
  assert st["stored_bytes"] < nat["stored_bytes"] and st["compression_ratio"] > 1
  assert st["train_key"] != by["retrieval", "streaming@2x"]["train_key"]
  # The report: ranking tables with the paired columns, a plot panel per task.
  paths = write_report(tmp_path, print_fn=quiet)
  text = paths["markdown"].read_text()
  assert "## synthetic: ranking" in text and "ΔGAUC vs native" in text
  ranking_part = text.split("## synthetic: ranking", 1)[1]
  line = next(x for x in ranking_part.splitlines() if "| streaming@2x |" in x and "[" in x)
  assert f"{st['GAUC']:.4f}" in line and f"{st['dGAUC']:+.4f}" in line
  # The retrieval table: the paired NDCG@10 interval to native from the rows' ranks.
  rt = by["retrieval", "streaming@2x"]
  retrieval_part = text.split("## synthetic: ranking", 1)[0]
  line = next(x for x in retrieval_part.splitlines() if "| streaming@2x |" in x)
  assert "ranks" in rt and len(rt["ranks"]) == rt["num_users"]
  assert (" tie |" in line or "**differs** |" in line) and "| ref |" in retrieval_part
  assert paths["plot"].exists() and paths["task_plot"].exists()
  csv = paths["csv"].read_text().splitlines()
  assert csv[0].startswith("dataset,task,model,method") and len(csv) == 5  # tasks kept apart
