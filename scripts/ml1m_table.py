r"""The ML-1M table: every post-hoc method at 2x..128x with paired bootstrap CIs to native
and a per-history-length breakdown (issue 17).

Trains the backbone to early stopping (or reuses the checkpoint in --workdir; the validation
curve is kept in workdir/curve.json), prefills every test user's native memory once, then
serves the test targets from each compressed memory over all items. Each cell reports
NDCG@10 / HR@10, bytes per user (``stored_bytes``: the mean over the served users of
``compressors.stored_bytes`` of their memory and compressor state, e.g. H2O's accumulated
attention; ``buffer_bytes``: the static buffer; ``reference_stored_bytes``: the native
memory's stored bytes of the same users), the achieved ratio (``compression_ratio`` =
reference_stored_bytes / stored_bytes, the benchmark's rule), the paired difference to native over the
same users with a 95% bootstrap interval (1,000 resamples of users, seeded) and the same per
history-length bucket (<= 200, 201-512, > 512 events before the target, counted on the full
history, not the kept window). Then the methods are ordered at each ratio's byte budget with
significance marks (``stats.order_at_budgets``; budgets and fits in stored bytes: the native
stored bytes of the served users / ratio).

  python scripts/ml1m_table.py --config configs/ml1m.py --workdir runs/ml1m_hstu_c200 \
      --out runs/ml1m_hstu_c200/table.json
  python scripts/ml1m_table.py --config configs/ml1m.py:model=sasrec --workdir runs/ml1m_sasrec_c200
  python scripts/ml1m_table.py --config configs/ml1m.py:runlocal=True --workdir /tmp/ml1m_tiny \
      --ratios 2,4 --chains snapkv+kivi2            # the CPU smoke test of the device script

**Ranking** (a config with ``task="ranking"``, e.g. ``configs/ml1m.py:task=ranking,init=<a
retrieval workdir>`` or ``configs/ml100k_ranking.py``): the same cells (same planning, same
stored-byte ratios) serve target-aware ranking instead (:func:`ranking_table`): each test
user's 20 candidates (the target, 9 items of its primary genre, 10 of other genres) read the
compressed memory through ``model.rank``; rows have AUC, GAUC, logloss and candidate NDCG@10,
each with its paired 95% bootstrap interval against native and GAUC per length bucket, plus
ORACLE H2O rows (votes from the request's own candidates: NOT deployable) and a
history-blind row; the methods are ordered at each budget by GAUC. Training early-stops on
validation GAUC.

  python scripts/ml1m_table.py --config configs/ml1m.py:task=ranking,init=runs/ml1m_hstu_c200,epochs=8,patience=3 \
      --workdir runs/ml1m_rank --methods h2o,snapkv,streaming,tova --ratios 2,4,8,16,32,64

``--restate old.json`` regenerates an earlier table's byte columns without its model: the
stored bytes of every memory here are a closed form of the user's history length and the
model's static shapes (``tests/test_stored_bytes.py``), never of the cached values, so a
freshly initialised model of the same config, prefilled on the same users, gives each cell's
exact figures. The ranks, metrics and CIs of the old run are kept; compression ratios, the
order at byte budgets (now on stored bytes) and the markdown table are recomputed:

  python scripts/ml1m_table.py --config configs/ml1m.py --workdir /tmp/restate \
      --restate docs/results/ml1m_hstu_c200_h200.json.gz --out hstu_c200_stored.json

(``docs/results/`` keeps the H200 tables of BENCHMARKS.md, gzipped; ``--restate`` reads
``.json`` or ``.json.gz``.)

Per-user ranks of every cell are saved in the output JSON (``ranks``: {cell: [U] int}, in
the order of the served test users), so any other paired comparison can be made later without
serving again. Ranks are 0-based: the number of items scored strictly higher than the target
(``metrics.target_rank``; ties favour the target), so rank 0 is a hit at 1.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from malloc_jax import compressors as C
from malloc_jax import ratio_axis, stats
from malloc_jax.checkpoint import write_json_atomic
from malloc_jax.compressors.budget import cache_spec
from malloc_jax.compressors.registry import make_compressor
from malloc_jax.config_validation import validate_config
from malloc_jax.evaluate import calibration_caches, check_eval_set, padded_batches, split_request
from malloc_jax.experiment import check_workdir, load_data, train_model
from malloc_jax.metrics import popularity_ranks, retrieval_metrics, target_rank

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/ml1m.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (reused).")
_OUT = flags.DEFINE_string("out", None, "JSON output (default workdir/table.json).")
_METHODS = flags.DEFINE_list(
    "methods", "lowrank,h2o,snapkv,streaming,random,merge_evicted",
    "Methods put on the ratio axis alone.")
_NATURAL = flags.DEFINE_list("natural", "kivi4,kivi2,uniform8,uniform4,intactkv4,intactkv2",
                             "Quantizers at their natural sizes (name + bits).")
_CHAINS = flags.DEFINE_list(
    "chains", "snapkv+kivi4,snapkv+kivi2,h2o+kivi2,snapkv+uniform8,snapkv+uniform4",
    "Eviction + quantizer chains put on the ratio axis (ratio_axis.chain_for_ratio).")
_RATIOS = flags.DEFINE_list("ratios", "2,4,8,16,32,64,128", "Memory reductions.")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples of users.")
_FIXED = flags.DEFINE_multi_string(
    "fixed", [],
    "A cell at fixed parameters, 'method:key=value;key=value' (e.g. 'think:channels=25', "
    "'minicache:retain=0.25', 'duoattention:retrieval=0.5;sinks=1;recent=3'): methods with "
    "no tuned parameter or at their natural size. Repeatable.")
_TRAIN_ONLY = flags.DEFINE_bool("train_only", False,
                                 "Train and serve native only (seed spread); no other cells.")
_RESTATE = flags.DEFINE_string(
    "restate", None,
    "An earlier table JSON: recompute its byte columns (stored, buffer, reference stored) "
    "from each row's recorded compressor steps, keep its ranks, write --out. No training.")


@functools.partial(jax.jit, static_argnames=("window",))
def _prefill(model, items, ts, length, *, window):
  prefix, req = split_request(items, ts, length, 1)
  cache, signals = model.prefill(prefix, window)
  return cache, signals, req


@functools.partial(jax.jit, static_argnames=("compressor",))
def _compress_score(model, cache, signals, req, target, *, compressor):
  memory, state = compressor.compress(cache, compressor.init(cache), signals)
  logits = model.score(memory.materialize(), req)
  return (target_rank(logits, target), memory, state,
          jnp.all(jnp.isfinite(logits[:, 1:]), axis=1))


@functools.partial(jax.jit, static_argnames=("compressor",))
def _compress_rank(model, cache, signals, req, candidates, *, compressor):
  """Target-aware ranking of candidates [B, C] from the compressed memory (M-FALCON):
  ``model.rank`` of the materialized memory, as ``serving.rank_stage`` ranks them."""
  memory, state = compressor.compress(cache, compressor.init(cache), signals)
  logits = model.rank(memory.materialize(), req, candidates)  # [B, C]
  return logits, memory, state, jnp.all(jnp.isfinite(logits), axis=1)


# Methods with a SnapKV observation window: held at 8 events, so that the ratio axis tunes the
# kept budget (left free, the planner shrinks the window to the budget and the cell keeps
# only the newest events: a recency baseline, not attention-based selection).
WINDOWED = ("snapkv", "pyramidkv", "adakv")


def parse_fixed(text: str) -> tuple[str, str, dict]:
  """'think:channels=25;x=0.5' -> ('think channels=25 x=0.5', 'think', {...}); numbers typed."""
  from malloc_jax.compressors.registry import get_spec
  name, _, rest = text.partition(":")
  get_spec(name.strip())  # an unknown method is refused by name
  params = {}
  for part in filter(None, rest.split(";")):
    key, eq, value = part.partition("=")
    if not eq:
      raise ValueError(f"--fixed {text!r}: expected key=value, got {part!r}")
    for kind in (int, float):
      try:
        params[key.strip()] = kind(value)
        break
      except ValueError:
        continue
    else:
      params[key.strip()] = value.strip()
  label = " ".join([name.strip()] + [f"{k}={v}" for k, v in params.items()])
  return label, name.strip(), params


def _quant(label: str) -> tuple[str, dict]:
  """"kivi2" -> ("kivi", {"bits": 2, ...}); KIVI groups are one per 25 channels / events."""
  name = label.rstrip("0123456789")
  return name, {"bits": int(label[len(name):])}


class Served:
  """Test users' native caches, prefilled once; ``serve(comp)`` serves every cell."""

  def __init__(self, model, split, batch_size, window, max_users):
    n = len(split) if not max_users else min(max_users, len(split))
    check_eval_set(split, model.num_items)
    self.model, self.n, self.batches, self.index = model, n, [], []
    self.window = window
    for _, idx, real in padded_batches(n, min(batch_size, n)):
      cache, signals, req = _prefill(model, jnp.asarray(split.items[idx]),
                                     jnp.asarray(split.ts[idx]),
                                     jnp.asarray(split.length[idx]), window=window)
      self.batches.append((cache, signals, req, jnp.asarray(split.target[idx]), real))
      self.index.append(idx)  # [batch] user of each row (padding rows repeat a user)

  def rank(self, comp, candidates: np.ndarray, *, oracle: bool = False
           ) -> tuple[np.ndarray, dict[str, float]]:
    """(candidate logits [U, C], byte figures) of ``comp``'s memories, ranked target-aware.

    ``candidates`` [U, C] item ids per served user. ``oracle``: compress with the attention
    of the request's own candidates (``serving.oracle_signals_stage``; not deployable).
    Byte figures as :meth:`serve`.
    """
    from malloc_jax import serving
    out, figures = [], []
    for b, ((cache, signals, req, _, real), idx) in enumerate(zip(self.batches, self.index,
                                                                  strict=True)):
      cand = jnp.asarray(candidates[idx])
      if oracle:
        signals = serving.oracle_signals_stage(self.model, cache, req, cand, window=self.window)
      logits, memory, state, finite = _compress_rank(self.model, cache, signals, req, cand,
                                                     compressor=comp)
      _check_finite(finite, real, b, "candidate logits")
      out.append(np.asarray(logits)[real])
      figures.append(_user_bytes(cache, memory, state, real))
    return np.concatenate(out), C.cell_bytes_row(np.concatenate(figures, axis=1))

  def serve(self, comp) -> tuple[np.ndarray, dict[str, float]]:
    """(0-based ranks [U], byte figures) of ``comp`` over the served users.

    The figures are :func:`compressors.cell_bytes_row` of every served user: the means of
    ``stored_bytes`` (memory plus the compressor's returned state), ``buffer_bytes`` and
    ``reference_stored_bytes`` (the native memory of the same users).
    """
    out, figures = [], []
    for b, (cache, signals, req, target, real) in enumerate(self.batches):
      r, memory, state, finite = _compress_score(self.model, cache, signals, req, target,
                                                 compressor=comp)
      _check_finite(finite, real, b, "scores")
      out.append(np.asarray(r)[real])
      figures.append(_user_bytes(cache, memory, state, real))
    return np.concatenate(out), C.cell_bytes_row(np.concatenate(figures, axis=1))


