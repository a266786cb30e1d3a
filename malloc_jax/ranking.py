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
from malloc_jax.cache import Signals
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


# ------------------------------------------------------------------------------------------
# Target-aware ranking (M-FALCON): candidates read the memory through ``model.rank``.


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


@functools.partial(jax.jit, static_argnames=("compressor", "query_len", "window", "oracle"))
def serve_rank(model, items, ts, length, candidates, *, compressor, query_len=1, window=8,
               oracle=False):
  """Prefill, compress and rank candidates target-aware (``model.rank``) for one batch.

  Args:
    model: backbone. items, ts: [B, N] histories (right-padded); length: [B].
    candidates: [B, C] item ids. compressor: static Compressor. query_len: request events.
    window: W of the prefill signals. oracle: feed the compressor :func:`candidate_signals`
      instead of the history's own attention (a non-deployable reference).

  Returns:
    (logits [B, C], memory).
  """
  prefix, req = split_request(items, ts, length, query_len)
  cache, signals = model.prefill(prefix, window)
  if oracle:
    signals = candidate_signals(model, cache, req, candidates, window)
  memory, _ = compressor.compress(cache, compressor.init(cache), signals)
  return model.rank(memory.materialize(), req, candidates), memory


def per_user_candidate_metrics(scores: np.ndarray) -> dict[str, np.ndarray]:
  """Per-user AUC and candidate NDCG@10 of impressions whose positive is column 0.

  The positive's rank r counts the negatives scored above it plus half the tied ones; AUC is
  1 - r / K (K negatives); NDCG@10 = 1 / log2(r + 2) when r < 10, else 0 (one relevant item);
  top-1 is 1 when the positive scores strictly above every negative (r = 0).

  Args:
    scores: [U, 1 + K] float scores.

  Returns:
    {"auc": [U], "ndcg10": [U], "top1": [U]} float64.
  """
  s = np.asarray(scores, np.float64)
  pos, neg = s[:, :1], s[:, 1:]
  r = np.sum(neg > pos, axis=1) + 0.5 * np.sum(neg == pos, axis=1)
  ndcg = np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)
  return {"auc": 1.0 - r / neg.shape[1], "ndcg10": ndcg, "top1": (r == 0).astype(np.float64)}


def impression_metrics(logits: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Summary and per-user metrics of logits [U, 1 + K] (positive in column 0).

  Summary: :func:`malloc_jax.metrics.ranking_metrics` (AUC pooled over impressions, GAUC,
  logloss of sigmoid(logits)) plus "NDCG@10" (mean candidate NDCG@10). Per user: "auc",
  "ndcg10" and "logloss" (mean binary cross-entropy of that user's impressions), the inputs
  of paired standard errors between two memories served to the same users.
  """
  logits = np.asarray(logits, np.float64)
  U, C = logits.shape
  labels = np.zeros((U, C), np.int8)
  labels[:, 0] = 1
  users = np.broadcast_to(np.arange(U)[:, None], (U, C))
  summary = ranking_metrics(users, labels, logits, 1.0)
  per = per_user_candidate_metrics(logits)
  bce = np.logaddexp(0.0, logits) - labels * logits  # -log sigmoid(+-logit)
  per["logloss"] = bce.mean(axis=1)
  summary["NDCG@10"] = float(per["ndcg10"].mean())
  summary["top1"] = float(per["top1"].mean())
  return summary, per


def paired_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(mean of a - b, its standard error) over paired per-user values (ddof = 1)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.size < 2:
    return float(d.mean()) if d.size else float("nan"), float("nan")
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def rank_cell(model, data: EvalSet, candidates: np.ndarray, compressor: comp_lib.Compressor, *,
              batch_size: int = 64, query_len: int = 1, window: int = 8,
              oracle: bool = False) -> dict:
  """One ranking cell: serve each user's memory through ``compressor`` and rank candidates.

  The call a sweep makes for a (method, ratio, task="ranking") cell. Users are served in
  fixed-size batches (the last padded and masked).

  Args:
    model: backbone with ``rank``. data: evaluation split; candidates: [U, 1 + K] ids with
      the held-out positive in column 0 (see ``sample_candidates`` or
      ``data.synthetic.ranking_candidates``). compressor: the memory. oracle: see
      :func:`serve_rank`.

  Returns:
    {"metrics": summary (AUC, GAUC, logloss, NDCG@10, top1, ...), "per_user": {"auc",
    "ndcg10", "top1", "logloss"} arrays [U], "logits": [U, 1 + K], "bytes_per_user": stored
    bytes of the served memories / U}.
  """
  U = len(candidates)
  if U == 0 or U > len(data):
    raise ValueError(f"rank_cell: {U} candidate rows for {len(data)} users")
  bs = min(batch_size, U)
  out, nbytes = [], 0.0
  for _start, idx, real in padded_batches(U, bs):
    logits, memory = serve_rank(model, jnp.asarray(data.items[idx]), jnp.asarray(data.ts[idx]),
                                jnp.asarray(data.length[idx]), jnp.asarray(candidates[idx]),
                                compressor=compressor, query_len=query_len, window=window,
                                oracle=oracle)
    out.append(np.asarray(logits)[real])
    nbytes += float(comp_lib.bytes_per_user(memory)) * int(real.sum())
  logits = np.concatenate(out)
  summary, per = impression_metrics(logits)
  return {"metrics": summary, "per_user": per, "logits": logits, "bytes_per_user": nbytes / U}
