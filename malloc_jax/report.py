r"""Reports of a sweep: CSV, Markdown by granularity, a Pareto plot, budgets and projections.

  python -m malloc_jax.report --workdir runs/sweep_ml100k
  python -m malloc_jax.report --workdir runs/sweep_ml100k --budget_bytes 40000 --metric HR@10

Reads ``workdir/results.jsonl`` (a torn last line of a sweep that is still running or was
killed is ignored) and writes to ``--out`` (default: the workdir):

* ``results.csv``: one row per (dataset, model, method), metrics averaged over seeds (with a
  ``<metric>_std`` column when there are several seeds);
* ``results.md``: per dataset, a Markdown table grouped by granularity (none / token /
  precision / low rank / head / sequence / architecture, then chains);
* ``pareto.png``: the metric against bytes per user (log x), one marker per method family,
  the Pareto frontier drawn (matplotlib, a core dependency, imported only here); where the
  rows carry a latency (``latency_p50_ms``), a second row of panels plots it against bytes.

It prints the best configuration under ``--budget_bytes`` per dataset, where the sweep's time
went (training and each cell stage, also at the end of ``results.md``) and a projection line:
the bytes a memory bank needs for 10^9 users, per method. The recompute reference stores no
memory (only the raw events), so it is listed but kept out of the frontier and the budget
answer.

Cells of ``task="ranking"`` (``sweep.run_ranking_cell``) get their own tables in
``results.md`` (:func:`ranking_markdown`: AUC, GAUC, logloss, candidate NDCG@10, each
paired difference to native with its SE and bootstrap CI, stored / buffer bytes) and the
figure ``pareto_tasks.png`` (:func:`task_pareto_plot`: one panel per dataset and task, GAUC
for ranking); the retrieval tables, plot and answers read the retrieval cells only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from malloc_jax.compressors.spec import GRANULARITIES
from malloc_jax.costs import projection
from malloc_jax.sweep import RESULTS, load_results, stage_summary

GRANULARITY_ORDER = (*GRANULARITIES, "chain", "other")  # the MethodSpec granularities
KEY = ("dataset", "task", "model", "method")  # task: absent (retrieval) in older rows
LEAD = ("dataset", "task", "model", "method", "family", "granularity", "params", "seeds")
MARKERS = "osD^v<>pP*Xhd8H"


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def aggregate(rows: list[dict]) -> list[dict]:
  """One row per (dataset, model, method): numbers averaged over seeds, ``<k>_std`` added.

  Non-numeric fields are taken from the first seed's row; ``seeds`` counts the rows merged.
  Rows keep the order in which their key first appears.
  """
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in rows:
    groups[tuple(r.get(k) for k in KEY)].append(r)
  out = []
  for members in groups.values():
    row = dict(members[0])
    row["seeds"] = len(members)
    for k in members[0]:
      vals = [m.get(k) for m in members]
      if len(members) > 1 and all(_num(x) for x in vals) and k != "seed":
        arr = np.asarray(vals, np.float64)
        if len(set(vals)) > 1:  # identical values (user counts, bytes) keep their type
          row[k] = float(np.mean(arr))
        row[f"{k}_std"] = float(np.std(arr, ddof=1))
    out.append(row)
  return out


def add_retrieval_ci(rows: list[dict], metric: str = "NDCG@10", *, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> list[dict]:
  """Adds the paired difference to native with its bootstrap interval to retrieval rows.

  A retrieval row carrying ``ranks`` (the sweep's per-user 0-based target ranks) is paired
  with the native row of the same dataset, model and seed (same users, same order); over
  seeds, the per-user differences of every seed are pooled and resampled together
  (``stats.paired_bootstrap``). Each row of a (dataset, model, method) group gets the same
  ``ci`` ({"diff", "ci_low", "ci_high", "contains_zero", "num_users", "rel_diff"}) and
  ``d<metric>``; rows without ranks (older results, ranking cells, recompute without a
  native partner) are left as they are. Returns the rows (changed in place).
  """
  from malloc_jax import stats

  retrieval = [r for r in rows if r.get("task", "retrieval") == "retrieval" and "ranks" in r]
  native = {(r["dataset"], r["model"], r.get("seed")): r for r in retrieval
            if r.get("method") == "native"}
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in retrieval:
    groups[(r["dataset"], r["model"], r["method"])].append(r)
  for (dataset, model, _), members in groups.items():
    pairs = []
    for r in members:
      ref = native.get((dataset, model, r.get("seed")))
      if ref is None or len(ref["ranks"]) != len(r["ranks"]):
        pairs = []
        break
      pairs.append((stats.per_user_metric(np.asarray(r["ranks"]), metric),
                    stats.per_user_metric(np.asarray(ref["ranks"]), metric)))
    if not pairs:
      continue
    ci = stats.paired_bootstrap(np.concatenate([a for a, _ in pairs]),
                                np.concatenate([b for _, b in pairs]), resamples=resamples,
                                seed=seed, level=level)
    for r in members:
      r["ci"], r[f"d{metric}"] = ci, ci["diff"]
  return rows


def _ci_text(r: dict) -> str:
  """'+0.0012 [-0.0030, +0.0051] tie' (or 'NO' when the interval excludes 0); '-' if none."""
  ci = r.get("ci")
  if not ci or r.get("task", "retrieval") != "retrieval":
    return "-"
  if r.get("method") == "native":
    return "ref"
  return (f"{ci['diff']:+.4f} [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}] "
          + ("tie" if ci["contains_zero"] else "**differs**"))


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
  """Writes rows to CSV: the key columns first, then every other field (sorted)."""
  fields = list(LEAD) + sorted({k for r in rows for k in r} - set(LEAD))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                  for k, v in r.items()})


def _fmt(x, spec: str = ".4f") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return format(x, spec)


def _params(p) -> str:
  if not p:
    return ""
  if len(p) == 1:
    p = next(iter(p.values()))
  return "`" + json.dumps(p, sort_keys=True).replace('"', "").replace("|", "/") + "`"


def stream_keys(rows: list[dict], metric: str) -> list[str]:
  """The streaming columns present, e.g. ["stream4/NDCG@10", "stream16/NDCG@10"]."""
  keys = {k for r in rows for k in r if k.startswith("stream") and k.endswith(f"/{metric}")}
  return sorted(keys, key=lambda k: int(k[len("stream"):].split("/")[0]))


def markdown(rows: list[dict], metric: str = "NDCG@10") -> str:
  """Markdown tables, one per dataset, rows grouped by granularity."""
  lines = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    rs = [r for r in rows if r["dataset"] == dataset]
    skeys = stream_keys(rs, metric)
    lines.append(f"## {dataset}\n")
    if rs[0].get("dataset_name"):
      lines.append(f"{rs[0]['dataset_name']}; split {rs[0].get('split', '?')}, "
                   f"{rs[0].get('num_users', '?')} users.\n")
    head = (["granularity", "model", "method", "params", metric,
             f"Δ{metric} vs native [95% CI]", "HR@10"]
            + [f"r={k[len('stream'):].split('/')[0]} {metric}" for k in skeys]
            + ["AUC", "GAUC", "logloss", "stored B/user", "buffer B/user", "ratio", "10^9 users", "FLOPs/req",
               "XLA/closed", "p50 ms", "p99 ms", "users/s", "seeds"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    order = {g: i for i, g in enumerate(GRANULARITY_ORDER)}
    rs = sorted(rs, key=lambda r: (order.get(r.get("granularity"), len(order)),
                                   r["model"], _bytes(r) or 0))
    for r in rs:
      std = r.get(f"{metric}_std")
      cells = [r.get("granularity", "?"), r["model"], r["method"], _params(r.get("params")),
               _fmt(r.get(metric)) + (f" ± {std:.4f}" if std is not None else ""),
               _ci_text(r), _fmt(r.get("HR@10"))]
      cells += [_fmt(r.get(k)) for k in skeys]
      b = _bytes(r)
      cells += [_fmt(r.get("AUC")), _fmt(r.get("GAUC")), _fmt(r.get("logloss")),
                _fmt(b, ",.0f"), _fmt(r.get("buffer_bytes"), ",.0f"),
                _fmt(r.get("compression_ratio"), ".2f") + ("x" if r.get("compression_ratio")
                                                          else ""),
                projection(b) if b and r.get("stores_memory", True) else "-",
                _fmt(r.get("flops_per_request"), ".3g"),
                _fmt(r.get("flops_xla_over_closed_form"), ".3f"),
                _fmt(r.get("latency_p50_ms"), ".2f"), _fmt(r.get("latency_p99_ms"), ".2f"),
                _fmt(r.get("users_per_s"), ",.0f"), str(r.get("seeds", 1))]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def _bytes(r: dict):
  """A row's bytes per user for ratios, plots and budgets: ``stored_bytes`` (what the user's
  memory needs in a variable-length store). Rows written before that field existed carry
  only the static buffer figure ``bytes_per_user``, which is used for them."""
  return r.get("stored_bytes", r.get("bytes_per_user"))


def pareto_front(bytes_: np.ndarray, metric: np.ndarray) -> np.ndarray:
  """Indices of the non-dominated points (fewer bytes and a higher metric), by bytes.

  A point is dominated if another has at most its bytes and at least its metric, one of the
  two strictly.
  """
  order = np.lexsort((-metric, bytes_))  # by bytes, then best metric first
  front, best = [], -np.inf
  for i in order:
    if metric[i] > best:
      front.append(i)
      best = metric[i]
  return np.asarray(front, np.int64)


def _candidates(rows: list[dict], metric: str) -> list[dict]:
  return [r for r in rows if r.get("stores_memory", True) and _num(_bytes(r))
          and _num(r.get(metric)) and not math.isnan(r[metric])]


def _yerr(r: dict) -> tuple[float, float] | None:
  """(below, above) error bar of a row with a paired interval to native ``ci`` (``diff``,
  ``ci_low``, ``ci_high`` of the row's metric minus native's): native + [low, high]."""
  ci = r.get("ci")
  if not ci:
    return None
  return ci["diff"] - ci["ci_low"], ci["ci_high"] - ci["diff"]


def _latency(r: dict) -> float | None:
  """A row's serving latency (``latency_p50_ms`` of its request batch), or None."""
  x = r.get("latency_p50_ms")
  return float(x) if _num(x) and math.isfinite(x) and x > 0 else None


