r"""Post-hoc compressor table: every method at 2x / 4x / 8x memory reduction on one dataset.

Trains the backbone (or reuses the checkpoint in --workdir), then serves the test split from
each compressed memory and prints a Markdown table (also written to --out as JSON).

  python scripts/posthoc_table.py --config configs/default.py:data=ml-100k,path=/path/to/ml-100k/u.data \
      --workdir runs/ml100k_hstu --out runs/ml100k_hstu/posthoc.json
  python scripts/posthoc_table.py --config configs/default.py --methods native,lowrank
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from malloc_jax import compressors as C
from malloc_jax import logging_setup, serving
from malloc_jax.checkpoint import workdir_lock
from malloc_jax.compressors.budget import cache_spec, memory_bytes, ratio_table
from malloc_jax.config_validation import validate_config
from malloc_jax.evaluate import calibration_caches, check_eval_set, evaluate
from malloc_jax.experiment import check_workdir, load_data, train_model
from malloc_jax.fileio import write_json_atomic
from malloc_jax.metrics import retrieval_metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.")
_LOCKS = contextlib.ExitStack()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (reused).")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default workdir/posthoc.json).")
_METHODS = flags.DEFINE_list(
    "methods", [n for n in C.specs() if n != "native"],
    "Methods to sweep (native always runs); default: every registered method.")
_RATIOS = flags.DEFINE_list("ratios", "2,4,8", "Memory reductions.")
_CHAINS = flags.DEFINE_bool("chains", True, "Also run the chained configurations.")
_REUSE = flags.DEFINE_bool(
    "reuse_prefill", True, "Prefill each user batch once and compress it for every cell "
    "(the same computation as evaluate(), split at the prefill; needs the batches' native "
    "caches in host memory). --noreuse_prefill calls evaluate() per cell.")


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  config = _CONFIG.value
  validate_config(config)
  workdir = Path(_WORKDIR.value)
  _LOCKS.enter_context(workdir_lock(workdir, "posthoc_table"))  # held until exit
  check_workdir(workdir, config)
  data = load_data(config)
  print(data.summary(), flush=True)
  model, info = train_model(config, workdir, data)
  split = data.eval_set(config.eval.split)
  heads, dk, dv = model.head_dims()
  spec = cache_spec(len(model.layers), heads, config.data.max_len, dk, dv)
  shape = C.CacheShape.of(spec)
  native_bytes = memory_bytes("native", spec)
  fitted = {}
  caches = lambda: calibration_caches(model, data.valid,
                                      num_users=config.eval.calibration_users)

  def build(method, params):  # calibrated methods (low rank) are fitted once per setting
    key = (method, json.dumps(params, sort_keys=True))
    if key not in fitted:
      fitted[key] = C.factory_params(method, params, shape, caches)
    return C.make_compressor(method, **fitted[key])

  group = C.get_spec("kivi").auto["group"](shape)
  cells = [("native", "native", {})]
  ratios = [float(r) for r in _RATIOS.value]
  for method in _METHODS.value:
    if method == "kivi":
      # group: the largest divisor of the head dim up to 32; residual: one group (the
      # paper's R = 128 exceeds most of these histories and would keep them exact).
      for bits in (4, 2):
        cells.append((f"kivi {bits}-bit", "kivi",
                      {"bits": bits, "group": group, "residual": group}))
      continue
    if method == "native":
      continue
    for ratio, params in ratio_table(method, spec, ratios).items():
      if params is None:
        print(f"{method}: {ratio:g}x is out of reach, skipped", flush=True)
        continue
      cells.append((f"{method} {ratio:g}x", method, params))
  chains = []
  if _CHAINS.value:
    T = config.data.max_len
    chains = [
        ("snapkv(T/2) + kivi 4-bit", [("snapkv", {"budget": T // 2, "window": 8}),
                                      ("kivi", {"bits": 4, "group": group,
                                                "residual": group})]),
        ("h2o(T/4) + uniform 8-bit", [("h2o", {"heavy": T // 8, "recent": T // 8}),
                                      ("uniform", {"bits": 8})]),
        ("streaming(T/2) + kivi 2-bit", [("streaming", {"sinks": 4, "recent": T // 2 - 4}),
                                         ("kivi", {"bits": 2, "group": group,
                                                   "residual": group})]),
    ]
  rows = []
  t0 = time.time()
  prefilled = None
  if _REUSE.value:
    check_eval_set(split, model.num_items)
    prefilled = list(serving.batches(
        model, split, batch_size=config.eval.batch_size, window=config.eval.window,
        max_users=config.eval.max_users or None, num_devices=config.get("num_devices", 0)))
    print(f"prefilled the users once ({time.time() - t0:.0f}s)", flush=True)
  todo = [(label, method, params, None) for label, method, params in cells]
  todo += [(label, "chain", {}, steps) for label, steps in chains]
  for i, (label, method, params, steps) in enumerate(todo):
    if steps is None:
      comp = build(method, params)
    else:
      comp = C.chain(*(build(m, p) for m, p in steps))
      params = {m: p for m, p in steps}
    if prefilled is not None:
      t = time.time()
      served = serving.serve(model, prefilled, comp, window=config.eval.window,
                             num_devices=config.get("num_devices", 0), where=label)
      stored, buffer = (float(x) for x in served.user_bytes.mean(axis=1))
      reference = float(np.mean(C.native_stored_bytes(prefilled[0].cache, served.lengths)))
      res = {**retrieval_metrics(served.ranks, tuple(config.eval.ks)),
             "stored_bytes": stored, "buffer_bytes": buffer,
             "reference_stored_bytes": reference,
             "bytes_per_user": C.bytes_per_user(served.memory),
             "shared_bytes": C.shared_nbytes(served.memory), "eval_seconds": time.time() - t,
             "num_users": served.num_users}
    else:
      res = evaluate(model, split, comp, batch_size=config.eval.batch_size,
                     window=config.eval.window,
                     max_users=config.eval.max_users or None).row()
    # Stored bytes of the same users (native over method) when measured (--reuse), else the
    # full-user buffer ratio of before.
    ratio = (res["reference_stored_bytes"] / res["stored_bytes"] if "stored_bytes" in res
             else native_bytes / res["bytes_per_user"])
    row = {"method": label, "family": method, "params": params, **res, "compression_ratio": ratio}
    rows.append(row)
    print(f"[{i + 1}/{len(todo)}] {label}: NDCG@10 {row['NDCG@10']:.4f} HR@10 "
          f"{row['HR@10']:.4f} stored B/user {row.get('stored_bytes', float('nan')):,.0f} "
          f"buffer {row['bytes_per_user']:,.0f} "
          f"({row['compression_ratio']:.2f}x)  {time.time() - t0:.0f}s", flush=True)
  out = Path(_OUT.value) if _OUT.value else workdir / "posthoc.json"
  write_json_atomic(out, {"dataset": data.summary(), "model": config.model.to_dict(),
                          "train": info, "rows": rows})
  print("\n| method | params | NDCG@10 | HR@10 | stored B/user | buffer B/user | ratio |\n"
        "|---|---|---|---|---|---|---|")
  for r in rows:
    p = json.dumps(r["params"], sort_keys=True).replace("|", "/")
    print(f"| {r['method']} | `{p}` | {r['NDCG@10']:.4f} | {r['HR@10']:.4f} | "
          f"{r.get('stored_bytes', float('nan')):,.0f} | {r['bytes_per_user']:,.0f} | "
          f"{r['compression_ratio']:.2f}x |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
