"""The main job end to end: start-up validation, resume after SIGKILL, checkpoint faults."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from malloc_jax import config_lib
from malloc_jax.checkpoint import CheckpointError, TrainCheckpoints
from malloc_jax.config_validation import validate_config

ROOT = Path(__file__).resolve().parents[1]


def tiny(arg="runlocal=True"):
  return config_lib.base_config(arg)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.compressors.update({"x": {"name": "bogus"}}), "compressors.x.name"),
    (lambda c: c.compressors.update({"lr": {"name": "lowrank", "rank": 99}}),
     "compressors.lr.rank"),
    (lambda c: c.data.update(max_len=-5), "data.max_len"),
    (lambda c: c.model.update(name="gpt"), "model.name"),
    (lambda c: c.model.update(heads=3), "model.heads"),
    (lambda c: c.train.update(lr=-1.0), "train.lr"),
    (lambda c: c.train.update(negative_sharing="items"), "train.negative_sharing"),
    (lambda c: c.data.synthetic.update(min_len=-3), "data.synthetic.min_len"),
    (lambda c: c.eval.update(split="train"), "eval.split"),
    (lambda c: c.data.update(source="ml-100k", path=""), "data.path"),
])
def test_bad_config_names_the_field(mutate, field):
  c = tiny()
  mutate(c)
  with pytest.raises(ValueError, match=f"config.{field}"):
    validate_config(c)


def test_config_arguments_are_typed_and_known():
  assert tiny("runlocal=True,steps=7").train.steps == 7
  with pytest.raises(ValueError, match="'stepz' is unknown"):
    tiny("stepz=7")
  with pytest.raises(ValueError, match="steps='x': expected int"):
    tiny("steps=x")


def _main(workdir, *extra, wait=True, steps=40):
  cmd = [sys.executable, "-m", "malloc_jax.main", "--config",
         f"configs/lowrank.py:runlocal=True,steps={steps}", "--workdir", str(workdir), *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if wait:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _metrics(workdir):
  rows = json.loads((Path(workdir) / "results.json").read_text())["rows"]
  return {r["method"]: r for r in rows}


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
  """Kill training after its first checkpoint; the rerun resumes and ends bit-identical."""
  ref = _main(tmp_path / "ref")
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert "| lowrank_4x |" in ref.stdout and "| native |" in ref.stdout

  run = tmp_path / "killed"
  proc = _main(run, wait=False)
  ckpt = run / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [p for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
    if steps:
      break
    time.sleep(0.2)
  assert steps, "no checkpoint appeared"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (run / "results.json").exists()

  again = _main(run)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from checkpoint step" in again.stdout
  step = int(again.stdout.split("resumed from checkpoint step ")[1].split()[0])
  assert 0 < step < 40
  a, b = _metrics(tmp_path / "ref"), _metrics(run)
  for method in ("native", "lowrank_4x"):
    assert a[method]["NDCG@10"] == b[method]["NDCG@10"]
    assert a[method]["MRR"] == b[method]["MRR"]

  # A different training config in the same workdir is refused, not mixed.
  other = subprocess.run(
      [sys.executable, "-m", "malloc_jax.main", "--config",
       "configs/lowrank.py:runlocal=True,steps=40,seed=1", "--workdir", str(run)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert other.returncode != 0
  assert "different config" in other.stderr and "seed" in other.stderr

  # A run finished at 20 steps, extended to 40 (train.steps only says where training stops),
  # ends where the uninterrupted 40-step run ends.
  short = tmp_path / "short"
  first = _main(short, steps=20)
  assert first.returncode == 0, first.stderr[-3000:]
  longer = _main(short)
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "extended to 40 steps" in longer.stdout
  c = _metrics(short)
  for method in ("native", "lowrank_4x"):
    assert a[method]["NDCG@10"] == c[method]["NDCG@10"]
    assert a[method]["MRR"] == c[method]["MRR"]


def test_corrupted_checkpoint_falls_back_then_errors(tmp_path):
  store = TrainCheckpoints(tmp_path / "ck", max_to_keep=3)
  state = {"w": np.arange(6, dtype=np.float32)}
  store.save(1, state, {"step": 1})
  store.save(2, {"w": state["w"] + 1}, {"step": 2})
  store.wait()
  # corrupt every file of the newest step
  for f in (tmp_path / "ck" / "2").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  step, restored, meta = store.restore(state)
  assert step == 1 and meta == {"step": 1}
  np.testing.assert_array_equal(restored["w"], state["w"])
  for f in (tmp_path / "ck" / "1").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="no readable checkpoint"):
    store.restore(state)
  store.close()
  shutil.rmtree(tmp_path / "ck")
