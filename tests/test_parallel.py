"""Data parallelism: sharded training and evaluation equal the single-device run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from malloc_jax import parallel

ROOT = Path(__file__).resolve().parents[1]

# Trains the tiny config, evaluates native and low-rank memories (calibration included) and
# prints the result rows; run under a forced number of host devices.
SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from malloc_jax import config_lib, experiment

    devices = int(sys.argv[2])
    assert jax.device_count() == devices, jax.devices()
    c = config_lib.base_config("runlocal=True,steps=8")
    c.train.update(eval_every=4, checkpoint_every=4, log_every=4)
    c.compressors.lowrank = {"name": "lowrank", "rank": 4}
    res = experiment.train_and_evaluate(c, sys.argv[1], print_fn=lambda *a: None)
    bad = None
    if devices > 1:  # a training batch that does not divide over the devices is refused
      c.train.batch_size = devices * 4 + 1
      try:
        experiment.train_and_evaluate(c, sys.argv[1] + "_bad", print_fn=lambda *a: None)
      except ValueError as e:
        bad = str(e)
    print(json.dumps({"rows": res["rows"], "num_devices": res["num_devices"], "bad": bad}))
""")


def _launch(workdir: Path, devices: int) -> subprocess.Popen:
  # Both runs use the same flags; LLVM optimization level 0 compiles 3-4x faster on CPU.
  flags = (f"--xla_force_host_platform_device_count={devices} "
           "--xla_backend_optimization_level=0")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  return subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir), str(devices)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_four_devices_match_one_device(tmp_path):
  """Tiny model trained and evaluated sharded over 4 host devices: metrics as on 1 device."""
  procs = {n: _launch(tmp_path / f"d{n}", n) for n in (1, 4)}  # concurrently: 2 cores
  out = {}
  for n, p in procs.items():
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    out[n] = json.loads(stdout.strip().splitlines()[-1])
  assert out[1]["num_devices"] == 1 and out[4]["num_devices"] == 4
  assert "config.train.batch_size=17" in out[4]["bad"] and "4 devices" in out[4]["bad"]
  one = {r["method"]: r for r in out[1]["rows"]}
  four = {r["method"]: r for r in out[4]["rows"]}
  assert set(one) == set(four) == {"popularity", "native", "lowrank"}
  for method, r in one.items():
    for key in ("HR@10", "NDCG@10", "MRR", "HR@50", "NDCG@50", "bytes_per_user"):
      if key in r:
        assert four[method][key] == pytest.approx(r[key], abs=1e-5), (method, key)
  assert one["native"]["NDCG@10"] > 0  # a trained model, not a degenerate zero
  assert one["lowrank"]["bytes_per_user"] < one["native"]["bytes_per_user"]


def test_single_device_is_the_plain_path():
  n = len(jax.devices())
  mesh = parallel.data_mesh(1)
  assert mesh is None and parallel.num_shards(mesh) == 1
  x = np.arange(6, dtype=np.int32).reshape(3, 2)
  (y,) = parallel.shard_batch(None, x)
  np.testing.assert_array_equal(np.asarray(y), x)
  assert parallel.replicate(None, {"w": x})["w"] is x
  assert parallel.padded_batch_size(5, None) == 5
  parallel.check_batch_size(5, None, "train.batch_size")
  with pytest.raises(ValueError, match=f"config.num_devices={n + 1}: only {n} device"):
    parallel.data_mesh(n + 1)
  with pytest.raises(ValueError, match="config.num_devices=-1"):
    parallel.data_mesh(-1)
