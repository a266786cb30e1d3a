r"""Per-user byte budgets on ML-1M (issue 20): the allocator against the uniform ratio.

Reads result JSONs written by ``scripts/ml1m_table.py`` (per-user target ranks of every
cell, each test user's history length) and, per backbone, for the H2O family:

1. stored bytes per user of every option (native and each ``h2o`` cell) from the real
   compressor: a cache of the JSON's model shape holding n = 1 .. capacity events is
   compressed and ``compressors.stored_bytes(memory, state)`` read (the accumulated-attention
   state counted); checked against the closed forms ``min(n, b) * L * (2 D s + 4 + 4 + 4) + 4``
   (H2O: k, v, position, time stamp, accumulated attention per kept event and layer, plus
   the int32 length) and ``n * (L * 2 D s + 4) + 4`` (native, a dense index);
2. the test users split in two halves by a seeded permutation; the per-length accuracy curve
   (mean NDCG@10 per history-length bucket and option, ``allocator.accuracy_curve``) fitted
   on one half; on the other half, for a total budget equal to a uniform ratio's bytes (the
   sum of those users' own stored bytes at that ratio), ``allocator.allocate`` picks each
   user's option to maximise the expected NDCG@10 from the curve;
3. the realised mean NDCG@10 of the allocation against the uniform run on the same users,
   with the paired 95% t interval (``allocator.paired_ci``), and the bytes used; then the
   halves are swapped.

  PYTHONPATH=$PWD python scripts/allocate_table.py /tmp/gpu2/hstu_c200.json \
      /tmp/gpu3/sasrec_c200.json --out runs/allocate_ml1m.json

Two option sets: the H2O cells alone, and the H2O cells plus native. Budgets (``--budgets``,
default 8,16,32): each ratio's uniform H2O total; a ratio without an ``h2o <r>x`` cell in the
JSON (16x in the H200 run) cannot be a uniform baseline and is reported as missing.
``allocate`` falls back to the LP greedy when the exact DP table is too large (here always:
~3,000 users x ~10^7 four-byte budget cells); ``expected_ndcg`` <= optimum <= ``bound_ndcg``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax import compressors as C
from malloc_jax.allocator import accuracy_curve, allocate, ndcg_per_user, paired_ci
from malloc_jax.cache import Cache, Signals

EDGES = (0, 51, 101, 201, 10**9)  # buckets <= 50, 51-100, 101-200, > 200 events
BUCKETS = ("<=50", "51-100", "101-200", ">200")
ID_BYTES = 4  # int32 position, time stamp, length; float32 accumulated attention


def _ratio(label: str) -> int:
  """Nominal ratio of a cell label: 'native' -> 1, 'h2o 32x' -> 32."""
  if label == "native":
    return 1
  m = re.fullmatch(r"h2o (\d+)x", label)
  if not m:
    raise ValueError(f"cell {label!r}: expected 'native' or 'h2o <ratio>x'")
  return int(m.group(1))


def _cache(lengths, layers: int, heads: int, dim: int, capacity: int, seed: int = 0):
  """A contiguous float32 cache (user b holds events 0 .. n_b - 1) and random signals."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  B = len(lengths)
  slot = np.arange(capacity)[None]
  pos = np.where(slot < lengths[:, None], slot, -1)  # [B, T]
  pos = np.broadcast_to(pos[None, :, None, :], (layers, B, heads, capacity))  # [L, B, H, T]
  valid = pos >= 0
  shape = (layers, B, heads, capacity, dim)
  cache = Cache(k=jnp.asarray(rng.normal(size=shape), jnp.float32),
                v=jnp.asarray(rng.normal(size=shape), jnp.float32),
                pos=jnp.asarray(pos, jnp.int32),
                ts=jnp.asarray(np.where(valid, pos, 0), jnp.int32),
                length=jnp.asarray(lengths, jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(np.where(valid, rng.random(valid.shape), 0.0), jnp.float32),
                window_attn=jnp.asarray(np.where(valid[:, :, :, None],
                                                 rng.random((layers, B, heads, 1, capacity)), 0.0),
                                        jnp.float32),
                window_valid=jnp.ones((B, 1), bool))
  return cache, sig


def closed_form(n: np.ndarray, budget: int | None, layers: int, heads: int, dim: int,
                itemsize: int = 4) -> np.ndarray:
  """[N] stored bytes: native (budget None) or H2O keeping ``budget`` events, n events each."""
  rows = layers * heads
  kv = 2 * dim * itemsize
  if budget is None:  # dense index: one time stamp per event, the length
    return rows * n * kv + n * ID_BYTES + ID_BYTES
  m = np.minimum(n, budget)  # sparse index: position + time stamp per row, + acc state
  return rows * m * (kv + 3 * ID_BYTES) + ID_BYTES


def bytes_by_length(steps, model: dict, capacity: int) -> np.ndarray:
  """[capacity + 1] stored bytes of a user holding n = 0 .. capacity events, from the real
  compressor, asserted equal to :func:`closed_form`.

  Raises:
    AssertionError: the library's count differs from the closed form (names n).
  """
  layers, heads, dim = model["num_layers"], model["heads"], model["dim"]
  if steps:
    [(name, params)] = steps
    if name != "h2o":
      raise ValueError(f"steps {steps}: only native or a single h2o step")
    comp, budget = C.h2o(**params), params["heavy"] + params["recent"]
  else:
    comp, budget = C.native(), None
  n = np.arange(1, capacity + 1)
  cache, sig = _cache(n, layers, heads, dim, capacity)
  memory, state = jax.jit(lambda c, s: comp.compress(c, comp.init(c), s))(cache, sig)
  got = np.asarray(C.stored_bytes(memory, state), np.int64)
  want = closed_form(n, budget, layers, heads, dim)
  bad = np.flatnonzero(got != want)
  assert not bad.size, (f"steps {steps}: stored_bytes {got[bad[0]]} != closed form "
                        f"{want[bad[0]]} at n={n[bad[0]]}")
  return np.concatenate([[ID_BYTES], got])


def evaluate(lengths, ndcg: dict, cost: dict, fit, test, uniform: int) -> dict:
  """The allocation on ``test`` users with the curve fitted on ``fit`` users.

  Args:
    lengths: [N] history lengths (bucketed by ``EDGES``).
    ndcg: {ratio: [N] per-user NDCG@10} of the options.
    cost: {ratio: [N] stored bytes per user} of the same options.
    fit, test: index arrays of the two halves.
    uniform: the ratio whose total bytes on ``test`` is the budget (and the baseline).

  Returns:
    dict of the row: uniform and allocated mean NDCG@10, the paired difference and its 95%
    interval, bytes used and budget, the options' shares, the curve.
  """
  lengths = np.asarray(lengths)
  curve = accuracy_curve(lengths[fit], {r: ndcg[r][fit] for r in ndcg}, EDGES)
  ratios = [int(r) for r in curve.ratios]
  value = curve.expected(lengths[test])  # [M, R]
  cst = np.stack([cost[r][test] for r in ratios], axis=1)  # [M, R]
  budget = float(cost[uniform][test].sum())
  plan = allocate(value, cst, budget)
  realised = np.stack([ndcg[r][test] for r in ratios], axis=1)[np.arange(len(test)), plan.choice]
  base = ndcg[uniform][test]
  diff, lo, hi = paired_ci(realised, base)
  used = float(cst[np.arange(len(test)), plan.choice].sum())
  assert used <= budget, (used, budget)
  return {"uniform": uniform, "users": int(len(test)), "uniform_ndcg": float(base.mean()),
          "alloc_ndcg": float(realised.mean()), "diff": diff, "ci_low": lo, "ci_high": hi,
          "expected_ndcg": plan.value / len(test), "bound_ndcg": plan.bound / len(test),
          "bytes_used": used, "budget": budget,
          "share": {f"{r}x": float(np.mean(plan.choice == j)) for j, r in enumerate(ratios)},
          "curve": {"ratios": ratios, "buckets": list(BUCKETS),
                    "ndcg": curve.metric.tolist(), "users": curve.counts.tolist()}}


def run(path: str, seed: int, budgets=(8, 16, 32)) -> dict:
  """Every (option set, budget, direction) row of one backbone's table JSON."""
  d = json.loads(Path(path).read_text())
  for key in ("rows", "ranks", "lengths", "capacity", "model"):
    if key not in d:
      raise ValueError(f"{path}: no field {key!r} (a scripts/ml1m_table.py output?)")
  lengths = np.asarray(d["lengths"])
  cells = {r["method"]: r for r in d["rows"]
           if r["method"] == "native" or re.fullmatch(r"h2o \d+x", r["method"])}
  if "native" not in cells or len(cells) < 3:
    raise ValueError(f"{path}: needs native and >= 2 'h2o <r>x' cells, has {sorted(cells)}")
  ndcg, cost = {}, {}
  n = np.minimum(lengths, d["capacity"])
  for label, row in cells.items():
    ranks = np.asarray(d["ranks"][label])
    if ranks.shape != lengths.shape:
      raise ValueError(f"{path}: ranks[{label!r}] has {ranks.shape}, lengths {lengths.shape}")
    per_user = ndcg_per_user(ranks, 10)  # 0-based ranks
    if not np.isclose(per_user.mean(), row["NDCG@10"]):
      raise ValueError(f"{path}: {label} ranks give NDCG@10 {per_user.mean()}, row says "
                       f"{row['NDCG@10']}")
    r = _ratio(label)
    ndcg[r] = per_user
    cost[r] = bytes_by_length(row["steps"], d["model"], d["capacity"])[n]
  perm = np.random.default_rng(seed).permutation(len(lengths))
  halves = {"A": np.sort(perm[:len(perm) // 2]), "B": np.sort(perm[len(perm) // 2:])}
  h2o = sorted(r for r in ndcg if r > 1)
  out = []
  for options in (h2o, [1, *h2o]):
    for uniform in [b for b in budgets if b in h2o]:
      for fit, test in (("A", "B"), ("B", "A")):
        res = evaluate(lengths, {r: ndcg[r] for r in options}, {r: cost[r] for r in options},
                       halves[fit], halves[test], uniform)
        out.append({"model": d["model"]["name"], "options": [f"{r}x" for r in options],
                    "fit": fit, "test": test, **res})
  full = {f"{r}x": float(cost[r].mean()) for r in sorted(cost)}
  return {"path": path, "model": d["model"]["name"], "seed": seed, "rows": out,
          "mean_stored_bytes": full, "missing_uniform": [
              f"{r}x" for r in budgets if r not in h2o]}


def markdown(results: list[dict]) -> str:
  lines = ["| backbone | options | budget | fit → eval | uniform NDCG@10 | allocated | "
           "diff [95% CI] | bytes used / budget | shares |",
           "|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    for r in res["rows"]:
      share = ", ".join(f"{k} {v:.0%}" for k, v in r["share"].items() if v)
      lines.append(
          f"| {r['model']} | {'+'.join(r['options'])} | uniform {r['uniform']}x | "
          f"{r['fit']} → {r['test']} | {r['uniform_ndcg']:.4f} | {r['alloc_ndcg']:.4f} | "
          f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
          f"{r['bytes_used'] / r['budget']:.3f} | {share} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("tables", nargs="+", help="scripts/ml1m_table.py output JSONs")
  p.add_argument("--seed", type=int, default=0, help="seed of the half split")
  p.add_argument("--budgets", default="8,16,32",
                 help="uniform ratios whose total bytes are the budgets (one needs its cell)")
  p.add_argument("--out", help="JSON output (optional)")
  args = p.parse_args(argv)
  budgets = tuple(int(b) for b in args.budgets.split(","))
  results = [run(path, args.seed, budgets) for path in args.tables]
  for res in results:
    print(f"{res['model']}: mean stored bytes per test user {res['mean_stored_bytes']}; "
          f"no cell for uniform {', '.join(res['missing_uniform']) or '-'}")
    for r in res["rows"]:
      if r["options"][0] == "1x" and r["fit"] == "A":
        c = r["curve"]
        print(f"  curve fit on {r['fit']} (rows {c['buckets']} x cols {c['ratios']}x, users "
              f"{c['users']}):\n    " + "\n    ".join(
                  " ".join(f"{x:.4f}" for x in row) for row in c["ndcg"]))
        break
  print(markdown(results))
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
