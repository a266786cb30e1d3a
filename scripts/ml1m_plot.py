r"""The ML-1M Pareto plot: NDCG@10 against bytes per user (log x), one panel per backbone,
error bars from each cell's paired bootstrap interval to native (native + [ci_low, ci_high]).

Reads ``scripts/ml1m_table.py`` output JSONs and draws them with ``report.pareto_plot``.

  PYTHONPATH=$PWD python scripts/ml1m_plot.py hstu_c200_stored.json \
      sasrec_c200_stored.json --out docs/pareto_ml1m_h200.png
  # ranking tables (ml1m_table.py with task=ranking): GAUC with its paired interval
  PYTHONPATH=$PWD python scripts/ml1m_plot.py ml1m_rank.json ml100k_rank.json \
      --out docs/pareto_ranking_real.png

Bytes per user are the rows' ``stored_bytes`` (issue 14): the mean over the served users of
what each user's memory and carried state (H2O's accumulated attention) need. A table written
before ``stored_bytes`` existed (rows with ``bytes_per_user`` only) is refused: restate it
first with ``scripts/ml1m_table.py --restate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from malloc_jax.report import pareto_plot


def table_task(d: dict) -> tuple[str, str]:
  """(task, metric plotted) of one table JSON: retrieval NDCG@10, ranking GAUC."""
  task = d.get("task", "retrieval")
  return task, ("GAUC" if task == "ranking" else "NDCG@10")


def table_rows(path: str) -> list[dict]:
  """report-style rows of one table JSON: one panel ('dataset') per backbone and task.

  Retrieval rows plot NDCG@10 with its paired interval (``ci``); ranking rows (``task``
  "ranking", ``ml1m_table.py``'s ranking mode) plot GAUC with ``ci["GAUC"]``. A ranking
  table's oracle-vote rows (not deployable: they would sit on the frontier) and its
  history-blind row (no memory, so no bytes) are left out; the tables list them.
  """
  d = json.loads(Path(path).read_text())
  for key in ("rows", "model", "capacity"):
    if key not in d:
      raise ValueError(f"{path}: no field {key!r} (a scripts/ml1m_table.py output?)")
  name = d["model"]["name"]
  task, metric = table_task(d)
  out = []
  for r in d["rows"]:
    if task == "ranking" and (r.get("oracle") or (
        "stored_bytes" not in r and r.get("method", "").startswith("history-blind"))):
      continue
    for key in ("method", "steps", metric, "stored_bytes", "ci"):
      if key not in r:
        hint = (" (an older table: run scripts/ml1m_table.py --restate on it)"
                if key == "stored_bytes" else "")
        raise ValueError(f"{path}: row {r.get('method')!r} has no field {key!r}{hint}")
    ci = r["ci"]
    if task == "ranking":
      if metric not in ci:
        raise ValueError(f"{path}: row {r['method']!r} has no {metric} interval in 'ci'")
      ci = ci[metric]
    family = "+".join(m for m, _ in r["steps"]) or "native"
    parts = d.get("dataset", "ML-1M").split(":")
    data = Path(parts[1].strip()).stem if parts[0] == "sasrec" and len(parts) > 1 else parts[0]
    label = f"{data} {name} (capacity {d['capacity']})" + (", ranking" if task == "ranking" else "")
    out.append({**r, "ci": ci, "bytes_per_user": r["stored_bytes"], "dataset": label,
                "model": name, "family": family})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("tables", nargs="+", help="scripts/ml1m_table.py output JSONs")
  p.add_argument("--out", default="docs/pareto_ml1m_h200.png")
  args = p.parse_args(argv)
  tasks = {table_task(json.loads(Path(path).read_text()))[1] for path in args.tables}
  if len(tasks) > 1:
    raise SystemExit("ml1m_plot: retrieval (NDCG@10) and ranking (GAUC) tables need separate "
                     "plots: pass one task's tables per call")
  rows = [r for path in args.tables for r in table_rows(path)]
  pareto_plot(rows, args.out, tasks.pop(), errorbars=True)
  print(f"wrote {args.out}: {len(rows)} cells")


if __name__ == "__main__":
  main(sys.argv[1:])
