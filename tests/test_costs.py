"""Costs: XLA FLOPs of a native serving request agree with the closed form; timings."""

import jax
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax import costs
from malloc_jax.evaluate import split_request
from tests.helpers import random_events, random_model

B, N, V, D, H = 4, 65, 500, 32, 2


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_xla_flops_match_closed_form(name):
  model = random_model(name, V, dim=D, heads=H, num_layers=2, max_len=128)
  ev = random_events(B, N, [N] * B, V)
  prefix, req = split_request(ev.items, ev.ts, ev.length, 1)
  cache, _ = jax.jit(lambda m, e: m.prefill(e))(model, prefix)
  memory, _ = C.native().compress(cache, None)
  got = costs.serving_costs(model, memory, req, closed_form=True, warmup=1, iters=3)
  # the closed form, written out independently for this shape (T = 65 slots, m = 1)
  T, m, dh, L = N, 1, D // H, 2
  if name == "hstu":
    mm = 2 * m * D * 4 * D + 2 * m * H * (T + m) * 2 * dh + 2 * m * D * D
  else:
    mm = 2 * m * D * 3 * D + 2 * m * H * (T + m) * 2 * dh + 2 * m * D * D + 4 * m * D * D
  closed = costs.request_flops(name, batch=B, num_layers=L, dim=D, heads=H, dqk=dh, dv=dh,
                               cached=T, request=m, num_items=V)
  assert closed["matmul"] == B * (L * mm + 2 * D * (V + 1))
  assert got.flops_closed_form == pytest.approx(closed["per_request"])
  assert 0.9 < got.flops_ratio < 1.1, (got.flops, got.flops_closed_form)
  row = got.row()
  assert row["flops_xla_over_closed_form"] == pytest.approx(got.flops_ratio)
  assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
  assert row["users_per_s"] > 0 and row["cost_batch"] == B
  # The recompute reference re-encodes all N events: several times the cached request.
  rec = costs.recompute_costs(model, ev, warmup=1, iters=2)
  assert 0.9 < rec.flops_ratio < 1.1
  assert rec.flops > 2 * got.flops


def test_projection_and_ratio():
  assert costs.projection(160_804) == "160.8 TB"
  assert costs.projection(8 * 2**20) == "8.4 PB"
  assert costs.compression_ratio(100.0, 25.0) == 4.0
  with pytest.raises(ValueError, match="method_bytes"):
    costs.compression_ratio(1.0, 0.0)
  assert costs.model_kind(random_model("hstu")) == "hstu"
  with pytest.raises(ValueError, match="kind"):
    costs.request_flops("gpt", batch=1, num_layers=1, dim=2, heads=1, dqk=2, dv=2, cached=1,
                        request=1, num_items=2)
  assert np.isfinite(costs.events_bytes_per_user(random_events(2, 5, [5, 3])))