def _check_finite(finite, real, batch: int, what: str) -> None:
  """Raises FloatingPointError naming the first real user of ``batch`` whose ``what`` are
  not all finite (``finite`` [B] bool from the jitted cell)."""
  bad = np.flatnonzero(~np.asarray(finite)[real])
  if bad.size:
    raise FloatingPointError(f"non-finite {what} for {bad.size} user(s), first user index "
                             f"{batch * len(real) + bad[0]}; refusing to report")


def _user_bytes(cache, memory, state, real) -> np.ndarray:
  """[3, n] float64 stored, buffer and native stored bytes of a batch's real users."""
  native = C.native_stored_bytes(cache, np.asarray(cache.length))
  return np.stack([C.stored_bytes(memory, state).astype(np.float64),
                   C.buffer_bytes(memory, state), native.astype(np.float64)])[:, real]


def _curve_printer(workdir: Path):
  """A print_fn for train_model that also appends each validation result to curve.json."""
  path = workdir / "curve.json"
  curve = json.loads(path.read_text()) if path.exists() else []
  state = {"step": 0, "t0": time.time()}

  def print_fn(msg):
    print(msg, flush=True)
    if msg.startswith("step "):
      state["step"] = int(msg.split()[1].split("/")[0])
    elif "valid NDCG@10" in msg:
      parts = msg.split()
      curve.append({"step": state["step"], "NDCG@10": float(parts[2]),
                    "HR@10": float(parts[4]), "wall_s": time.time() - state["t0"]})
      write_json_atomic(path, curve)
    elif "valid GAUC" in msg:  # task="ranking": "valid GAUC g NDCG@10 n"
      parts = msg.split()
      curve.append({"step": state["step"], "GAUC": float(parts[2]),
                    "NDCG@10": float(parts[4]), "wall_s": time.time() - state["t0"]})
      write_json_atomic(path, curve)

  return print_fn, curve


