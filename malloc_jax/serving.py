"""The serving pipeline: prefill -> compress -> serve, one-shot and streaming.

Every entry point (``evaluate``, the sweep, ``scripts/posthoc_table.py``, the notebooks) runs
users through these named stages, so there is one copy of the protocol, of the non-finite
guard and of the multi-device sharding::

  batches = prefill(model, split, batch_size=256)            # stage 1, reusable by many cells
  served = serve(model, batches, compressor, requests=(4,))   # stages 2-4 (+ streaming)
  served.ranks, served.memory, served.stream_ranks[4]

Stages (each one ``jax.jit``-compiled once per shape and static setting):

1. :func:`prefill_stage`: each user's history minus the request -> native cache and signals.
2. :func:`compress_stage`: the one-shot compressed memory.
3. :func:`score_stage`: the request read against the memory; rank of the target over all
   items, optional candidate logits (cosine candidate scores), and a finiteness flag per
   user. :func:`rank_stage` replaces it for target-aware ranking (``serve(...,
   target_aware=True)``: each candidate a query token reading the memory, ``model.rank``),
   optionally after :func:`oracle_signals_stage` replaced the prefill signals.
4. :func:`stream_stage`: the streaming protocol (the prefix arrives in r requests, the memory
   is extended and re-compressed after each) -> ranks and memory.
5. :func:`recompute_stage`: the reference that stores nothing and re-encodes everything.

Users are processed in fixed-size batches (the last one padded and masked: one compile).
Batches are sharded over ``num_devices`` devices (0: all; ``malloc_jax.parallel``), the model
replicated. A user whose scores are not finite stops the run with a FloatingPointError naming
the user (:func:`check_finite`): metrics are never computed over NaNs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import parallel, reads
from malloc_jax.cache import Signals
from malloc_jax.metrics import target_rank
from malloc_jax.models.base import Events
from malloc_jax.streaming import stream_memory


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


# ------------------------------------------------------------------------------------------
# Stages.


@functools.partial(jax.jit, static_argnames=("query_len", "window"))
def prefill_stage(model, items, ts, length, *, query_len: int, window: int):
  """Stage 1: (native cache, signals, prefix Events, request Events) of each user."""
  prefix, req = split_request(items, ts, length, query_len)
  cache, signals = model.prefill(prefix, window)
  return cache, signals, prefix, req


@functools.partial(jax.jit, static_argnames=("compressor",))
def compress_stage(cache, signals, *, compressor):
  """Stage 2: the one-shot compressed memory."""
  memory, _ = compressor.compress(cache, compressor.init(cache), signals)
  return memory


def _read(model, h, target, candidates):
  logits = model.logits(h)  # [B, V + 1], item 0 at -inf
  finite = jnp.all(jnp.isfinite(logits[:, 1:]), axis=1)  # [B]
  cand = None if candidates is None else model.logits(h, candidates)  # [B, C]
  return target_rank(logits, target), cand, finite


@jax.jit
def score_stage(model, memory, req, target, candidates=None):
  """Stage 3: (target ranks [B], candidate logits [B, C] or None, finite [B]).

  The memory is read in its stored form where the model has a compressed read for it
  (``reads.serving_view``: plain HSTU / SASRec), else through ``materialize()``."""
  return _read(model, model.user_embedding(reads.serving_view(model, memory), req), target,
               candidates)


def candidate_signals(model, cache, request, candidates, window: int) -> Signals:
  """Attention signals from the request's actual candidates (the "oracle vote").

  ``acc_attn`` [L, B, H, T] is the attention the C candidates pay each memory slot, summed
  over candidates; ``window_attn`` [L, B, H, window, T] repeats that sum in every row, so
  SnapKV's vote (a sum over its window's rows) ranks slots by it too. Any attention-based
  eviction fed these signals keeps what the candidates read: it sees the request's
  candidates before compressing, which no deployable method can, so it is an upper
  reference for eviction, not a method.

  Returns:
    :class:`malloc_jax.cache.Signals` over the cache's T slots.
  """
  _, attn = model.rank(cache, request, candidates, return_attn=True)  # [L, B, H, C, T]
  acc = jnp.sum(attn, axis=3)
  win = jnp.broadcast_to(acc[:, :, :, None, :], acc.shape[:3] + (window,) + acc.shape[3:])
  B = acc.shape[1]
  return Signals(acc_attn=acc, window_attn=win, window_valid=jnp.ones((B, window), bool))


@functools.partial(jax.jit, static_argnames=("window",))
def oracle_signals_stage(model, cache, req, candidates, *, window: int) -> Signals:
  """Stage 1b (target-aware ranking with ``oracle``): :func:`candidate_signals` of the cache."""
  return candidate_signals(model, cache, req, candidates, window)


@jax.jit
def rank_stage(model, memory, req, target, candidates):
  """Stage 3, target-aware: (target ranks [B], ``model.rank`` logits [B, C], finite [B]).

  The candidates read ``memory.materialize()`` (the compressed reads have no candidate block
  mask); the next-item rank of the target is read as in :func:`score_stage`, and ``finite``
  covers both the next-item logits and the candidate logits."""
  ranks, _, finite = _read(model, model.user_embedding(reads.serving_view(model, memory), req),
                           target, None)
  logits = model.rank(memory.materialize(), req, candidates)  # [B, C]
  return ranks, logits, finite & jnp.all(jnp.isfinite(logits), axis=1)


@functools.partial(jax.jit, static_argnames=("compressor", "requests", "window"))
def stream_stage(model, prefix, req, target, *, compressor, requests: int, window: int):
  """Stage 4, the streaming protocol with r = ``requests``: (ranks [B], memory, finite [B])."""
  memory, _ = stream_memory(model, prefix, compressor, requests, window)
  ranks, _, finite = _read(model, model.user_embedding(reads.serving_view(model, memory), req),
                           target, None)
  return ranks, memory, finite


@functools.partial(jax.jit, static_argnames=("target_aware",))
def recompute_stage(model, items, ts, length, target, candidates=None, *,
                    target_aware: bool = False):
  """The recompute reference (history + request re-encoded, no memory): as score_stage, or
  with ``target_aware`` as rank_stage (the whole history is the request of ``model.rank``)."""
  events = Events(items, ts, length)
  empty = model.empty_cache(items.shape[0])
  h = model.user_embedding(empty, events)
  if not target_aware:
    return _read(model, h, target, candidates)
  ranks, _, finite = _read(model, h, target, None)
  logits = model.rank(empty, events, candidates)  # [B, C]
  return ranks, logits, finite & jnp.all(jnp.isfinite(logits), axis=1)


def check_finite(finite, real: np.ndarray, start: int, where: str) -> None:
  """The non-finite guard: FloatingPointError naming the first bad user of a batch."""
  bad = np.flatnonzero(~parallel.to_host(finite)[real])
  if bad.size:
    raise FloatingPointError(
        f"{where}: non-finite scores (NaN or inf in the memory or the model) for {bad.size} "
        f"user(s), first user index {start + bad[0]}; refusing to record metrics")


# ------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class Batch:
  """One padded batch of users after stage 1 (device arrays, sharded when a mesh is used)."""

  start: int
  real: np.ndarray  # [B] bool: rows that are real users (the rest pad the last batch)
  events: Events  # the whole histories [B, N] (the recompute reference reads them)
  target: jax.Array  # [B]
  cache: Any = None  # native cache of the prefix (None when not prefilled)
  signals: Any = None
  prefix: Events | None = None
  req: Events | None = None
  prefill_seconds: float = 0.0


def _mesh_and_size(n: int, batch_size: int, num_devices: int):
  if n == 0:
    raise ValueError("serving: the evaluation split has no users")
  mesh = parallel.data_mesh(num_devices)
  return mesh, parallel.padded_batch_size(min(batch_size, n), mesh)


def batches(model, split, *, batch_size: int = 256, max_users: int | None = None,
            query_len: int = 1, window: int = 8, num_devices: int = 0,
            prefill: bool = True) -> Iterable[Batch]:
  """Yields the padded user batches of ``split``, through stage 1 when ``prefill``.

  Args:
    model: a backbone (replicated over the mesh here). split: an EvalSet (items, ts, length,
      target). batch_size: users per batch (rounded up to a multiple of the device count).
    max_users: serve only the first users (None: all). query_len: request events.
    window: signal rows (SnapKV's observation window). num_devices: see parallel.data_mesh.
    prefill: run stage 1 (False for the recompute reference, which keeps no memory).
  """
  n = len(split) if not max_users else min(max_users, len(split))
  mesh, bs = _mesh_and_size(n, batch_size, num_devices)
  model = parallel.replicate(mesh, model)
  for start, idx, real in padded_batches(n, bs):
    items, ts, length, target = parallel.shard_batch(
        mesh, split.items[idx], split.ts[idx], split.length[idx], split.target[idx])
    batch = Batch(start, real, Events(items, ts, length), target)
    if prefill:
      t = time.time()
      out = jax.block_until_ready(prefill_stage(model, items, ts, length, query_len=query_len,
                                                window=window))
      batch.cache, batch.signals, batch.prefix, batch.req = out
      batch.prefill_seconds = time.time() - t
    yield batch


@dataclasses.dataclass
class Served:
  """What :func:`serve` returns: per-user results in user order, and stage timings."""

  ranks: np.ndarray  # [n] rank of the target over all items (1 = first)
  candidate_logits: np.ndarray | None  # [n, C] when candidates were given
  stream_ranks: dict[int, np.ndarray]  # {r: [n]} for each streaming request count
  memory: Any  # the last batch's one-shot memory (None for recompute)
  stream_memory: dict[int, Any]  # {r: the last batch's streamed memory}
  last: Batch | None  # the last batch (its request events feed cost measurements)
  seconds: dict[str, float]  # prefill, compress, score, stream
  user_bytes: np.ndarray  # [2, n] stored and buffer bytes of each user's memory (with the
  #   compressor's per-user state; recompute: the raw events), see compressors.user_bytes
  lengths: np.ndarray  # [n] events each user's memory was built from

  @property
  def num_users(self) -> int:
    return int(self.ranks.shape[0])


def serve(model, user_batches: Iterable[Batch], compressor, *, candidates=None,
          requests: tuple[int, ...] = (), window: int = 8, num_devices: int = 0,
          where: str = "serve", target_aware: bool = False, oracle: bool = False) -> Served:
  """Stages 2-4 (or the recompute reference when ``compressor`` is None) over ``batches``.

  Args:
    model: the backbone. user_batches: from :func:`batches` (a list may be reused by many
      compressors: the prefill is then paid once). compressor: a Compressor, or None for the
      recompute reference. candidates: optional [n, C] item ids per user for ranking metrics.
    requests: r values of the streaming protocol (none: one-shot only).
    window: signal rows, as in prefill. num_devices: as given to :func:`batches`.
    where: names the caller in the non-finite guard's message.
    target_aware: score the candidates with ``model.rank`` (:func:`rank_stage`: each
      candidate a query token reading the memory and the request) instead of the cosine of
      the request's state with their embeddings; needs ``candidates``.
    oracle: compress with :func:`candidate_signals` (the candidates' own attention) instead
      of the prefill signals: the non-deployable upper reference of attention-based eviction.
      Needs ``target_aware`` and a compressor.

  Returns:
    :class:`Served` (``candidate_logits`` from ``model.rank`` when ``target_aware``).

  Raises:
    FloatingPointError: a user's scores are not finite (the user is named).
  """
  if target_aware and candidates is None:
    raise ValueError(f"{where}: target_aware ranking needs candidates [n, C]")
  if oracle and (not target_aware or compressor is None):
    raise ValueError(f"{where}: oracle signals need target_aware=True and a compressor")
  model = parallel.replicate(parallel.data_mesh(num_devices), model)
  ranks, logits = [], []
  stream = {r: [] for r in requests}
  smem: dict[int, Any] = {}
  seconds = dict.fromkeys(("prefill", "compress", "score", "stream"), 0.0)
  memory, last = None, None
  figures, lengths = [], []
  for b in user_batches:
    last = b
    seconds["prefill"] += b.prefill_seconds
    cand = None if candidates is None else jnp.asarray(
        np.asarray(candidates)[np.where(b.real, np.arange(b.start, b.start + len(b.real)), 0)])
    t = time.time()
    if compressor is None:
      r, c, finite = jax.block_until_ready(recompute_stage(
          model, b.events.items, b.events.ts, b.events.length, b.target, cand,
          target_aware=target_aware))
      seconds["score"] += time.time() - t
      stored = comp_lib.events_stored_bytes(b.events.items, b.events.ts, b.events.length)
      figures.append(np.stack([stored, stored]).astype(np.float64)[:, b.real])
      lengths.append(parallel.to_host(b.events.length)[b.real])
    else:
      signals = b.signals
      if oracle:
        signals = oracle_signals_stage(model, b.cache, b.req, cand, window=window)
      memory = jax.block_until_ready(compress_stage(b.cache, signals, compressor=compressor))
      t1 = time.time()
      stage = rank_stage if target_aware else score_stage
      r, c, finite = jax.block_until_ready(stage(model, memory, b.req, b.target, cand))
      t2 = time.time()
      for q in requests:
        s_r, smem[q], ok = jax.block_until_ready(stream_stage(
            model, b.prefix, b.req, b.target, compressor=compressor, requests=q,
            window=window))
        finite = finite & ok
        stream[q].append(parallel.to_host(s_r)[b.real])
      figures.append(comp_lib.user_bytes(memory, compressor)[:, b.real])
      lengths.append(parallel.to_host(memory.index.length)[b.real])
      seconds["compress"] += t1 - t
      seconds["score"] += t2 - t1
      seconds["stream"] += time.time() - t2
    check_finite(finite, b.real, b.start, where)
    ranks.append(parallel.to_host(r)[b.real])
    if c is not None:
      logits.append(parallel.to_host(c)[b.real])
  if last is None:
    raise ValueError(f"{where}: no users to serve")
  return Served(ranks=np.concatenate(ranks),
                candidate_logits=np.concatenate(logits) if logits else None,
                stream_ranks={q: np.concatenate(v) for q, v in stream.items()},
                memory=memory, stream_memory=smem, last=last, seconds=seconds,
                user_bytes=np.concatenate(figures, axis=1), lengths=np.concatenate(lengths))
