r"""Trained attention variants against native HSTU at the same budget of training steps.

  python scripts/variants_table.py --data ml-100k --path ../shared/data/ml-100k/u.data \
      --steps 400 --workdir runs/variants_ml100k
  python scripts/variants_table.py --data synthetic --long --steps 300 --workdir runs/variants_syn

Each variant (``malloc_jax.models.BACKBONES``) is trained for exactly --steps (no early
stopping, so every row has the same budget), then its test split is served by the serving
protocol from its own memory. Reported per row: NDCG@10, HR@10, bytes per user of the stored
memory, FLOPs per request (XLA cost analysis of the jitted request, per user) and training
time. The JSON is rewritten after every row, so an interrupted run keeps finished rows, and a
rerun skips them.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import ml_collections
from absl import app, flags

from malloc_jax import compressors as C
from malloc_jax import config_lib, logging_setup
from malloc_jax.checkpoint import workdir_lock, write_json_atomic
from malloc_jax.config_validation import validate_config
from malloc_jax.evaluate import evaluate, split_request
from malloc_jax.experiment import _check_workdir, load_data, train_model

_DATA = flags.DEFINE_string("data", "synthetic", "synthetic | ml-100k | ... (config data=)")
_PATH = flags.DEFINE_string("path", "", "Data file for real datasets.")
_LONG = flags.DEFINE_bool("long", False, "Synthetic histories of length 1024.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps for every variant.")
_LOCKS = contextlib.ExitStack()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for runs and variants.json.")
_VARIANTS = flags.DEFINE_list(
    "variants", "hstu,hstu_gqa,hstu_mqa,hstu_mla,hstu_linformer,hstu_lsh,hstu_longformer,"
    "hstu_beacon,hstu_rwkv,hstu_linear", "Model names, native first.")
_MAX_USERS = flags.DEFINE_integer("max_users", 0, "Evaluate at most this many users (0: all).")


def passthrough() -> C.Compressor:
  """Keeps whatever memory the model's prefill returns (a Cache or a fixed state)."""
  native = C.native()

  def compress(cache, state, signals=None):
    if hasattr(cache, "k") and hasattr(cache, "pos"):
      return native.compress(cache, state, signals)
    return cache, state

  return C.Compressor(lambda c: C.EmptyState(), compress)


def request_flops(model, data, batch: int) -> float | None:
  """FLOPs per user of one serving request (read the memory, score all items), from XLA."""
  idx = slice(0, batch)
  items, ts, length = (jax.numpy.asarray(a[idx]) for a in (data.items, data.ts, data.length))
  prefix, req = split_request(items, ts, length, 1)
  memory, _ = jax.jit(lambda m, e: m.prefill(e))(model, prefix)
  fn = jax.jit(lambda m, c, q: m.score(c, q))
  cost = fn.lower(model, memory, req).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) / batch if cost else None


def config_for(name: str) -> ml_collections.ConfigDict:
  arg = f"data={_DATA.value},steps={_STEPS.value}" + (f",path={_PATH.value}" if _PATH.value
                                                       else "")
  c = config_lib.base_config(arg)
  if _LONG.value:
    c.data.max_len = 1024
    c.data.synthetic.update(min_len=900, max_len=1024, lag=512)
    c.train.update(batch_size=32)
    c.eval.batch_size = 64
  c.model.name = name
  c.train.update(eval_every=0, patience=0)
  return c


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  out_dir = Path(_WORKDIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  out = out_dir / "variants.json"
  rows = json.loads(out.read_text())["rows"] if out.exists() else []
  done = {r["model"] for r in rows}
  data = None
  for name in _VARIANTS.value:
    if name in done:
      print(f"{name}: done already")
      continue
    config = config_for(name)
    validate_config(config)
    workdir = out_dir / name
    _LOCKS.enter_context(workdir_lock(workdir, "variants_table"))  # held until exit
    _check_workdir(workdir, config)
    data = data or load_data(config)
    t0 = time.time()
    model, info = train_model(config, workdir, data, print_fn=lambda s: print(f"[{name}] {s}"))
    split = data.eval_set(config.eval.split)
    res = evaluate(model, split, passthrough(), batch_size=config.eval.batch_size,
                   max_users=_MAX_USERS.value or None)
    row = {"model": name, **res.row(), "train_seconds": info["train_seconds"],
           "steps": info["steps"], "flops_per_request": request_flops(model, split, 16),
           "wall_seconds": time.time() - t0, "device": jax.devices()[0].device_kind}
    rows.append(row)
    write_json_atomic(out, {"dataset": data.summary(), "steps": _STEPS.value, "rows": rows})
    print(f"{name}: NDCG@10 {row['NDCG@10']:.4f} HR@10 {row['HR@10']:.4f} bytes/user "
          f"{row['bytes_per_user']:,.0f} flops/request {row['flops_per_request']:,.0f} "
          f"train {row['train_seconds']:.0f}s", flush=True)
  native = next((r for r in rows if r["model"] == "hstu"), None)
  print("\n| model | NDCG@10 | HR@10 | bytes/user | vs native | FLOPs/request | train s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    rel = native["bytes_per_user"] / r["bytes_per_user"] if native else float("nan")
    print(f"| {r['model']} | {r['NDCG@10']:.4f} | {r['HR@10']:.4f} | "
          f"{r['bytes_per_user']:,.0f} | {rel:.2f}x | {r['flops_per_request']:,.0f} | "
          f"{r['train_seconds']:.0f} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
