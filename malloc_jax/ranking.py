"""The ranking (CTR-style) task: candidates scored against each user's memory.

Two sources of impressions:

* **Sampled candidates** (any leave-one-out split): each user's held-out next event is the
  positive and ``num_negatives`` items drawn uniformly from the other items are negatives;
  ``candidates [U, 1 + K]`` has the positive in column 0. GAUC is then the mean per-user AUC
  (every user has both classes), AUC pools all impressions.
* **CTR logs** in the FuxiCTR / BARS layout (AmazonElectronics_x1, MicroVideo1.7M_x1,
  KuaiVideo_x1; parsed by :func:`malloc_jax.data.parsers.parse_fuxictr_csv`): each row is an
  impression (user, candidate item, click label) with the user's behaviour sequence before it.
  The sequence minus its last ``query_len`` events is prefilled into the memory and
  compressed; the last events are the request; the candidate is scored against the memory.

Scores are the model's logits ``model.score(cache, request, candidates=ids [B, C])`` (cosine
similarity / temperature). Metrics (:func:`malloc_jax.metrics.ranking_metrics`): AUC, GAUC
(per-user AUC weighted by impressions, single-class users skipped and counted), logloss of
p = sigmoid(logits * temperature) = sigmoid(cosine), a fixed calibration documented there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax.data.dataset import EvalSet
from malloc_jax.evaluate import padded_batches, split_request
from malloc_jax.metrics import ranking_metrics


def sample_candidates(target: np.ndarray, num_items: int, num_negatives: int,
                      seed: int = 0) -> np.ndarray:
  """The positive and ``num_negatives`` uniform negatives of each user.

  Negatives are drawn with replacement, uniformly from the items 1..V other than the user's
  target (draw from V - 1 values and skip the target), from ``np.random.default_rng(seed)``.

  Args:
    target: [U] held-out item ids in 1..V. num_items: V (>= 2). num_negatives: K (>= 1).
    seed: integer seed.

  Returns:
    candidates [U, 1 + K] int32 with the target in column 0.
  """
  target = np.asarray(target, np.int64)
  if num_items < 2:
    raise ValueError(f"sample_candidates: num_items={num_items} must be >= 2")
  if num_negatives < 1:
    raise ValueError(f"sample_candidates: num_negatives={num_negatives} must be >= 1")
  if target.size and (target.min() < 1 or target.max() > num_items):
    raise ValueError(f"sample_candidates: targets must lie in 1..{num_items}")
  rng = np.random.default_rng(seed)
  neg = rng.integers(1, num_items, size=(len(target), num_negatives))  # 1..V-1
  neg = neg + (neg >= target[:, None])  # skip the target: uniform over the others
  return np.concatenate([target[:, None], neg], axis=1).astype(np.int32)


def candidate_labels(candidates: np.ndarray) -> np.ndarray:
  """Labels [U, C] of :func:`sample_candidates`' output: 1 in column 0, 0 elsewhere."""
  labels = np.zeros(np.shape(candidates), np.int8)
  labels[:, 0] = 1
  return labels


@functools.partial(jax.jit, static_argnames=("compressor", "query_len", "window"))
def serve_candidates(model, items, ts, length, candidates, *, compressor, query_len=1,
                     window=8):
  """Prefill, compress and score candidates for one batch.

  Args:
    model: backbone. items, ts: [B, N] histories (right-padded); length: [B].
    candidates: [B, C] item ids. compressor: static Compressor.

  Returns:
    (logits [B, C], memory).
  """
  prefix, req = split_request(items, ts, length, query_len)
  cache, signals = model.prefill(prefix, window)
  memory, _ = compressor.compress(cache, compressor.init(cache), signals)
  return model.score(memory.materialize(), req, candidates), memory


