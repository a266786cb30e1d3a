r"""XLA's FLOPs of one serving request against the closed form, for every backbone of a sweep.

  python scripts/flops_check.py --config configs/sweep.py:datasets=ml100k,models=hstu+sasrec+hstu_gqa+hstu_mqa+hstu_mla+hstu_linformer+hstu_lsh+hstu_longformer+hstu_beacon+hstu_rwkv+hstu_linear+sasrec_gqa+sasrec_mqa

No training: FLOPs depend on shapes only, so each backbone is built at the dataset's shapes
(its item count, window ``data.max_len``, the model section the sweep would train), a native
memory of full windows is traced (``jax.eval_shape``, never run) and the serving request the
sweep measures (``costs.serve_request``, ``eval.query_len`` events) is compiled. Prints, per
backbone and dataset, XLA's flops per request, the closed form (``costs.closed_form_flops``),
their ratio, and the ratio of the matrix-multiply parts' inputs (the closed form's
``matmul``), so the cross-check of issue 5 covers every backbone at the shapes reported in
BENCHMARKS.md. RWKV's recurrence steps after the first are not counted by XLA (a while
loop's body is counted once); the ratio given is against the closed form less those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from malloc_jax import costs, logging_setup
from malloc_jax.evaluate import split_request
from malloc_jax.experiment import build_model, load_data

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep.py", "A sweep config.")
_BATCH = flags.DEFINE_integer("batch", 4, "Users per compiled request batch.")


def check(model, *, window: int, query_len: int, batch: int) -> dict:
  """XLA and closed-form flops per request of ``model`` serving a full native memory."""
  n = jnp.arange(batch * window, dtype=jnp.int32).reshape(batch, window)
  items = 1 + n % model.num_items
  ts = 1_600_000_000 + 60 * n.astype(jnp.int64 if jax.config.x64_enabled else jnp.int32)
  length = jnp.full((batch,), window, jnp.int32)
  prefix, req = split_request(items, ts, length, query_len)
  numbers, _, closed = costs.flops_cross_check(model, prefix, req)
  xla = numbers["flops"] / batch
  out = {"xla": xla, "closed": None, "ratio": None}
  if closed is not None:
    counted = closed["per_request"] - closed.get("xla_uncounted", 0.0) / batch
    out.update(closed=closed["per_request"], ratio=xla / counted)
  return out


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  config = _CONFIG.value
  print(f"{'backbone':18s} {'dataset':10s} {'XLA flops':>12s} {'closed form':>12s} "
        f"{'XLA/closed':>10s}")
  for label, run in config.datasets.items():
    num_items = load_data(run).num_items
    for name, sections in config.models.items():
      r = run.copy_and_resolve_references()
      r.model = sections[label]
      model = build_model(r, num_items)
      res = check(model, window=r.data.max_len, query_len=r.eval.query_len,
                  batch=_BATCH.value)
      closed = "-" if res["closed"] is None else f"{res['closed']:12.4g}"
      ratio = "-" if res["ratio"] is None else f"{res['ratio']:10.3f}"
      print(f"{name:18s} {label:10s} {res['xla']:12.4g} {closed:>12s} {ratio:>10s}",
            flush=True)


if __name__ == "__main__":
  app.run(main)
