"""Evaluation by the serving protocol: prefill, compress, score against the memory.

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
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import parallel
from malloc_jax.data.dataset import EvalSet
from malloc_jax.metrics import retrieval_metrics, target_rank
from malloc_jax.models.base import Events


def padded_batches(n: int, batch_size: int):
  """Yields (start, idx [batch_size], real [batch_size]) covering rows 0..n-1 in order.

  Every batch has the same static size (one compile): rows past ``n`` in the last batch
  repeat row 0 and are marked False in ``real``, for the caller to drop.
  """
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    real = idx < n
    yield start, np.where(real, idx, 0), real


def split_request(items, ts, length, query_len: int):
  """Splits padded histories [B, N] into (prefix Events, request Events [B, query_len])."""
  q = jnp.minimum(length, query_len)  # users shorter than the request keep what they have
  prefix = Events(items, ts, length - q)
  idx = jnp.clip(prefix.length[:, None] + jnp.arange(query_len)[None], 0, items.shape[1] - 1)
  req = Events(jnp.take_along_axis(items, idx, 1), jnp.take_along_axis(ts, idx, 1), q)
  return prefix, req


@functools.partial(jax.jit, static_argnames=("compressor", "query_len", "window"))
def serve_batch(model, items, ts, length, target, *, compressor, query_len=1, window=8):
  """Prefill, compress and score one batch; returns (ranks [B], memory, finite [B])."""
  prefix, req = split_request(items, ts, length, query_len)
  cache, signals = model.prefill(prefix, window)
  memory, _ = compressor.compress(cache, compressor.init(cache), signals)
  logits = model.score(memory.materialize(), req)
  finite = jnp.all(jnp.isfinite(logits[:, 1:]), axis=1)  # [B] (item 0 is -inf padding)
  return target_rank(logits, target), memory, finite


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  bytes_per_user: float
  shared_bytes: int
  seconds: float
  num_users: int
  memory: Any = None  # the last batch's memory (for checkpointing)

  def row(self) -> dict:
    return {**self.metrics, "bytes_per_user": self.bytes_per_user,
            "shared_bytes": self.shared_bytes, "eval_seconds": self.seconds,
            "num_users": self.num_users}


def evaluate(model, data: EvalSet, compressor: comp_lib.Compressor, *, batch_size: int = 256,
             ks=(10, 50, 200), query_len: int = 1, window: int = 8,
             max_users: int | None = None, num_devices: int = 0) -> EvalResult:
  """Serving-protocol metrics of ``compressor`` on an evaluation split.

  Users are processed in fixed-size batches (the last one padded and masked), so everything
  compiles once. Bytes per user are the stored memory's per-user leaves over the batch.
  Batches are sharded over ``num_devices`` devices (0: all; see ``parallel.data_mesh``), the
  batch size rounded up to a multiple of the device count (the extra rows are masked).
  """
  n = len(data) if not max_users else min(max_users, len(data))
  if n == 0:
    raise ValueError("evaluate: the evaluation split has no users")
  check_eval_set(data, model.num_items)
  mesh = parallel.data_mesh(num_devices)
  bs = parallel.padded_batch_size(min(batch_size, n), mesh)
  model = parallel.replicate(mesh, model)
  ranks, memory, t0 = [], None, time.time()
  for start, idx, real in padded_batches(n, bs):
    r, memory, finite = serve_batch(
        model, *parallel.shard_batch(mesh, data.items[idx], data.ts[idx], data.length[idx],
                                     data.target[idx]),
        compressor=compressor, query_len=query_len, window=window)
    bad = np.flatnonzero(~parallel.to_host(finite)[real])
    if bad.size:
      raise FloatingPointError(
          f"evaluate: non-finite scores (NaN or inf in the memory or the model) for "
          f"{bad.size} user(s), first user index {start + bad[0]}; refusing to report metrics")
    ranks.append(parallel.to_host(r)[real])
  seconds = time.time() - t0
  return EvalResult(metrics=retrieval_metrics(np.concatenate(ranks), ks),
                    bytes_per_user=comp_lib.bytes_per_user(memory),
                    shared_bytes=comp_lib.shared_nbytes(memory), seconds=seconds,
                    num_users=n, memory=memory)


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