def compressor_builder(model, data, config):
  """``build(steps)``: the compressor of a cell's ``[(method, params), ...]`` (native when
  empty, a chain when several); calibrated methods (low rank, KVQuant, ...) are fitted through
  the registry's calibration hooks on validation histories, once per setting."""
  fitted = {}
  heads, dk, dv = model.head_dims()
  shape = C.CacheShape(model.memory_layers(), heads, config.data.max_len, dk, dv)

  def build(steps):
    built = []
    for name, params in steps:
      key = (name, json.dumps(params, sort_keys=True, default=str))
      if key not in fitted:
        fitted[key] = C.factory_params(name, dict(params), shape, lambda name=name: (
            calibration_caches(model, data.valid, num_users=config.eval.calibration_users,
                               seed=config.seed,
                               signals=C.get_spec(name).calibration_signals)))
      built.append(make_compressor(name, **fitted[key]))
    if not built:
      return C.native()
    return built[0] if len(built) == 1 else C.chain(*built)

  return build


def restate(config, old_path: Path, out: Path) -> None:
  """Rewrites ``old_path``'s byte columns from its recorded steps (see the module doc)."""
  import gzip

  from malloc_jax.experiment import build_model
  opener = gzip.open if old_path.suffix == ".gz" else open
  with opener(old_path, "rt") as f:
    old = json.load(f)
  if not old.get("rows") or "ranks" not in old or "lengths" not in old:
    raise ValueError(f"{old_path}: not a finished ml1m_table output (rows, ranks, lengths)")
  if old["capacity"] != config.data.max_len:
    raise ValueError(f"{old_path}: capacity {old['capacity']} != data.max_len "
                     f"{config.data.max_len} of --config")
  for key in ("dim", "heads", "num_layers", "name"):
    if old["model"][key] != config.model[key]:
      raise ValueError(f"{old_path}: model.{key}={old['model'][key]!r} != --config's "
                       f"{config.model[key]!r}")
  data = load_data(config)
  if old["dataset"] != data.summary():
    raise ValueError(f"{old_path}: dataset {old['dataset']!r} != {data.summary()!r}")
  model = build_model(config, data.num_items)
  split = data.eval_set(config.eval.split)
  n = len(old["lengths"])
  served = Served(model, split, config.eval.batch_size, config.eval.window, n)
  build = compressor_builder(model, data, config)  # fitted values do not matter to bytes
  rows = []
  for row in old["rows"]:
    _, figures = served.serve(build(row["steps"]))
    new = {**row, **figures, "compression_ratio":
           figures["reference_stored_bytes"] / figures["stored_bytes"],
           "restated_from": {"bytes_per_user": row.get("bytes_per_user"),
                             "compression_ratio": row.get("compression_ratio")}}
    new.pop("bytes_per_user", None)
    rows.append(new)
    print(f"{row['method']}: stored {figures['stored_bytes']:,.0f} B, buffer "
          f"{figures['buffer_bytes']:,.0f} B, {new['compression_ratio']:.1f}x stored "
          f"(was {row.get('compression_ratio', float('nan')):.1f}x)", flush=True)
  per_user = {m: stats.per_user_metric(np.asarray(r), "NDCG@10") for m, r in old["ranks"].items()}
  by_stored = [{**row, "bytes_per_user": row["stored_bytes"]} for row in rows]
  native_stored = rows[0]["reference_stored_bytes"]
  ratios = sorted({float(r["method"].rsplit(" ", 1)[1][:-1]) for r in rows
                   if r["method"].endswith("x")})
  order = stats.order_at_budgets(by_stored, per_user, [native_stored / r for r in ratios],
                                 resamples=_RESAMPLES.value, seed=config.seed)
  for o in order:
    o["order"] = [{("stored_bytes" if k == "bytes_per_user" else k): v for k, v in e.items()}
                  for e in o["order"]]
  result = {**old, "rows": rows, "order_at_budgets": order,
            "restated": {"from": str(old_path), "note": "byte columns recomputed from the "
                         "recorded steps with an untrained model of the same config"}}
  write_json_atomic(out, result)
  print(stats.markdown_ci(by_stored, {r["method"]: r["ci"] for r in rows}))
  for o in order:
    items = ", ".join(f"{e['method']} {e['NDCG@10']:.4f}{'' if e['mark'] == 'best' else e['mark']}"
                      for e in o["order"][:6])
    print(f"<= {o['budget']:,.0f} B: {items}")
  print(f"wrote {out}")


