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

Every path serves users through :mod:`malloc_jax.serving`'s stages (prefill -> compress ->
read, with its non-finite guard and multi-device sharding); this module only builds the
candidates and the metrics. :func:`evaluate_ranking` and :func:`evaluate_ctr` score the
candidates by the request's state (``serving.score_stage``: cosine similarity / temperature);
:func:`rank_cell` ranks them target-aware (``serving.rank_stage``: ``model.rank``).
Metrics (:func:`malloc_jax.metrics.ranking_metrics`): AUC, GAUC (per-user AUC weighted by
impressions, single-class users skipped and counted), logloss of p = sigmoid(logits *
temperature) = sigmoid(cosine), a fixed calibration documented there.
"""

from __future__ import annotations

import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import serving
from malloc_jax.data.dataset import EvalSet
from malloc_jax.metrics import ranking_metrics
from malloc_jax.serving import candidate_signals  # noqa: F401 (public here too)


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


def evaluate_ranking(model, data: EvalSet, compressor: comp_lib.Compressor, *,
                     num_negatives: int = 99, seed: int = 0, batch_size: int = 256,
                     query_len: int = 1, window: int = 8, max_users: int | None = None,
                     candidates: np.ndarray | None = None,
                     num_devices: int = 0) -> dict[str, float]:
  """Ranking metrics of the held-out positive against sampled negatives, per compressor.

  Args:
    model: backbone. data: an evaluation split (held-out ``target`` per user).
    compressor: the memory to serve from. num_negatives, seed: see :func:`sample_candidates`
      (ignored when ``candidates`` [U, C] is given, whose column 0 must be the positive).
    batch_size, query_len, window, max_users, num_devices: as
      :func:`malloc_jax.evaluate.evaluate`.

  Returns:
    :func:`malloc_jax.metrics.ranking_metrics` of the impressions (users x candidates).

  Raises:
    FloatingPointError: a user's scores are not finite (``serving.check_finite``).
  """
  n = len(data) if not max_users else min(max_users, len(data))
  if n == 0:
    raise ValueError("evaluate_ranking: the evaluation split has no users")
  if candidates is None:
    candidates = sample_candidates(data.target[:n], model.num_items, num_negatives, seed)
  logits = _serve(model, data, compressor, candidates[:n], batch_size=batch_size,
                  query_len=query_len, window=window, num_devices=num_devices,
                  where="evaluate_ranking").candidate_logits
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
                 max_rows: int | None = None, num_devices: int = 0) -> dict[str, float]:
  """AUC / GAUC / logloss of a model on FuxiCTR-layout impressions, served from a memory.

  Rows are scored in fixed-size batches (the last one padded and masked). A row whose history
  is empty is scored from an empty memory and an empty request (the model's state at the
  padding item); such rows are counted in ``empty_history``.

  Args:
    model: a backbone trained on the same dense item ids (``samples.item`` in 1..V).
    samples: :class:`malloc_jax.data.parsers.CTRSamples`. compressor: memory to serve from.
    max_len: history window N. batch_size, query_len, window, num_devices: as ``evaluate``.
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
  cand = samples.item[:n, None].astype(np.int32)  # [n, 1]
  # The serving pipeline reads an EvalSet; an impression's "target" is its candidate (the
  # pipeline's next-item rank of it is not used here).
  rows = EvalSet(items[:n], ts[:n], length[:n], cand[:, 0], np.zeros(n, np.int32))
  logits = _serve(model, rows, compressor, cand, batch_size=batch_size, query_len=query_len,
                  window=window, num_devices=num_devices, where="evaluate_ctr").candidate_logits
  res = ranking_metrics(samples.user[:n], samples.label[:n], logits[:, 0], model.temperature)
  res["empty_history"] = int(np.sum(length[:n] == 0))
  return res


# ------------------------------------------------------------------------------------------
# Target-aware ranking (M-FALCON): candidates read the memory through ``model.rank``.


