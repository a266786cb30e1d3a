r"""The ML-1M Pareto plot: NDCG@10 against bytes per user (log x), one panel per backbone,
error bars from each cell's paired bootstrap interval to native (native + [ci_low, ci_high]).

Reads ``scripts/ml1m_table.py`` output JSONs and draws them with ``report.pareto_plot``.

  PYTHONPATH=$PWD python scripts/ml1m_plot.py hstu_c200_stored.json \
      sasrec_c200_stored.json --out docs/pareto_ml1m_h200.png

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


def table_rows(path: str) -> list[dict]:
  """report-style rows of one table JSON: one panel ('dataset') per backbone."""
  d = json.loads(Path(path).read_text())
  for key in ("rows", "model", "capacity"):
    if key not in d:
      raise ValueError(f"{path}: no field {key!r} (a scripts/ml1m_table.py output?)")
  name = d["model"]["name"]
  out = []
  for r in d["rows"]:
    for key in ("method", "steps", "NDCG@10", "stored_bytes", "ci"):
      if key not in r:
        hint = (" (an older table: run scripts/ml1m_table.py --restate on it)"
                if key == "stored_bytes" else "")
        raise ValueError(f"{path}: row {r.get('method')!r} has no field {key!r}{hint}")
    family = "+".join(m for m, _ in r["steps"]) or "native"
    data = d.get("dataset", "ML-1M").split(":")[0]
    out.append({**r, "bytes_per_user": r["stored_bytes"],
                "dataset": f"{data} {name} (capacity {d['capacity']})", "model": name,
                "family": family})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("tables", nargs="+", help="scripts/ml1m_table.py output JSONs")
  p.add_argument("--out", default="docs/pareto_ml1m_h200.png")
  args = p.parse_args(argv)
  rows = [r for path in args.tables for r in table_rows(path)]
  pareto_plot(rows, args.out, "NDCG@10", errorbars=True)
  print(f"wrote {args.out}: {len(rows)} cells")


if __name__ == "__main__":
  main(sys.argv[1:])
