r"""Issue 7, target 5: the whole ML-100K sweep of every method within 30 minutes, by stage.

  python scripts/bench_sweep.py --workdir /tmp/bench_sweep [--limit_minutes 30]

Runs, as a subprocess, exactly

  python -m malloc_jax.sweep --config configs/sweep.py:<--sweep_args> --workdir <--workdir>

from a workdir that must not hold results yet (a resumed sweep is not a timing), streams its
progress, then reads the cells' stage timings from ``results.jsonl`` and prints where the
time went: training (once per backbone) and, summed over cells, prefill, compression,
scoring (one-shot serving), streaming and the cost measurements (FLOPs, latency), with the
rest (data loading, compiles outside the stages, bookkeeping) as "other".

The default ``--sweep_args`` is the 2-core CPU recipe of BENCHMARKS.md: every post-hoc
method and every trained HSTU variant on ML-100K, a CPU-sized training budget with length
bucketing, one streaming r. Exits non-zero when the wall time exceeds ``--limit_minutes``;
the last line is the wall time over the limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from malloc_jax import logging_setup  # noqa: E402
from malloc_jax.sweep import RESULTS, load_results, stage_summary  # noqa: E402

VARIANTS = "+".join(["hstu", "hstu_gqa", "hstu_mqa", "hstu_mla", "hstu_linformer", "hstu_lsh",
                     "hstu_longformer", "hstu_beacon", "hstu_rwkv", "hstu_linear"])
CPU_RECIPE = (f"datasets=ml100k,models={VARIANTS},steps=150,buckets=4,requests=16,"
              "variant_methods=native")

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep workdir (must hold no results).")
_ARGS = flags.DEFINE_string("sweep_args", CPU_RECIPE, "Arguments of configs/sweep.py.")
_LIMIT = flags.DEFINE_float("limit_minutes", 30.0, "Target wall time.")


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  workdir = Path(_WORKDIR.value)
  if (workdir / RESULTS).exists() and load_results(workdir / RESULTS, repair=False):
    raise SystemExit(f"{workdir / RESULTS} already holds results: a resumed sweep is not a "
                     "timing; pass an empty --workdir")
  cmd = [sys.executable, "-m", "malloc_jax.sweep", "--config",
         f"configs/sweep.py:{_ARGS.value}", "--workdir", str(workdir)]
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
  wall = time.time() - t0
  if rc:
    raise SystemExit(f"the sweep failed (exit {rc}) after {wall / 60:.1f} minutes")
  rows = load_results(workdir / RESULTS, repair=False)
  print(stage_summary(rows))
  print(f"cores: {os.cpu_count()}; cells: {len(rows)}")
  ratio = wall / 60 / _LIMIT.value
  print(f"whole sweep: {wall / 60:.1f} min / {_LIMIT.value:.0f} min limit = {ratio:.2f} "
        f"({'PASS' if ratio <= 1 else 'MISSED'})")
  if ratio > 1:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