def _serve(model, data: EvalSet, compressor, candidates: np.ndarray, *, batch_size: int,
           query_len: int, window: int, num_devices: int, where: str,
           target_aware: bool = False, oracle: bool = False) -> serving.Served:
  """The first ``len(candidates)`` users of ``data`` through the serving pipeline."""
  n = len(candidates)
  user_batches = serving.batches(model, data, batch_size=batch_size, max_users=n,
                                 query_len=query_len, window=window, num_devices=num_devices)
  return serving.serve(model, user_batches, compressor, candidates=candidates, window=window,
                       num_devices=num_devices, where=where, target_aware=target_aware,
                       oracle=oracle)


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
              oracle: bool = False, num_devices: int = 0) -> dict:
  """One ranking cell: serve each user's memory through ``compressor`` and rank candidates.

  The call a sweep makes for a (method, ratio, task="ranking") cell: the serving pipeline
  (``serving.batches`` -> ``serving.serve(..., target_aware=True)``: prefill, compress,
  ``model.rank`` of the materialized memory, the non-finite guard) over the first U users
  in fixed-size batches (the last padded and masked), then :func:`impression_metrics`.

  Args:
    model: backbone with ``rank``. data: evaluation split; candidates: [U, 1 + K] ids with
      the held-out positive in column 0 (see ``sample_candidates`` or
      ``data.synthetic.ranking_candidates``). compressor: the memory, or None for the
      recompute reference (history + request re-encoded, nothing stored). oracle: compress
      with :func:`candidate_signals` (the candidates' own attention; a non-deployable upper
      reference for attention-based eviction). batch_size, query_len, window, num_devices:
      as :func:`malloc_jax.evaluate.evaluate`.

  Returns:
    {"metrics": summary (AUC, GAUC, logloss, NDCG@10, top1, ...), "per_user": {"auc",
    "ndcg10", "top1", "logloss"} arrays [U], "logits": [U, 1 + K], "bytes_per_user": stored
    bytes of the served memories / U}: ``compressors.bytes_per_user``, the static-capacity
    buffer bytes, equal for every batch (recompute: the mean stored bytes of the raw events).

  Raises:
    FloatingPointError: a user's scores are not finite (the user is named).
  """
  U = len(candidates)
  if U == 0 or U > len(data):
    raise ValueError(f"rank_cell: {U} candidate rows for {len(data)} users")
  served = _serve(model, data, compressor, np.asarray(candidates), batch_size=batch_size,
                  query_len=query_len, window=window, num_devices=num_devices,
                  where="rank_cell", target_aware=True, oracle=oracle)
  if compressor is None:
    nbytes = float(served.user_bytes[0].mean())
  else:
    nbytes = float(comp_lib.bytes_per_user(served.memory))
  logits = served.candidate_logits
  summary, per = impression_metrics(logits)
  return {"metrics": summary, "per_user": per, "logits": logits, "bytes_per_user": nbytes}


def quest_rank_cell(model, data: EvalSet, candidates: np.ndarray, *, page: int, pages: int,
                    with_bias: bool = True, batch_size: int = 64, query_len: int = 1,
                    window: int = 8) -> dict:
  """:func:`rank_cell` for Quest read per query: each user's memory is stored as Quest pages
  (``quest(page)``) and every request event and candidate reads, at every layer, only its
  own ``pages`` pages with the largest score bound (``quest_pages.quest_slot_select``;
  ``with_bias``: the bound of q . k + HSTU's rab, else of q . k alone).

  Returns rank_cell's dict (``bytes_per_user``: the stored bytes, which Quest does not
  shrink) plus ``read_per_candidate`` (mean bytes one candidate reads alone) and
  ``read_union`` (mean bytes one request's batched pass fetches), from
  ``quest_pages.quest_rank_read_bytes``.
  """
  import jax  # noqa: PLC0415 (ranking.py is otherwise NumPy)

  from malloc_jax.compressors.quest_pages import (  # noqa: PLC0415
    quest,
    quest_rank,
    quest_rank_read_bytes,
  )
  U = len(candidates)
  if U == 0 or U > len(data):
    raise ValueError(f"quest_rank_cell: {U} candidate rows for {len(data)} users")
  comp = quest(page)
  has_bias = with_bias and model.has_score_bias

  @jax.jit
  def serve(model, cache, req, cands):
    memory = comp.compress(cache, comp.init(cache))[0]
    return memory, *quest_rank(model, memory, req, cands, pages, with_bias)

  logits, stored, per_cand, union = [], [], [], []
  for b in serving.batches(model, data, batch_size=batch_size, max_users=U,
                           query_len=query_len, window=window):
    rows = np.arange(b.start, b.start + len(b.real))
    cands = np.asarray(candidates)[np.where(b.real, rows, 0)]  # padding rows: user 0's
    memory, lg, chosen = serve(model, b.cache, b.req, cands)
    q_valid = np.concatenate([np.asarray(b.req.valid), np.ones(cands.shape, bool)], axis=1)
    pq, un = quest_rank_read_bytes(memory, chosen, q_valid, with_bias=has_bias)
    m = b.req.items.shape[1]
    logits.append(np.asarray(lg)[b.real])
    stored.append(np.asarray(memory.stored_bytes())[b.real])
    per_cand.append(pq[:, m:].mean(1)[b.real])
    union.append(un[b.real])
  logits = np.concatenate(logits)
  if not np.all(np.isfinite(logits)):
    bad = int(np.flatnonzero(~np.isfinite(logits).all(1))[0])
    raise FloatingPointError(f"quest_rank_cell: user {bad}'s scores are not finite")
  summary, per = impression_metrics(logits)
  return {"metrics": summary, "per_user": per, "logits": logits,
          "bytes_per_user": float(np.concatenate(stored).mean()),
          "read_per_candidate": float(np.concatenate(per_cand).mean()),
          "read_union": float(np.concatenate(union).mean())}


