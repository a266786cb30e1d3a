"""scripts/ml1m_table.py: fixed-parameter cells and --restate (byte columns from the steps)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
  spec = importlib.util.spec_from_file_location("ml1m_table", ROOT / "scripts/ml1m_table.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_parse_fixed_types_numbers_and_refuses_bad_input():
  mod = _script()
  label, name, params = mod.parse_fixed("duoattention:retrieval=0.5;sinks=1;recent=3")
  assert (name, params) == ("duoattention", {"retrieval": 0.5, "sinks": 1, "recent": 3})
  assert label == "duoattention retrieval=0.5 sinks=1 recent=3"
  assert mod.parse_fixed("minicache:")[1:] == ("minicache", {})
  with pytest.raises(ValueError, match="expected key=value"):
    mod.parse_fixed("think:channels")
  with pytest.raises(ValueError, match="nosuch"):
    mod.parse_fixed("nosuch:x=1")


@pytest.mark.slow
def test_restate_reproduces_the_byte_columns_of_a_fresh_run(shared_data, tmp_path):
  """A tiny ML-1M table (runlocal), then --restate of it (from a .json.gz): an untrained model
  gives every cell the byte figures the trained one recorded, and the ranks are kept."""
  path = shared_data / "ml-1m" / "ml-1m.txt"
  if not path.exists():
    pytest.skip(f"real data not available: {path}")
  config = f"configs/ml1m.py:runlocal=True,path={path}"
  run = lambda *a: subprocess.run([sys.executable, "scripts/ml1m_table.py", "--config", config,
                                   *a], cwd=ROOT, capture_output=True, text=True, timeout=900)
  out = tmp_path / "table.json"
  r = run("--workdir", str(tmp_path / "w"), "--out", str(out), "--methods", "snapkv,streaming",
          "--ratios", "2", "--natural", "kivi2", "--chains", "snapkv+kivi2",
          "--fixed", "minicache:retain=0.25", "--fixed", "lowrank:rank=4", "--resamples", "50")
  assert r.returncode == 0, r.stderr[-3000:]
  fresh = json.loads(out.read_text())
  labels = [row["method"] for row in fresh["rows"]]
  assert {"minicache retain=0.25", "lowrank rank=4", "snapkv 2x", "streaming 2x",
          "kivi 2-bit", "snapkv+kivi2 2x"} <= set(labels), labels
  gz = tmp_path / "old.json.gz"
  with gzip.open(gz, "wt") as f:  # an "older" table: byte columns stripped
    json.dump({**fresh, "rows": [{k: v for k, v in row.items() if k not in (
        "stored_bytes", "buffer_bytes", "reference_stored_bytes")} for row in fresh["rows"]]}, f)
  new = tmp_path / "restated.json"
  r = run("--workdir", str(tmp_path / "r"), "--restate", str(gz), "--out", str(new),
          "--resamples", "50")
  assert r.returncode == 0, r.stderr[-3000:]
  restated = json.loads(new.read_text())
  assert restated["ranks"] == fresh["ranks"]
  for a, b in zip(fresh["rows"], restated["rows"], strict=True):
    assert a["method"] == b["method"]
    for key in ("stored_bytes", "buffer_bytes", "reference_stored_bytes"):
      assert b[key] == pytest.approx(a[key], rel=1e-12), (a["method"], key)
  r = run("--workdir", str(tmp_path / "r"), "--restate", str(new), "--out", str(new))
  assert r.returncode != 0 and "must differ" in r.stderr