def plan_cells(spec, dv: int, ratios: list[float], methods, natural, chains,
               fixed) -> list[tuple[str, list]]:
  """The cells after native: ``[(label, [(method, params), ...]), ...]``.

  Each of ``methods`` at each ratio (``ratio_axis.reach_ratio``, SnapKV-style windows held
  at 8), the quantizers of ``natural`` at their natural sizes, each eviction + quantizer
  chain of ``chains`` at each ratio (``ratio_axis.chain_for_ratio``) and the ``fixed``
  settings (:func:`parse_fixed`); a ratio out of reach is printed and skipped. Shared by the
  retrieval and ranking tables.
  """
  group = max(g for g in range(1, min(32, dv) + 1) if dv % g == 0)
  qfix = {"kivi": {"group": group, "residual": group}, "intactkv": {}, "uniform": {}}
  cells = []
  for method in methods:
    for r in ratios:
      fix = {"window": 8} if method in WINDOWED else {}
      got = ratio_axis.reach_ratio(method, spec, r, **fix)
      if got is None:
        print(f"{method} {r:g}x: out of reach", flush=True)
        continue
      cells.append((f"{method} {r:g}x", [(method, got["params"])]))
  for label in natural:
    name, p = _quant(label)
    cells.append((f"{name} {p['bits']}-bit", [(name, {**p, **qfix[name]})]))
  for label in chains:
    evict, quant = label.split("+")
    qname, qp = _quant(quant)
    qp = {**qp, **qfix[qname]}
    for r in ratios:
      fix = {"window": 8} if evict in WINDOWED else {}
      got = ratio_axis.chain_for_ratio(evict, qname, spec, r, qp, **fix)
      if got is None:
        print(f"{label} {r:g}x: out of reach", flush=True)
        continue
      cells.append((f"{label} {r:g}x", got["steps"]))
  for text in fixed:
    label, name, params = parse_fixed(text)
    cells.append((label, [(name, params)]))
  return cells


