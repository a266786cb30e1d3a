"""The sweep runner: results file atomicity, cell expansion, SIGKILL mid-cell then resume."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malloc_jax.sweep import (
  RESULTS,
  append_result,
  expand_cells,
  granularity,
  load_results,
)

ROOT = Path(__file__).resolve().parents[1]


def sweep_config(arg):
  spec = importlib.util.spec_from_file_location("sweep_config", ROOT / "configs" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_results_file_drops_a_torn_last_line(tmp_path):
  path = tmp_path / RESULTS
  append_result(path, {"cell": "a", "x": 1})
  append_result(path, {"cell": "b", "x": float("nan")})
  good = path.read_bytes()
  with open(path, "ab") as f:  # a write cut short by SIGKILL
    f.write(b'{"cell": "c", "x": ')
  assert [r["cell"] for r in load_results(path, repair=False)] == ["a", "b"]
  assert path.read_bytes() != good  # a reader leaves the file alone
  rows = load_results(path)
  assert [r["cell"] for r in rows] == ["a", "b"] and path.read_bytes() == good
  append_result(path, {"cell": "c"})
  assert [r["cell"] for r in load_results(path)] == ["a", "b", "c"]
  path.write_bytes(good.replace(b'"cell": "b"', b'"cell": b', 1) + b'{"cell": "c"}\n')
  with pytest.raises(ValueError, match=f"{path}: line 2: not a JSON object"):
    load_results(path)


def _with(config):
  config.model_methods.hstu_gqa = "native+h2o"  # post-hoc methods on a cache variant
  return config


def test_cells_expand_budgets_models_and_stable_ids():
  arg = "runlocal=True,models=hstu+hstu_gqa+hstu_rwkv,methods=native+recompute+h2o+kivi2"
  cells = expand_cells(_with(sweep_config(arg)), print_fn=lambda *_: None)
  got = {(c.model, c.method) for c in cells}
  assert got == {("hstu", "native"), ("hstu", "recompute"), ("hstu", "h2o@2x"),
                 ("hstu", "kivi2"), ("hstu_gqa", "native"), ("hstu_gqa", "h2o@2x"),
                 ("hstu_rwkv", "native"), ("hstu_rwkv", "recompute")}
  by = {(c.model, c.method): c for c in cells}
  h2o = dict(by["hstu", "h2o@2x"].steps)["h2o"]
  assert h2o["heavy"] + h2o["recent"] >= 12  # half of a 32-event window, index included
  assert by["hstu", "kivi2"].steps == (("kivi", {"bits": 2, "group": 8, "residual": 8}),)
  gqa = by["hstu_gqa", "native"].run.model  # from configs/hstu_gqa.py
  assert (gqa.heads, gqa.kv_heads) == (4, 2)
  assert by["hstu", "native"].train_key == by["hstu", "h2o@2x"].train_key
  assert by["hstu", "native"].train_key != by["hstu_gqa", "native"].train_key
  assert len({c.id for c in cells}) == len(cells)
  again = expand_cells(_with(sweep_config(arg)), print_fn=lambda *_: None)
  assert [c.id for c in again] == [c.id for c in cells]  # ids are stable
  assert granularity("native", "hstu_gqa") == "head"
  assert granularity("native", "hstu_rwkv") == "architecture"
  assert granularity("snapkv", "hstu") == "token" and granularity("h2o", "hstu_gqa") == "chain"


def _sweep(workdir, wait=True):
  cmd = [sys.executable, "-m", "malloc_jax.sweep", "--config",
         "configs/sweep.py:runlocal=True,methods=native+h2o,steps=4,requests=", "--workdir",
         str(workdir), "--config.datasets.synthetic.train.eval_every=0"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if wait:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _lines(path):
  return path.read_bytes().splitlines(keepends=True) if path.exists() else []


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_sigkill_mid_cell_then_rerun_finishes_each_cell_once(tmp_path):
  results = tmp_path / RESULTS
  proc = _sweep(tmp_path, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(line.endswith(b"\n") for line in _lines(results)):
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the sweep ended before it could be killed"
  proc.send_signal(signal.SIGKILL)  # the next cell is in progress
  proc.wait()
  first = _lines(results)
  assert len(first) == 1
  with open(results, "ab") as f:  # and a torn write on top of it
    f.write(b'{"cell": "synthetic/hstu/h2o@2x/s0#0", "NDCG@')

  again = _sweep(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "2 cells, 1 already in" in again.stdout
  assert "[2/2]" in again.stdout and "resumed from checkpoint step 4 (training finished)" in (
      again.stdout)
  lines = _lines(results)
  assert lines[0] == first[0]  # the finished cell was kept, not recomputed
  rows = [json.loads(line) for line in lines]
  assert len(rows) == 2 and len({r["cell"] for r in rows}) == 2
  assert {r["method"] for r in rows} == {"native", "h2o@2x"}
  native = next(r for r in rows if r["method"] == "native")
  assert 0.9 < native["flops_xla_over_closed_form"] < 1.1
  assert native["compression_ratio"] == pytest.approx(1.0)

  done = _sweep(tmp_path)  # nothing left: the file is unchanged
  assert done.returncode == 0 and "0 to run" in done.stdout
  assert _lines(results) == lines


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_cells_match_evaluate_and_streaming_and_reuse_the_prefill(tmp_path):
  """A served cell's one-shot and streaming metrics equal the library's evaluate() and
  evaluate_streaming() on the same trained backbone, and the second served cell of a
  backbone reuses the first one's prefill."""
  from malloc_jax.evaluate import evaluate, evaluate_streaming
  from malloc_jax.experiment import load_data, train_model
  from malloc_jax.sweep import _Backbone, run_sweep

  config = sweep_config("runlocal=True,methods=native+recompute+h2o+kivi2,steps=3,requests=2")
  config.datasets.synthetic.train.eval_every = 0
  quiet = lambda *a, **k: None
  rows = run_sweep(config, tmp_path, print_fn=quiet)
  cells = {c.method: c for c in expand_cells(config, print_fn=quiet)}
  run = cells["native"].run
  data = load_data(run)
  model, _ = train_model(run, tmp_path / "models" / cells["native"].train_key, data, quiet)
  backbone = _Backbone(cells["native"].train_key, model, data, run, {})
  e = run.eval
  served = [r for r in rows if r["method"] != "recompute"]
  assert [r["method"] for r in served] == ["native", "h2o@2x", "kivi2"]
  for row in served:
    comp = backbone.compressor(cells[row["method"]].steps)
    kw = dict(batch_size=e.batch_size, ks=tuple(e.ks), query_len=e.query_len,
              window=e.window, max_users=e.max_users or None)
    ref = evaluate(model, data.eval_set(e.split), comp, **kw).metrics
    for k in ("NDCG@10", "HR@10", "MRR"):
      assert row[k] == pytest.approx(ref[k], abs=1e-9), (row["method"], k)
    stream = evaluate_streaming(model, data.eval_set(e.split), comp, requests=2, **kw)
    assert row["stream2/NDCG@10"] == pytest.approx(stream["NDCG@10"], abs=1e-9), row["method"]
    assert row["stream2/bytes_per_user"] == pytest.approx(stream["bytes_per_user"])
    assert row["flops_xla_over_closed_form"] is not None
  assert served[0]["prefill_seconds"] > 0
  assert served[1]["prefill_seconds"] == 0 and served[2]["prefill_seconds"] == 0
  for row in rows:
    assert all(row[f"{k}_seconds"] >= 0 for k in ("prefill", "compress", "score", "stream",
                                                  "costs"))