def _draw_point(ax, x: float, y: float, err, colour, marker, size: int = 42) -> None:
  """One row's marker, with its error bar ``err`` = (below, above) when given."""
  ax.scatter(x, y, marker=marker, color=colour, s=size, alpha=0.85)
  if err is not None:
    ax.errorbar(x, y, yerr=[[err[0]], [err[1]]], fmt="none", ecolor=colour, elinewidth=1,
                capsize=2, alpha=0.6)


def _draw_frontier(ax, x: np.ndarray, y: np.ndarray, rs: list[dict], front) -> None:
  """The frontier points ``front`` (indices into x, y, rs) as a step line, each one named."""
  ax.step(x[front], y[front], where="post", color="k", lw=1.2, alpha=0.7)
  for i in front:
    ax.annotate(f"{rs[i]['model']}/{rs[i]['method']}", (x[i], y[i]), fontsize=7,
                xytext=(3, 3), textcoords="offset points")


def _legend_and_save(fig, path, families, marker, models, colour) -> None:
  """The figure legend (a marker per family, a colour per model, the frontier), saved."""
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  handles = [Line2D([], [], ls="", marker=marker[f], color="0.35", label=f) for f in families]
  handles += [Line2D([], [], ls="", marker="s", color=colour[m], label=m) for m in models]
  handles.append(Line2D([], [], color="k", lw=1.2, label="Pareto frontier"))
  fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _latency_panel(ax, rs: list[dict], dataset: str, style) -> None:
  """Latency per request batch against stored bytes per user (both log), with the frontier
  of the rows that no other row beats on both (fewer bytes and a lower latency)."""
  if not rs:
    return
  x = np.array([_bytes(r) for r in rs], np.float64)
  y = np.array([_latency(r) for r in rs], np.float64)
  for i, r in enumerate(rs):
    ax.scatter(x[i], y[i], s=42, alpha=0.85, **style(r))
  _draw_frontier(ax, x, y, rs, pareto_front(x, -y))
  batch = {r.get("cost_batch") for r in rs}
  per = f" of {batch.pop()} users" if len(batch) == 1 and None not in batch else ""
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("bytes per user (stored)")
  ax.set_ylabel(f"latency per request batch{per}, p50 ms")
  ax.set_title(f"{dataset}: serving latency")
  ax.grid(True, which="both", alpha=0.3)


