"""Statistics of a benchmark table: paired bootstrap intervals, length buckets, orderings.

Every cell of a table is scored on the same users as native, so a method's loss is measured
as a *paired* difference: per user, the method's metric minus native's, averaged over users,
with a 95% bootstrap confidence interval from resampling users (1,000 resamples, seeded).
An interval that contains 0 says the data cannot tell the method from native.

  ranks = {"native": r0, "snapkv 32x": r1}              # 0-based target ranks per user
  per_user = {m: per_user_metric(r, "NDCG@10") for m, r in ranks.items()}
  paired_bootstrap(per_user["snapkv 32x"], per_user["native"])
  # -> {"diff": -0.0112, "ci_low": -0.0160, "ci_high": -0.0065, "contains_zero": False, ...}
  length_breakdown(per_user["snapkv 32x"], history_lengths)   # users <=200, 201-512, >512

Plain NumPy, float64, outside jit: these run once on collected per-user results.

References: Efron & Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile
interval, ch. 13); paired resampling of users as in Dror et al., "The Hitchhiker's Guide to
Testing Statistical Significance in NLP", ACL 2018.
"""

from __future__ import annotations

import numpy as np

LENGTH_EDGES = (200, 512)  # buckets: <= 200, 201-512, > 512 history events


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
  """Per-user values of a retrieval metric from 0-based target ranks [U].

  Args:
    ranks: [U] number of items scored strictly higher than each user's target.
    metric: "NDCG@K", "HR@K" or "MRR".

  Returns:
    [U] float64; their mean is ``metrics.retrieval_metrics(ranks)[metric]``.
  """
  r = np.asarray(ranks, np.float64)
  if metric == "MRR":
    return 1.0 / (r + 1.0)
  name, _, k = metric.partition("@")
  if name not in ("NDCG", "HR") or not k.isdigit():
    raise ValueError(f"per_user_metric: metric {metric!r}: expected 'NDCG@K', 'HR@K' or 'MRR'")
  hit = r < int(k)
  if name == "HR":
    return hit.astype(np.float64)
  return np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)