RANK_METRICS = {"GAUC": "auc", "NDCG@10": "ndcg10", "logloss": "logloss"}  # per-user arrays


def ranking_table(config, model, data, split, n, cells, lengths, result, out, t0,
                  ratios) -> None:
  """The ranking table (``config.task = "ranking"``): every cell's memory ranked target-aware.

  The test users are prefilled once (``serving.batches``); each cell compresses their
  memories and ranks their candidates (``experiment.ranking_eval_candidates``: the target,
  ``eval.rank_hard`` items of its primary genre, ``eval.rank_easy`` items of other genres)
  with ``model.rank`` (M-FALCON, ``serving.serve(target_aware=True)``). Per cell: AUC (pooled),
  GAUC, logloss and candidate NDCG@10 (``ranking.impression_metrics``), stored / buffer bytes
  of the same memories (``compressors.user_bytes``) and the stored ratio against native; the
  paired 95% bootstrap interval against native of GAUC, NDCG@10 and logloss
  (``stats.ci_columns``, with the per-length buckets) and of the pooled AUC
  (``ranking.paired_auc_bootstrap``), the same user resamples throughout. Every H2O cell
  also gets an ORACLE row: H2O fed the attention of the request's own candidates
  (``serving.serve(oracle=True)``), which a memory compressed before the request cannot
  know: NOT deployable, an upper reference for attention-based eviction. A history-blind
  row (candidates ordered by training popularity) is the floor.
  """
  from malloc_jax import ranking
  from malloc_jax.experiment import ranking_eval_candidates
  e = config.eval
  cands = ranking_eval_candidates(config, data, e.split)[:n]
  expanded = []
  for label, steps in cells:
    expanded.append((label, steps, False))
    if len(steps) == 1 and steps[0][0] == "h2o":
      expanded.append((f"ORACLE vote {label} (not deployable)", steps, True))
  t_prefill = time.time()
  served = Served(model, split, e.batch_size, e.window, n)
  print(f"prefilled {n} users ({time.time() - t_prefill:.0f}s); {cands.shape[1]} candidates "
        "each", flush=True)
  build = compressor_builder(model, data, config)
  rows, per_user, logits = [], {}, {}
  blind = np.log(data.popularity[cands].astype(np.float64) + 1.0)  # history-blind ranker
  t_cells = time.time()
  for i, (label, steps, oracle) in enumerate(expanded):
    t = time.time()
    cell_logits, figures = served.rank(build(steps), cands, oracle=oracle)
    summary, per = ranking.impression_metrics(cell_logits)
    ratio = figures["reference_stored_bytes"] / figures["stored_bytes"]
    rows.append({"method": label, "steps": [[m, p] for m, p in steps], "oracle": oracle,
                 **{k: summary[k] for k in ("AUC", "GAUC", "logloss", "NDCG@10", "top1")},
                 **figures, "compression_ratio": ratio, "seconds": time.time() - t})
    per_user[label], logits[label] = per, cell_logits
    write_json_atomic(out, {**result, "rows": rows, "partial": True})  # survives a timeout
    print(f"[{i + 1}/{len(expanded)}] {label}: GAUC {summary['GAUC']:.4f} NDCG@10 "
          f"{summary['NDCG@10']:.4f} AUC {summary['AUC']:.4f} {ratio:.1f}x "
          f"({time.time() - t:.1f}s)", flush=True)
  summary, per = ranking.impression_metrics(blind)
  rows.append({"method": "history-blind (popularity)", "steps": [], "oracle": False,
               **{k: summary[k] for k in ("AUC", "GAUC", "logloss", "NDCG@10", "top1")}})
  per_user[rows[-1]["method"]], logits[rows[-1]["method"]] = per, blind
  boot = dict(resamples=_RESAMPLES.value, seed=config.seed)
  cis = {name: stats.ci_columns({m: p[key] for m, p in per_user.items()}, "native", lengths,
                                **boot) for name, key in RANK_METRICS.items()}
  for row in rows:
    m = row["method"]
    row["ci"] = {name: cis[name][m] for name in RANK_METRICS}
    row["ci"]["AUC"] = ranking.paired_auc_bootstrap(logits[m], logits["native"], **boot)
  served_rows = [{**r, "bytes_per_user": r["stored_bytes"]} for r in rows if "stored_bytes" in r
                 and not r["oracle"]]
  native_stored = rows[0]["stored_bytes"]
  order = stats.order_at_budgets(served_rows, {m: p["auc"] for m, p in per_user.items()},
                                 [native_stored / r for r in ratios], metric="GAUC", **boot)
  group = _primary_genre_breakdown(config, cands, per_user)
  result.update(task="ranking", candidates={"per_user": int(cands.shape[1]),
                                            "hard": e.get("rank_hard", 9),
                                            "easy": e.get("rank_easy", 10)},
                rows=rows, order_at_budgets=order, by_genre=group, lengths=lengths.tolist(),
                candidate_rank={m: np.round((1.0 - p["auc"]) * (cands.shape[1] - 1), 1).tolist()
                                for m, p in per_user.items()},
                seconds={"prefill": t_cells - t_prefill, "cells": time.time() - t_cells,
                         "total": time.time() - t0})
  write_json_atomic(out, result)
  print(markdown_ranking(rows), flush=True)
  for o in order:
    items = ", ".join(f"{x['method']} {x['GAUC']:.4f}{'' if x['mark'] == 'best' else x['mark']}"
                      for x in o["order"][:6])
    print(f"<= {o['budget']:,.0f} B: {items}")
  print(f"wrote {out} ({time.time() - t0:.0f}s)", flush=True)