def pareto_plot(rows: list[dict], path: str | os.PathLike, metric: str = "NDCG@10",
                errorbars: bool = False) -> None:
  """Writes the metric against bytes per user (log x), one panel per dataset.

  One marker per method family (a trained variant's native memory counts as the family of its
  model name), one colour per backbone, and the Pareto frontier of each panel as a step line.
  With ``errorbars``, a row carrying ``ci`` (``stats.ci_columns``: the paired interval of
  ``metric`` minus native's) gets a vertical bar from native + ci_low to native + ci_high,
  native's level is a dotted line, and points within 10% of each other's bytes are drawn
  dodged apart by 5% steps in x, in family order, so that their bars do not overlap (the
  frontier is computed on the true bytes).

  Where rows carry a latency (``latency_p50_ms``: the sweep times each cell's request batch
  through its compressed read, ``reads.read_costs``), a second row of panels plots it against
  the same bytes per user (log-log, lower is better, with its own frontier); rows without
  one are left out of that panel, and with none at all the plot has the metric panels only.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  family = lambda r: (r["family"] if r["family"] not in ("native", "recompute")
                      or r["model"] in ("hstu", "sasrec") else r["model"])
  cands = _candidates(rows, metric)
  timed = [r for r in cands if _latency(r) is not None]
  nrows = 2 if timed else 1  # the latency panels, where the rows carry a latency
  fig, axes = plt.subplots(nrows, len(datasets),
                           figsize=(5.5 * len(datasets) + 2.2, 4.6 * nrows), squeeze=False)
  families = list(dict.fromkeys(family(r) for r in cands))
  models = list(dict.fromkeys(r["model"] for r in cands))
  marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
  colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
  for ax, dataset in zip(axes[0], datasets):
    rs = [r for r in cands if r["dataset"] == dataset]
    if not rs:
      continue
    x = np.array([_bytes(r) for r in rs], np.float64)
    y = np.array([r[metric] for r in rs], np.float64)
    xs = x  # drawn positions; with error bars, families at one byte size are dodged apart
    if errorbars:
      fam = np.array([families.index(family(r)) for r in rs])
      offset = np.zeros(len(rs))
      for i in range(len(rs)):  # rank among the points within 10% of its bytes, centred
        peers = np.flatnonzero(np.abs(np.log(x / x[i])) < 0.1)
        peers = peers[np.lexsort((peers, fam[peers]))]
        offset[i] = np.flatnonzero(peers == i)[0] - (len(peers) - 1) / 2
      xs = x * 1.05 ** offset
      for r in rs:
        if r["family"] == "native" and r["model"] in ("hstu", "sasrec"):
          ax.axhline(r[metric], color=colour[r["model"]], ls=":", lw=1, alpha=0.7)
    for i, r in enumerate(rs):
      _draw_point(ax, xs[i], y[i], _yerr(r) if errorbars else None, colour[r["model"]],
                  marker[family(r)])
    _draw_frontier(ax, xs, y, rs, pareto_front(x, y))
    ax.set_xscale("log")
    ax.set_xlabel("bytes per user (stored)")
    ax.set_ylabel(metric)
    ax.set_title(dataset)
    ax.grid(True, which="both", alpha=0.3)
  if timed:
    for ax, dataset in zip(axes[1], datasets):
      _latency_panel(ax, [r for r in timed if r["dataset"] == dataset], dataset,
                     lambda r: dict(marker=marker[family(r)], color=colour[r["model"]]))
  _legend_and_save(fig, path, families, marker, models, colour)


def best_under(rows: list[dict], budget_bytes: float, metric: str = "NDCG@10") -> dict:
  """{dataset: the row with the best metric among memories of <= budget_bytes per user}."""
  out = {}
  for r in _candidates(rows, metric):
    if _bytes(r) <= budget_bytes:
      cur = out.get(r["dataset"])
      if cur is None or r[metric] > cur[metric]:
        out[r["dataset"]] = r
  return out


def projection_lines(rows: list[dict], users: float = 1e9) -> list[str]:
  """Per dataset: the bytes of each method's memory bank for ``users`` users."""
  lines = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    rs = [r for r in rows if r["dataset"] == dataset and r.get("stores_memory", True)
          and _num(_bytes(r))]
    rs.sort(key=lambda r: -_bytes(r))
    parts = [f"{r['model']}/{r['method']} {projection(_bytes(r), users)}" for r in rs]
    lines.append(f"projection {dataset}, 10^{round(math.log10(users))} users: "
                 + ", ".join(parts))
  return lines


