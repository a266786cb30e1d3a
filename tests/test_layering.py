"""The package face: importing the data layer loads no model, compressor or storage code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> list[str]:
  code = (f"import json, sys\n{statement}\n"
          "print(json.dumps(sorted(m for m in sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                            "JAX_PLATFORMS": "cpu"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_data_loads_no_model_or_storage_code():
  mods = _loaded_after("import malloc_jax.data")
  ours = [m for m in mods if m.startswith("malloc_jax")]
  assert set(ours) <= {"malloc_jax", "malloc_jax.data", "malloc_jax.data.parsers",
                       "malloc_jax.data.dataset"}, ours
  heavy = [m for m in ("flax", "orbax", "tensorstore", "optax", "jax") if m in mods]
  assert not heavy, heavy


def test_top_level_names_load_on_first_use():
  mods = _loaded_after("import malloc_jax\nassert malloc_jax.Cache.__name__ == 'Cache'")
  assert "malloc_jax.cache" in mods and "malloc_jax.bank" not in mods
  assert "malloc_jax.models" not in mods


def test_one_durable_write_helper(tmp_path):
  """checkpoint, the sweep and the bank write through malloc_jax.fileio."""
  from malloc_jax import checkpoint, fileio, sweep

  assert checkpoint.write_json_atomic is fileio.write_json_atomic
  fileio.write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [2]})
  assert json.loads((tmp_path / "a.json").read_text()) == {"a": [2], "b": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left
  sweep.append_result(tmp_path / "r.jsonl", {"x": 1})
  sweep.append_result(tmp_path / "r.jsonl", {"x": 2})
  assert [json.loads(x)["x"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [1, 2]
