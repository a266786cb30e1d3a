"""Evaluation by the serving protocol (``malloc_jax.serving``): prefill, compress, score.

For each user the history's last ``query_len`` events are the request; everything before is
prefilled into a native cache, compressed, materialized, and the request is scored against
that memory over the full item corpus. With the native compressor this equals the full
forward pass (tested).

Users are sharded over all devices by default (``malloc_jax.parallel``): each batch's rows are
split over a one-axis mesh and the model is replicated; ``num_devices=1`` keeps everything on
one device.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import parallel, serving
from malloc_jax.data.dataset import EvalSet
from malloc_jax.metrics import retrieval_metrics
from malloc_jax.models.base import Events
from malloc_jax.serving import padded_batches, split_request

__all__ = ["EvalResult", "calibration_caches", "check_eval_set", "evaluate",
           "evaluate_by_length", "evaluate_streaming", "padded_batches", "split_request"]


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  bytes_per_user: float  # buffer bytes per user (static capacity)
  shared_bytes: int
  seconds: float
  num_users: int
  stored_bytes: float = float("nan")  # mean compressors.stored_bytes over the served users
  memory: Any = None  # the last batch's memory (for checkpointing)

  def row(self) -> dict:
    return {**self.metrics, "stored_bytes": self.stored_bytes,
            "bytes_per_user": self.bytes_per_user,
            "shared_bytes": self.shared_bytes, "eval_seconds": self.seconds,
            "num_users": self.num_users}


def evaluate(model, data: EvalSet, compressor: comp_lib.Compressor, *, batch_size: int = 256,
             ks=(10, 50, 200), query_len: int = 1, window: int = 8,
             max_users: int | None = None, num_devices: int = 0) -> EvalResult:
  """Serving-protocol metrics of ``compressor`` on an evaluation split.

  Users are processed in fixed-size batches (the last one padded and masked), so everything
  compiles once. ``stored_bytes``: mean exact stored bytes of the served users' memories
  (``compressors.stored_bytes``, compressor state included); ``bytes_per_user``: the static
  buffer's per-user leaves.
  Batches are sharded over ``num_devices`` devices (0: all; see ``parallel.data_mesh``), the
  batch size rounded up to a multiple of the device count (the extra rows are masked).
  """
  if not len(data):
    raise ValueError("evaluate: the evaluation split has no users")
  check_eval_set(data, model.num_items)
  t0 = time.time()
  served = serving.serve(
      model, serving.batches(model, data, batch_size=batch_size, max_users=max_users,
                             query_len=query_len, window=window, num_devices=num_devices),
      compressor, window=window, num_devices=num_devices, where="evaluate")
  memory = served.memory
  return EvalResult(metrics=retrieval_metrics(served.ranks, ks),
                    bytes_per_user=comp_lib.bytes_per_user(memory),
                    stored_bytes=float(served.user_bytes[0].mean()),
                    shared_bytes=comp_lib.shared_nbytes(memory), seconds=time.time() - t0,
                    num_users=served.num_users, memory=memory)


def evaluate_by_length(model, data: EvalSet, compressor: comp_lib.Compressor, *, buckets: int,
                       batch_size: int = 256, ks=(10, 50, 200),
                       max_users: int | None = None, num_devices: int = 0) -> dict[str, float]:
  """:func:`evaluate`'s metrics with users grouped by history length, windows trimmed.

  The served users (the first ``max_users``) are grouped by the static width
  ``train.bucket_width`` gives their length (at most ``buckets`` widths, multiples of
  ceil(N / buckets)), and each group is served by :func:`evaluate` on its windows cut to that
  width. Windows are left-aligned, so the cut drops only padding: every user's rank is the
  one of the full window, and the metrics (per-user means) are the groups' means weighted by
  their user counts. At capacity 1,024 on ML-1M (median 96 events) this serves the
  validation users several times faster than full windows (the attention is quadratic).

  Args:
    model, data, compressor, batch_size, ks, num_devices: as for :func:`evaluate`.
    buckets: number of static widths (> 1).
    max_users: serve only the first users (None: all).

  Returns:
    {metric: value} as ``EvalResult.metrics`` of :func:`evaluate` on the same users.
  """
  from malloc_jax.train import bucket_width
  if buckets <= 1:
    raise ValueError(f"evaluate_by_length: buckets={buckets}: expected > 1")
  n = len(data) if not max_users else min(max_users, len(data))
  full = data.items.shape[1]
  lengths = np.asarray(data.length[:n])
  widths = np.array([bucket_width(max(int(x), 1), full, buckets) for x in lengths])
  sums, total = {}, 0
  for w in np.unique(widths):
    idx = np.flatnonzero(widths == w)
    part = EvalSet(items=data.items[idx, :w], ts=data.ts[idx, :w], length=data.length[idx],
                   target=data.target[idx], target_ts=data.target_ts[idx])
    res = evaluate(model, part, compressor, batch_size=min(batch_size, len(idx)), ks=ks,
                   num_devices=num_devices)
    for k, v in res.metrics.items():
      sums[k] = sums.get(k, 0.0) + v * len(idx)
    total += len(idx)
  return {k: v / total for k, v in sums.items()}


def evaluate_streaming(model, data: EvalSet, compressor: comp_lib.Compressor, *, requests: int,
                       batch_size: int = 256, ks=(10, 50, 200), query_len: int = 1,
                       window: int = 8, max_users: int | None = None,
                       num_devices: int = 0) -> dict[str, float]:
  """Retrieval metrics under the streaming protocol, plus the final memory's bytes per user.

  Args:
    model, data, compressor, batch_size, ks, query_len, window, max_users, num_devices: as
      :func:`evaluate`.
    requests: r, the number of requests each history arrives in.

  Returns:
    {HR@K, NDCG@K, MRR, "bytes_per_user", "requests"}.
  """
  if not len(data):
    raise ValueError("evaluate_streaming: the evaluation split has no users")
  check_eval_set(data, model.num_items)
  served = serving.serve(
      model, serving.batches(model, data, batch_size=batch_size, max_users=max_users,
                             query_len=query_len, window=window, num_devices=num_devices),
      compressor, requests=(int(requests),), window=window, num_devices=num_devices,
      where="evaluate_streaming")
  out = retrieval_metrics(served.stream_ranks[int(requests)], ks)
  out["bytes_per_user"] = comp_lib.bytes_per_user(served.stream_memory[int(requests)])
  out["requests"] = int(requests)
  return out


def check_eval_set(data: EvalSet, num_items: int) -> None:
  """Raises ValueError, naming the user, for ids outside 1..num_items or empty histories."""
  lengths = np.asarray(data.length)
  if (lengths < 1).any():
    u = int(np.flatnonzero(lengths < 1)[0])
    raise ValueError(f"evaluate: user index {u} has an empty history (length "
                     f"{int(lengths[u])}); serving needs at least one event")
  valid = np.arange(data.items.shape[1])[None, :] < lengths[:, None]
  bad = valid & ((data.items < 1) | (data.items > num_items))
  if bad.any():
    u, t = (int(x[0]) for x in np.nonzero(bad))
    raise ValueError(f"evaluate: user index {u}, event {t} has item id {int(data.items[u, t])}"
                     f" outside the model's vocabulary 1..{num_items}")
  tbad = (data.target < 1) | (data.target > num_items)
  if tbad.any():
    u = int(np.flatnonzero(tbad)[0])
    raise ValueError(f"evaluate: user index {u} has target item id {int(data.target[u])} "
                     f"outside the model's vocabulary 1..{num_items}")


def calibration_caches(model, data: EvalSet, *, num_users: int = 512, batch_size: int = 128,
                       seed: int = 0, num_devices: int = 0, signals: bool = False):
  """Yields native caches of training histories (for low-rank calibration); with
  ``signals=True`` (cache, signals) pairs of ``prefill`` (methods whose spec says
  ``calibration_signals``).

  Each batch is sharded over ``num_devices`` devices (0: all) when its size divides over
  them; a short last batch is replicated instead.
  """
  n = min(num_users, len(data))
  idx_all = np.random.default_rng(seed).permutation(len(data))[:n]
  prefill = jax.jit(lambda m, e: m.prefill(e) if signals else m.prefill(e)[0])
  mesh = parallel.data_mesh(num_devices)
  model = parallel.replicate(mesh, model)
  for start in range(0, n, batch_size):
    idx = idx_all[start:start + batch_size]
    yield prefill(model, Events(*parallel.shard_batch(mesh, data.items[idx], data.ts[idx],
                                                      data.length[idx])))
