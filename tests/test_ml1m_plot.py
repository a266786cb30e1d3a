"""scripts/ml1m_plot.py: which rows and which interval each task's table plots."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plot_module():
  spec = importlib.util.spec_from_file_location("ml1m_plot", ROOT / "scripts" / "ml1m_plot.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _ci(diff):
  return {"diff": diff, "ci_low": diff - 0.01, "ci_high": diff + 0.01, "contains_zero": False}


def _ranking_table(tmp_path):
  rows = [
      {"method": "native", "steps": [], "GAUC": 0.9, "stored_bytes": 1000.0, "oracle": False,
       "ci": {"GAUC": _ci(0.0), "NDCG@10": _ci(0.0)}},
      {"method": "h2o 8x", "steps": [["h2o", {}]], "GAUC": 0.85, "stored_bytes": 125.0,
       "oracle": False, "ci": {"GAUC": _ci(-0.05), "NDCG@10": _ci(-0.2)}},
      {"method": "ORACLE vote h2o 8x (not deployable)", "steps": [["h2o", {}]], "GAUC": 0.88,
       "stored_bytes": 125.0, "oracle": True, "ci": {"GAUC": _ci(-0.02)}},
      {"method": "history-blind (popularity)", "steps": [], "GAUC": 0.7, "oracle": False},
  ]
  path = tmp_path / "rank.json"
  path.write_text(json.dumps({"task": "ranking", "rows": rows, "capacity": 200,
                              "model": {"name": "hstu"}, "dataset": "sasrec:ml-1m.txt: 6040"}))
  return path


def test_ranking_rows_plot_gauc_with_its_interval_without_oracle_or_blind(tmp_path):
  mod = _plot_module()
  rows = mod.table_rows(str(_ranking_table(tmp_path)))
  assert [r["method"] for r in rows] == ["native", "h2o 8x"]
  assert rows[1]["ci"] == _ci(-0.05)  # the GAUC interval, not NDCG@10's
  assert rows[1]["bytes_per_user"] == 125.0 and rows[1]["family"] == "h2o"
  assert rows[0]["dataset"] == "ml-1m hstu (capacity 200), ranking"


def test_mixing_tasks_in_one_plot_is_refused(tmp_path):
  mod = _plot_module()
  retrieval = tmp_path / "ret.json"
  retrieval.write_text(json.dumps({"rows": [], "capacity": 200, "model": {"name": "hstu"}}))
  with pytest.raises(SystemExit, match="separate"):
    mod.main([str(retrieval), str(_ranking_table(tmp_path)), "--out", str(tmp_path / "x.png")])