def bootstrap_indices(num_users: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
  """The resampled users: ``default_rng(seed).integers(0, U, (resamples, U))`` [R, U]."""
  if num_users < 1:
    raise ValueError("bootstrap: no users")
  return np.random.default_rng(seed).integers(0, num_users, size=(resamples, num_users))


def paired_bootstrap(values: np.ndarray, reference: np.ndarray, *, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
  """Mean paired difference ``values - reference`` over users with a bootstrap interval.

  Users are resampled with replacement (``bootstrap_indices``: the same draws for every
  method at a given seed and user count, so intervals of different cells are comparable); the
  interval is the percentile interval of the resampled means (``np.percentile``, linear
  interpolation) at ``(1 - level) / 2`` and ``(1 + level) / 2``.

  Args:
    values, reference: [U] per-user metrics of a method and of the reference (native) on the
      same users in the same order.
    resamples: bootstrap resamples R. seed: resampling seed. level: interval coverage.

  Returns:
    {"diff": mean difference, "ci_low", "ci_high", "contains_zero": bool, "num_users": U,
    "rel_diff": diff / mean(reference) (NaN when that mean is 0)}.
  """
  a = np.asarray(values, np.float64)
  b = np.asarray(reference, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_bootstrap: values {a.shape} and reference {b.shape} must be "
                     "1-D per-user arrays of the same users")
  if not 0 < level < 1:
    raise ValueError(f"paired_bootstrap: level={level}: expected 0 < level < 1")
  d = a - b  # [U]
  idx = bootstrap_indices(len(d), resamples, seed)  # [R, U]
  means = d[idx].mean(axis=1)  # [R]
  lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
  ref_mean = b.mean()
  return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
          "contains_zero": bool(lo <= 0.0 <= hi), "num_users": int(len(d)),
          "rel_diff": float(d.mean() / ref_mean) if ref_mean != 0 else float("nan")}


def bucket_labels(edges=LENGTH_EDGES) -> list[str]:
  """``["<=200", "201-512", ">512"]`` for the default edges."""
  out, lo = [], None
  for e in edges:
    out.append(f"<={e}" if lo is None else f"{lo + 1}-{e}")
    lo = e
  return out + [f">{edges[-1]}"]


def length_buckets(lengths: np.ndarray, edges=LENGTH_EDGES) -> np.ndarray:
  """Bucket index [U] of each history length: 0 for <= edges[0], ..., len(edges) above."""
  return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left")


def length_breakdown(values: np.ndarray, lengths: np.ndarray, reference: np.ndarray | None = None,
                     edges=LENGTH_EDGES, **bootstrap) -> dict[str, dict]:
  """A per-user metric averaged within history-length buckets.

  Args:
    values: [U] per-user metric. lengths: [U] each user's full history length (events before
      the target, before any truncation to the memory capacity).
    reference: optional [U] native metric of the same users: adds each bucket's paired
      difference and bootstrap interval (``paired_bootstrap``; ``bootstrap`` are its options).
    edges: bucket upper edges (inclusive).

  Returns:
    {label: {"num_users", "mean", and with ``reference`` the paired_bootstrap fields}}; a bucket
    without users has num_users 0 and mean NaN.
  """
  v = np.asarray(values, np.float64)
  lengths = np.asarray(lengths)
  if v.shape != lengths.shape:
    raise ValueError(f"length_breakdown: values {v.shape} and lengths {lengths.shape} differ")
  b = length_buckets(lengths, edges)
  out = {}
  for i, label in enumerate(bucket_labels(edges)):
    m = b == i
    cell = {"num_users": int(m.sum()), "mean": float(v[m].mean()) if m.any() else float("nan")}
    if reference is not None and m.any():
      cell.update(paired_bootstrap(v[m], np.asarray(reference)[m], **bootstrap))
    out[label] = cell
  return out


def ci_columns(per_user: dict[str, np.ndarray], reference: str = "native",
               lengths: np.ndarray | None = None, **bootstrap) -> dict[str, dict]:
  """The CI columns of a table: every method's paired difference to ``reference``.

  Args:
    per_user: {method label: [U] per-user metric}, all on the same users.
    reference: the label differences are taken against.
    lengths: optional [U] full history lengths: adds ``"by_length"`` (``length_breakdown``).

  Returns:
    {label: paired_bootstrap fields (+ "by_length")}.
  """
  if reference not in per_user:
    raise ValueError(f"ci_columns: reference {reference!r} is not among {sorted(per_user)}")
  ref = per_user[reference]
  out = {}
  for label, v in per_user.items():
    cell = paired_bootstrap(v, ref, **bootstrap)
    if lengths is not None:
      cell["by_length"] = length_breakdown(v, lengths, ref, **bootstrap)
    out[label] = cell
  return out


def order_at_budgets(rows: list[dict], per_user: dict[str, np.ndarray], budgets,
                     metric: str = "NDCG@10", **bootstrap) -> list[dict]:
  """Methods that fit each byte budget, most accurate first, with significance marks.

  At each budget B the rows with ``bytes_per_user <= B`` are sorted by ``metric``; each is
  compared with the best of them by a paired bootstrap on the same users: ``"*"`` marks a
  row significantly below the best (interval excludes 0), ``"="`` one the data cannot tell
  from it (the best itself is ``"best"``).

  Args:
    rows: {"method", "bytes_per_user", metric} per cell. per_user: {method: [U] metric}.
    budgets: byte budgets per user.

  Returns:
    [{"budget": B, "order": [{"method", metric, "bytes_per_user", "diff_to_best", "ci_low",
    "ci_high", "mark"}]}] in the order of ``budgets``.
  """
  out = []
  for budget in budgets:
    fit = sorted((r for r in rows if r["bytes_per_user"] <= budget * (1 + 1e-9)),
                 key=lambda r: -r[metric])
    order = []
    for j, r in enumerate(fit):
      entry = {"method": r["method"], metric: r[metric], "bytes_per_user": r["bytes_per_user"]}
      if j == 0:
        entry.update(diff_to_best=0.0, ci_low=0.0, ci_high=0.0, mark="best")
      else:
        c = paired_bootstrap(per_user[r["method"]], per_user[fit[0]["method"]], **bootstrap)
        entry.update(diff_to_best=c["diff"], ci_low=c["ci_low"], ci_high=c["ci_high"],
                     mark="=" if c["contains_zero"] else "*")
      order.append(entry)
    out.append({"budget": float(budget), "order": order})
  return out


def seed_spread(values) -> dict:
  """Mean, sample standard deviation and range of a metric over training seeds."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "seeds": int(len(v))}


def markdown_ci(rows: list[dict], cis: dict[str, dict], metric: str = "NDCG@10") -> str:
  """A Markdown table: method, metric, bytes, ratio, paired diff to native [95% CI], and the
  mean metric per length bucket (when ``cis`` carry ``by_length``)."""
  labels = None
  for c in cis.values():
    if "by_length" in c:
      labels = list(c["by_length"])
      break
  head = f"| method | {metric} | bytes/user | ratio | diff to native [95% CI] | 0 in CI |"
  sep = "|---|---|---|---|---|---|"
  if labels:
    head += "".join(f" {lab} ({cis[next(iter(cis))]['by_length'][lab]['num_users']} users) |"
                    for lab in labels)
    sep += "---|" * len(labels)
  lines = [head, sep]
  for r in rows:
    c = cis.get(r["method"])
    if c is None:
      continue
    line = (f"| {r['method']} | {r[metric]:.4f} | {r['bytes_per_user']:,.0f} | "
            f"{r.get('compression_ratio', float('nan')):.1f}x | {c['diff']:+.4f} "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {'yes' if c['contains_zero'] else 'NO'} |")
    if labels:
      for lab in labels:
        b = c["by_length"][lab]
        d = b.get("diff")
        line += (f" {b['mean']:.4f}" + (f" ({d:+.4f}{'' if b['contains_zero'] else '*'})"
                                        if d is not None else "") + " |")
    lines.append(line)
  return "\n".join(lines)