def weighted_pooled_auc(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Pooled AUC of impressions [U, 1 + K] (positive in column 0) under user weights.

  User u's impressions count ``weights[r, u]`` times (a bootstrap resample's multiplicity):
  AUC_r = sum_{u, v} w_u w_v c(pos_u, neg_v) / (sum_u w_u * K sum_v w_v), with c the number
  of v's negatives scored below u's positive plus half the tied ones. With all weights 1 it
  is the pooled AUC of :func:`impression_metrics`. One sort of the negatives, then a
  weighted cumulative sum per resample.

  Args:
    logits: [U, 1 + K] scores. weights: [R, U] non-negative user weights.

  Returns:
    [R] float64 pooled AUCs.
  """
  s = np.asarray(logits, np.float64)
  w = np.asarray(weights, np.float64)
  U, K = s.shape[0], s.shape[1] - 1
  neg = s[:, 1:].reshape(-1)
  order = np.argsort(neg, kind="stable")
  neg_sorted, neg_user = neg[order], (np.arange(U * K) // K)[order]
  lo = np.searchsorted(neg_sorted, s[:, 0], side="left")  # [U] negatives strictly below
  hi = np.searchsorted(neg_sorted, s[:, 0], side="right")
  out = np.empty(len(w))
  chunk = max(1, int(4e6 // max(U * K, 1)))
  for a in range(0, len(w), chunk):
    wc = w[a:a + chunk]  # [r, U]
    cw = np.concatenate([np.zeros((len(wc), 1)), np.cumsum(wc[:, neg_user], axis=1)], axis=1)
    below = cw[:, lo] + 0.5 * (cw[:, hi] - cw[:, lo])  # [r, U] weighted negatives below
    tot = wc.sum(axis=1)
    out[a:a + chunk] = np.sum(wc * below, axis=1) / (tot * K * tot)
  return out


def _bootstrap_weights(U: int, resamples: int, seed: int) -> np.ndarray:
  """[R, U] multiplicity of each user in each of ``stats.bootstrap_indices``' resamples."""
  from malloc_jax import stats
  idx = stats.bootstrap_indices(U, resamples, seed)
  return np.stack([np.bincount(i, minlength=U) for i in idx]).astype(np.float64)


_REFERENCE_AUCS: dict = {}


def _reference_aucs(reference: np.ndarray, resamples: int, seed: int):
  """(pooled AUC on all users, [R] pooled AUC per resample) of the reference scores,
  remembered by content: a table pairs every cell with the same native scores, whose
  resampled AUCs are then computed once (the last 4 references are kept)."""
  import hashlib
  key = (hashlib.sha256(reference.tobytes()).hexdigest(), reference.shape, resamples, seed)
  if key not in _REFERENCE_AUCS:
    U = len(reference)
    out = (float(weighted_pooled_auc(reference, np.ones((1, U)))[0]),
           weighted_pooled_auc(reference, _bootstrap_weights(U, resamples, seed)))
    while len(_REFERENCE_AUCS) >= 4:
      _REFERENCE_AUCS.pop(next(iter(_REFERENCE_AUCS)))
    _REFERENCE_AUCS[key] = out
  return _REFERENCE_AUCS[key]


def paired_auc_bootstrap(logits: np.ndarray, reference: np.ndarray, *, resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict:
  """Paired bootstrap of the pooled AUC difference between two memories on the same users.

  Users are resampled exactly as :func:`malloc_jax.stats.paired_bootstrap` resamples them
  (``stats.bootstrap_indices``: the same draws for every cell at a seed and user count); each
  resample's pooled AUC (:func:`weighted_pooled_auc`) of both score sets gives one paired
  difference; the interval is the percentile interval of those differences.

  Args:
    logits, reference: [U, 1 + K] scores of the same users and candidates.

  Returns:
    {"diff": AUC(logits) - AUC(reference) on all users, "ci_low", "ci_high",
    "contains_zero", "num_users"} (the keys of ``stats.paired_bootstrap``).
  """
  U = len(logits)
  w = _bootstrap_weights(U, resamples, seed)
  ones = np.ones((1, U))
  ref_all, ref_w = _reference_aucs(np.asarray(reference, np.float64), resamples, seed)
  diff = float(weighted_pooled_auc(logits, ones)[0] - ref_all)
  d = weighted_pooled_auc(logits, w) - ref_w
  low, high = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
  return {"diff": diff, "ci_low": float(low), "ci_high": float(high),
          "contains_zero": bool(low <= 0.0 <= high), "num_users": int(U)}
