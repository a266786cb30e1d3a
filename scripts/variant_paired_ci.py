r"""Paired 95% bootstrap CIs of the sweep's variant axis: each backbone's native cell against a
reference backbone, over the same served users.

A sweep's results.jsonl keeps means only; this reloads each backbone the sweep trained (its
finished checkpoint in ``workdir/models/<key>``: ``train_model`` loads a finished run
without training), serves the native cell's
users again exactly as ``sweep.run_cell`` does (same users, same request split), and compares
per-user NDCG@10 with ``stats.paired_bootstrap``. It checks that the recomputed mean equals
the sweep row's NDCG@10 before reporting.

  python scripts/variant_paired_ci.py \
      --config configs/sweep.py:datasets=synthetic,models=hstu+hstu_cla,methods=native,variant_methods=native,requests=4 \
      --workdir runs/cla_sweep --reference hstu
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from malloc_jax import compressors as C
from malloc_jax import serving, stats, sweep
from malloc_jax.experiment import load_data, num_devices, train_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "The sweep config that was run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir (finished backbones).")
_REFERENCE = flags.DEFINE_string("reference", "hstu", "Model label compared against.")
_METRIC = flags.DEFINE_string("metric", "NDCG@10", "Per-user retrieval metric.")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, Path(_WORKDIR.value)
  rows = {r["cell"]: r for r in sweep.load_results(workdir / sweep.RESULTS, repair=False)}
  cells = [c for c in sweep.expand_cells(config, print_fn=lambda *_: None)
           if c.family == "native"]
  per_user, out = {}, {}
  for cell in cells:
    if cell.id not in rows:
      raise ValueError(f"{workdir}: cell {cell.id} is not finished; run the sweep first")
    data = load_data(cell.run)
    model, info = train_model(cell.run, workdir / "models" / cell.train_key, data,
                              print_fn=lambda *_: None)
    backbone = sweep._Backbone(cell.train_key, model, data, cell.run, info)
    split, n, candidates = sweep._eval_users(cell, backbone, config)
    e = cell.run.eval
    served = serving.serve(model, backbone.user_batches(split, n, e), C.native(),
                           candidates=candidates, window=e.window,
                           num_devices=num_devices(cell.run), where=cell.id)
    values = stats.per_user_metric(served.ranks, _METRIC.value)
    row = rows[cell.id]
    if abs(values.mean() - row[_METRIC.value]) > 1e-6:
      raise ValueError(f"{cell.id}: recomputed {_METRIC.value} {values.mean():.6f} differs "
                       f"from the sweep row's {row[_METRIC.value]:.6f}")
    key = (cell.dataset, cell.model)
    per_user[key] = values
    out[key] = {"dataset": cell.dataset, "model": cell.model, _METRIC.value: row[_METRIC.value],
                "stored_bytes": row["stored_bytes"],
                "reference_stored_bytes": row["reference_stored_bytes"],
                "compression_ratio": row["compression_ratio"], "num_users": int(n),
                "best_valid_ndcg10": row.get("best_valid_ndcg10")}
  print(f"| dataset | model | {_METRIC.value} | diff vs {_REFERENCE.value} [95% CI] | "
        "stored bytes/user | ratio | users |")
  print("|---|---|---|---|---|---|---|")
  for (ds, model_label), res in out.items():
    ref = per_user.get((ds, _REFERENCE.value))
    if ref is None:
      raise ValueError(f"no {_REFERENCE.value} cell for dataset {ds}")
    ci = stats.paired_bootstrap(per_user[(ds, model_label)], ref)
    res["paired"] = {k: float(v) if isinstance(v, (int, float, np.floating)) else v
                     for k, v in ci.items()}
    print(f"| {ds} | {model_label} | {res[_METRIC.value]:.4f} | {ci['diff']:+.4f} "
          f"[{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}] | {res['stored_bytes']:,.0f} | "
          f"{res['compression_ratio']:.2f}x | {res['num_users']} |")
  path = workdir / f"variant_paired_ci_{_REFERENCE.value}.json"
  path.write_text(json.dumps(list(out.values()), indent=1, default=str))
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