def evaluate_ranking(model, data: EvalSet, compressor: comp_lib.Compressor, *,
                     num_negatives: int = 99, seed: int = 0, batch_size: int = 256,
                     query_len: int = 1, window: int = 8, max_users: int | None = None,
                     candidates: np.ndarray | None = None) -> dict[str, float]:
  """Ranking metrics of the held-out positive against sampled negatives, per compressor.

  Args:
    model: backbone. data: an evaluation split (held-out ``target`` per user).
    compressor: the memory to serve from. num_negatives, seed: see :func:`sample_candidates`
      (ignored when ``candidates`` [U, C] is given, whose column 0 must be the positive).
    batch_size, query_len, window, max_users: as :func:`malloc_jax.evaluate.evaluate`.

  Returns:
    :func:`malloc_jax.metrics.ranking_metrics` of the impressions (users x candidates).
  """
  n = len(data) if not max_users else min(max_users, len(data))
  if n == 0:
    raise ValueError("evaluate_ranking: the evaluation split has no users")
  if candidates is None:
    candidates = sample_candidates(data.target[:n], model.num_items, num_negatives, seed)
  bs = min(batch_size, n)
  out = []
  for _start, idx, real in padded_batches(n, bs):
    logits, _ = serve_candidates(model, jnp.asarray(data.items[idx]), jnp.asarray(data.ts[idx]),
                                 jnp.asarray(data.length[idx]), jnp.asarray(candidates[idx]),
                                 compressor=compressor, query_len=query_len, window=window)
    out.append(np.asarray(logits)[real])
  logits = np.concatenate(out)
  labels = candidate_labels(logits)
  users = np.broadcast_to(np.arange(n)[:, None], labels.shape)
  return ranking_metrics(users, labels, logits, model.temperature)


def ctr_arrays(samples, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded history arrays of CTR impressions, keeping each row's last ``max_len`` events.

  Args:
    samples: a :class:`malloc_jax.data.parsers.CTRSamples` (dense item ids 1..V).
    max_len: N.

  Returns:
    (items [R, N] int32, ts [R, N] int32 (each event's index within its row's kept history:
    CTR logs carry no per-event times), length [R] int32).
  """
  off = samples.hist_offsets
  lengths = np.minimum(np.diff(off), max_len).astype(np.int32)
  R = len(lengths)
  items = np.zeros((R, max_len), np.int32)
  col = np.arange(max_len)[None, :]
  valid = col < lengths[:, None]
  src = (off[1:] - lengths)[:, None] + col  # the last `length` events of each row
  items[valid] = samples.hist_items[src[valid]]
  ts = np.where(valid, col, 0).astype(np.int32)
  return items, ts, lengths


def evaluate_ctr(model, samples, compressor: comp_lib.Compressor, *, max_len: int,
                 batch_size: int = 256, query_len: int = 1, window: int = 8,
                 max_rows: int | None = None) -> dict[str, float]:
  """AUC / GAUC / logloss of a model on FuxiCTR-layout impressions, served from a memory.

  Rows are scored in fixed-size batches (the last one padded and masked). A row whose history
  is empty is scored from an empty memory and an empty request (the model's state at the
  padding item); such rows are counted in ``empty_history``.

  Args:
    model: a backbone trained on the same dense item ids (``samples.item`` in 1..V).
    samples: :class:`malloc_jax.data.parsers.CTRSamples`. compressor: memory to serve from.
    max_len: history window N. batch_size, query_len, window: as ``evaluate``.
    max_rows: evaluate only the first rows.

  Returns:
    :func:`malloc_jax.metrics.ranking_metrics` plus ``empty_history``.
  """
  items, ts, length = ctr_arrays(samples, max_len)
  n = len(length) if not max_rows else min(max_rows, len(length))
  if n == 0:
    raise ValueError(f"evaluate_ctr: {samples.source} has no impressions")
  if samples.item.max(initial=0) > model.num_items:
    raise ValueError(f"evaluate_ctr: {samples.source} has item ids up to {samples.item.max()}"
                     f" but the model knows {model.num_items} items")
  cand = samples.item[:, None].astype(np.int32)
  bs = min(batch_size, n)
  out = []
  for _start, idx, real in padded_batches(n, bs):
    logits, _ = serve_candidates(model, jnp.asarray(items[idx]), jnp.asarray(ts[idx]),
                                 jnp.asarray(length[idx]), jnp.asarray(cand[idx]),
                                 compressor=compressor, query_len=query_len, window=window)
    out.append(np.asarray(logits)[real, 0])
  res = ranking_metrics(samples.user[:n], samples.label[:n], np.concatenate(out),
                        model.temperature)
  res["empty_history"] = int(np.sum(length[:n] == 0))
  return res