def _primary_genre_breakdown(config, cands, per_user) -> dict:
  """Mean per-user GAUC of every cell by the target's primary genre (with the user counts);
  empty when the data have no genres."""
  d = config.data
  if d.source == "synthetic" or not d.get("genres", ""):
    return {}
  from malloc_jax.data import parsers
  from malloc_jax.experiment import item_genre_groups
  _, group = item_genre_groups(d.source, d.path, d.genres, d.min_events)
  names = parsers.load_genres(config.data.genres).names
  g = group[cands[:, 0]]
  out = {}
  for k in np.unique(g):
    sel = g == k
    out[names[k]] = {"num_users": int(sel.sum()),
                     **{m: float(p["auc"][sel].mean()) for m, p in per_user.items()}}
  return out


def markdown_ranking(rows: list[dict]) -> str:
  """Markdown table of the ranking rows: metrics, stored bytes and ratio, paired differences to
  native with 95% intervals (``tie`` when the GAUC interval contains 0), GAUC by length."""
  labels = list(rows[0]["ci"]["GAUC"].get("by_length", {}))
  counts = [rows[0]["ci"]["GAUC"]["by_length"][b]["num_users"] for b in labels]
  head = ("| cell | stored B/user | stored ratio | AUC (diff [95% CI]) | GAUC (diff [95% CI]) | "
          "GAUC tie? | NDCG@10 (diff [95% CI]) | logloss (diff [95% CI]) |"
          + "".join(f" GAUC {b} ({c}) |" for b, c in zip(labels, counts, strict=True)))
  lines = [head, "|" + "---|" * (8 + len(labels))]
  for r in rows:
    def cell(k, r=r):
      c = r["ci"][k]
      return f"{r[k]:.4f} ({c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])"
    b = (f"{r['stored_bytes']:,.0f} | {r['compression_ratio']:.1f}x" if "stored_bytes" in r
         else "- | -")
    tie = "tie" if r["ci"]["GAUC"]["contains_zero"] else "NO"
    by = r["ci"]["GAUC"].get("by_length", {})
    buckets = "".join(
        f" {by[x]['mean']:.4f} ({by[x]['diff']:+.4f}{'' if by[x]['contains_zero'] else '*'}) |"
        if by[x]["num_users"] else " - |" for x in labels)
    lines.append(f"| {r['method']} | {b} | {cell('AUC')} | {cell('GAUC')} | {tie} | "
                 f"{cell('NDCG@10')} | {cell('logloss')} |{buckets}")
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  validate_config(config)
  if _RESTATE.value:
    if not _OUT.value:
      raise app.UsageError("--restate needs --out (the old file is never overwritten)")
    if Path(_OUT.value).resolve() == Path(_RESTATE.value).resolve():
      raise app.UsageError("--out must differ from --restate (the old file is kept)")
    restate(config, Path(_RESTATE.value), Path(_OUT.value))
    return
  workdir = Path(_WORKDIR.value)
  check_workdir(workdir, config)
  t0 = time.time()
  data = load_data(config)
  print(data.summary(), flush=True)
  print_fn, curve = _curve_printer(workdir)
  model, info = train_model(config, workdir, data, print_fn)
  steps_per_epoch = max(len(data.train) // config.train.batch_size, 1)
  info.update(epochs=info["steps"] / steps_per_epoch, best_epoch=info["best_step"] / steps_per_epoch,
              curve=curve, steps_per_epoch=steps_per_epoch, devices=[str(d) for d in jax.devices()])
  criterion = "GAUC" if config.get("task", "retrieval") == "ranking" else "NDCG@10"
  print(f"trained: {info['steps']} steps ({info['epochs']:.1f} epochs), best valid {criterion} "
        f"{info['best_valid_ndcg10']:.4f} at epoch {info['best_epoch']:.0f}, "
        f"{info['train_seconds']:.0f}s", flush=True)
  out = Path(_OUT.value) if _OUT.value else workdir / "table.json"
  split = data.eval_set(config.eval.split)
  n = len(split) if not config.eval.max_users else min(config.eval.max_users, len(split))
  pop = retrieval_metrics(popularity_ranks(data.popularity, split.target[:n]), (10,))
  result = {"dataset": data.summary(), "model": config.model.to_dict(),
            "capacity": config.data.max_len, "train": info, "popularity": pop}
  # Full history lengths (before the capacity cut): the parser's per-user event counts. The
  # synthetic generator's histories fit the window (data.synthetic.max_len <= data.max_len is
  # checked below), so there the served history lengths are the full ones.
  if config.data.source == "synthetic":
    if config.data.synthetic.max_len > config.data.max_len:
      raise ValueError("synthetic data: data.synthetic.max_len > data.max_len; the full "
                       "history lengths of the length breakdown are not kept")
    lengths = np.asarray(split.length[:n], np.int64)
  else:
    from malloc_jax.data import parsers
    inter = parsers.load(config.data.source, config.data.path,
                         min_events=config.data.min_events)
    lengths = (np.diff(inter.offsets) - (1 if config.eval.split == "test" else 2))[:n]

  heads, dk, dv = model.head_dims()
  spec = cache_spec(model.memory_layers(), heads, config.data.max_len, dk, dv)
  ratios = [float(r) for r in _RATIOS.value]
  t_plan = time.time()
  cells = [("native", [])] + ([] if _TRAIN_ONLY.value else plan_cells(
      spec, dv, ratios, _METHODS.value, _NATURAL.value, _CHAINS.value, _FIXED.value))
  print(f"planned {len(cells)} cells ({time.time() - t_plan:.0f}s)", flush=True)
  if config.get("task", "retrieval") == "ranking":
    ranking_table(config, model, data, split, n, cells, lengths, result, out, t0, ratios)
    return

  t_prefill = time.time()
  served = Served(model, split, config.eval.batch_size, config.eval.window, n)
  print(f"prefilled {served.n} users ({time.time() - t_prefill:.0f}s)", flush=True)
  build = compressor_builder(model, data, config)

  rows, ranks = [], {}
  t_cells = time.time()
  for i, (label, steps) in enumerate(cells):
    t = time.time()
    r, figures = served.serve(build(steps))
    ranks[label] = r
    row = {"method": label, "steps": [[m, p] for m, p in steps],
           **retrieval_metrics(r, (10, 50, 200)), **figures,
           "compression_ratio": figures["reference_stored_bytes"] / figures["stored_bytes"],
           "seconds": time.time() - t}
    rows.append(row)
    write_json_atomic(out, {**result, "rows": rows, "partial": True,  # survives a timeout
                            "ranks": {m: x.tolist() for m, x in ranks.items()},
                            "lengths": lengths.tolist()})
    print(f"[{i + 1}/{len(cells)}] {label}: NDCG@10 {row['NDCG@10']:.4f} HR@10 "
          f"{row['HR@10']:.4f} {row['compression_ratio']:.1f}x ({row['seconds']:.1f}s)",
          flush=True)
  per_user = {m: stats.per_user_metric(r, "NDCG@10") for m, r in ranks.items()}
  cis = stats.ci_columns(per_user, "native", lengths, resamples=_RESAMPLES.value,
                         seed=config.seed)
  for row in rows:
    row["ci"] = cis[row["method"]]
  # Budgets and fits in stored bytes of the same users (stats reads ``bytes_per_user``).
  by_stored = [{**row, "bytes_per_user": row["stored_bytes"]} for row in rows]
  native_stored = rows[0]["reference_stored_bytes"]  # the same users in every cell
  order = stats.order_at_budgets(by_stored, per_user, [native_stored / r for r in ratios],
                                 resamples=_RESAMPLES.value, seed=config.seed)
  for o in order:
    o["order"] = [{("stored_bytes" if k == "bytes_per_user" else k): v for k, v in e.items()}
                  for e in o["order"]]
  result.update(rows=rows, order_at_budgets=order,
                ranks={m: r.tolist() for m, r in ranks.items()}, lengths=lengths.tolist(),
                seconds={"plan": t_prefill - t_plan, "cells": time.time() - t_cells,
                         "total": time.time() - t0})
  write_json_atomic(out, result)
  print(stats.markdown_ci(by_stored, cis))  # bytes/user: stored bytes
  for o in order:
    items = ", ".join(f"{e['method']} {e['NDCG@10']:.4f}{'' if e['mark'] == 'best' else e['mark']}"
                      for e in o["order"][:6])
    print(f"<= {o['budget']:,.0f} B: {items}")
  print(f"wrote {out} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