def test_run_cell_is_the_serving_pipeline(tmp_path):
  """The fast counterpart of the slow end-to-end tests: a tiny sweep's rows hold the
  pipeline's ranks (one-shot and recompute; streaming is covered by the slow test and by
  test_streaming / test_reliability), ranking metrics, bytes and costs, and the second served
  cell reuses the first one's prefill."""
  from malloc_jax.sweep import run_sweep

  config = sweep_config("runlocal=True,methods=native+recompute+h2o,steps=2,requests=")
  run = config.datasets.synthetic
  run.train.update(eval_every=0, checkpoint_every=2)
  run.eval.update(max_users=16, batch_size=8)
  config.costs.update(warmup=0, iters=1)
  rows = run_sweep(config, tmp_path, print_fn=lambda *a, **k: None)
  assert [r["method"] for r in rows] == ["native", "recompute", "h2o@2x"]
  native, recompute, h2o = rows
  for row in rows:
    assert row["num_users"] == 16 and 0 <= row["NDCG@10"] <= 1 and 0 <= row["AUC"] <= 1
  # Native memory = the full forward pass: recompute ranks the same users identically.
  assert native["NDCG@10"] == pytest.approx(recompute["NDCG@10"], abs=1e-6)
  assert not any(k.startswith("stream") and "/" in k for k in native)
  assert recompute["compression_ratio"] is None and not recompute["stores_memory"]
  # Ratios are stored bytes of the same users (issue 14): the 2x setting is planned for a full
  # user, and these short users keep more of their events, so their ratio is lower.
  assert native["compression_ratio"] == pytest.approx(1.0)
  assert h2o["compression_ratio"] == pytest.approx(h2o["reference_stored_bytes"] /
                                                   h2o["stored_bytes"])
  assert 1 < h2o["compression_ratio"] and h2o["stored_bytes"] < native["stored_bytes"]
  assert native["stored_bytes"] <= native["buffer_bytes"]
  assert native["prefill_seconds"] > 0 and h2o["prefill_seconds"] == 0  # prefilled once