# ------------------------------------------------------------------------------------------
# Ranking cells (task="ranking").

TASK_METRIC = {"ranking": "GAUC"}  # a task's plot metric (retrieval: the report's metric)


def _task(r: dict) -> str:
  return r.get("task") or "retrieval"


def _paired(r: dict, col: str) -> str:
  """``+d (SE s) [lo, hi]`` of a ranking row's paired difference to native in ``col``."""
  d = r.get(f"d{col}")
  if not _num(d):
    return "-"
  return (f"{d:+.4f} ({_fmt(r.get(f'd{col}_se'))}) [{_fmt(r.get(f'd{col}_ci_low'), '+.4f')}, "
          f"{_fmt(r.get(f'd{col}_ci_high'), '+.4f')}]")


def ranking_markdown(rows: list[dict]) -> str:
  """Markdown tables of the ranking cells, one per dataset, grouped by granularity.

  Columns: AUC, GAUC, its paired difference to native on the same users ``+d (SE) [95%
  CI]``, logloss, candidate NDCG@10 with its paired difference, stored and buffer bytes per
  user, the compression ratio (stored bytes against native HSTU / SASRec of the same users).
  """
  rows = [r for r in rows if _task(r) == "ranking"]
  lines = []
  order = {g: i for i, g in enumerate(GRANULARITY_ORDER)}
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    rs = sorted((r for r in rows if r["dataset"] == dataset),
                key=lambda r: (order.get(r.get("granularity"), len(order)), r["model"],
                               _bytes(r) or 0))
    lines.append(f"## {dataset}: ranking (candidates read the memory)\n")
    lines.append(f"{rs[0].get('num_users', '?')} users, {rs[0].get('ranking_candidates', '?')}"
                 " candidates each (positive first); differences are the cell minus native "
                 "over the same users: mean (SE) [95% paired bootstrap CI].\n")
    head = ["granularity", "model", "method", "params", "AUC", "GAUC", "ΔGAUC vs native",
            "logloss", "NDCG@10 (cand.)", "ΔNDCG@10 (cand.)", "stored B/user",
            "buffer B/user", "ratio", "seeds"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rs:
      ratio = r.get("compression_ratio")
      lines.append("| " + " | ".join([
          r.get("granularity", "?"), r["model"], r["method"], _params(r.get("params")),
          _fmt(r.get("AUC")), _fmt(r.get("GAUC")), _paired(r, "GAUC"), _fmt(r.get("logloss")),
          _fmt(r.get("cand_NDCG@10")), _paired(r, "cand_NDCG@10"),
          _fmt(_bytes(r), ",.0f"), _fmt(r.get("buffer_bytes"), ",.0f"),
          _fmt(ratio, ".2f") + ("x" if ratio else ""), str(r.get("seeds", 1))]) + " |")
    lines.append("")
  return "\n".join(lines)


def task_pareto_plot(rows: list[dict], path: str | os.PathLike, metric: str = "NDCG@10") -> None:
  """Writes one Pareto panel per (dataset, task): the task's metric against stored bytes.

  Retrieval panels plot ``metric``, ranking panels GAUC (``TASK_METRIC``) with each cell's
  paired 95% interval to native as an error bar (native + CI); one marker per method family,
  one colour per backbone, the frontier as a step line (``pareto_front``).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    for task in dict.fromkeys(_task(r) for r in rows if r["dataset"] == dataset):
      m = TASK_METRIC.get(task, metric)
      rs = [r for r in _candidates(rows, m) if r["dataset"] == dataset and _task(r) == task]
      if rs:
        panels.append((dataset, task, m, rs))
  if not panels:
    raise ValueError("task_pareto_plot: no rows with bytes and a metric to plot")
  fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels) + 2.2, 4.4),
                           squeeze=False)
  every = [r for *_, rs in panels for r in rs]
  families = list(dict.fromkeys(r["family"] for r in every))
  models = list(dict.fromkeys(r["model"] for r in every))
  marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
  colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
  for ax, (dataset, task, m, rs) in zip(axes[0], panels):
    x = np.array([_bytes(r) for r in rs], np.float64)
    y = np.array([r[m] for r in rs], np.float64)
    for i, r in enumerate(rs):
      _draw_point(ax, x[i], y[i], _yerr(r) if task == "ranking" else None,
                  colour[r["model"]], marker[r["family"]], size=40)
    _draw_frontier(ax, x, y, rs, pareto_front(x, y))
    ax.set_xscale("log")
    ax.set_xlabel("bytes per user (stored)")
    ax.set_ylabel(m if task != "ranking" else f"{m} (candidates read the memory)")
    ax.set_title(f"{dataset}: {task}")
    ax.grid(True, which="both", alpha=0.3)
  _legend_and_save(fig, path, families, marker, models, colour)


def write_report(workdir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 budget_bytes: float | None = None, metric: str = "NDCG@10",
                 plot: bool = True, print_fn=print) -> dict[str, Path]:
  """Writes results.csv, results.md and pareto.png for a sweep's results; prints answers.

  Returns:
    {"csv", "markdown", "plot" and "task_plot" (when written)}: the paths written.
  """
  workdir = Path(workdir)
  out = Path(out) if out else workdir
  out.mkdir(parents=True, exist_ok=True)
  rows = load_results(workdir / RESULTS, repair=False)
  if not rows:
    raise ValueError(f"{workdir / RESULTS}: no results (run the sweep first)")
  stages = stage_summary(rows)
  add_retrieval_ci(rows, metric)  # paired CI to native from each cell's per-user ranks
  rows = aggregate([{k: v for k, v in r.items() if k != "ranks"} for r in rows])
  paths = {"csv": out / "results.csv", "markdown": out / "results.md"}
  write_csv(rows, paths["csv"])
  ranked = [r for r in rows if _task(r) == "ranking"]  # their own tables and plot panels
  all_rows, rows = rows, [r for r in rows if _task(r) != "ranking"]
  tables = (markdown(rows, metric) if rows else "") + (ranking_markdown(ranked) if ranked else "")
  paths["markdown"].write_text(tables + f"\n{stages}\n")
  if plot and rows:
    paths["plot"] = out / "pareto.png"
    pareto_plot(rows, paths["plot"], metric, errorbars=any("ci" in r for r in rows))
  if plot and ranked:
    paths["task_plot"] = out / "pareto_tasks.png"
    task_pareto_plot(all_rows, paths["task_plot"], metric)
  print_fn(f"{len(all_rows)} rows -> " + ", ".join(str(p) for p in paths.values()))
  if budget_bytes is not None:
    best = best_under(rows, budget_bytes, metric)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
      r = best.get(dataset)
      if r is None:
        print_fn(f"best under {budget_bytes:,.0f} bytes/user on {dataset}: none fits")
      else:
        print_fn(f"best under {budget_bytes:,.0f} bytes/user on {dataset}: {r['model']}/"
                 f"{r['method']} {metric} {r[metric]:.4f} at {_bytes(r):,.0f} "
                 f"bytes/user {_params(r.get('params'))}")
  for line in projection_lines(rows):
    print_fn(line)
  print_fn(stages)
  return paths


def main(argv):
  from absl import flags

  from malloc_jax import logging_setup

  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  write_report(f.workdir, f.out, budget_bytes=f.budget_bytes, metric=f.metric,
               plot=not f.no_plot)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "Sweep directory holding results.jsonl.")
  flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
  flags.DEFINE_float("budget_bytes", None, "Answer: the best method under this many bytes "
                     "per user.")
  flags.DEFINE_string("metric", "NDCG@10", "Accuracy metric of the tables and the plot.")
  flags.DEFINE_bool("no_plot", False, "Skip pareto.png (no matplotlib needed).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
