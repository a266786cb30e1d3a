r"""The benchmark runner: every (dataset, model, method, budget, seed) cell, resumably.

  python -m malloc_jax.sweep --config configs/sweep.py:runlocal=True --workdir /tmp/sweep
  python -m malloc_jax.report --workdir /tmp/sweep

``run_sweep(config, workdir)`` is what the command line and notebooks call. It

1. expands the config into cells (:func:`expand_cells`): datasets x models x methods x
   budgets x seeds, where a method marked ``ratios`` becomes one cell per reduction ratio,
   its parameter chosen by ``compressors.budget.ratio_table`` for the model's cache shape,
   and explicit settings (KIVI bits, chains) are cells as they are. Each cell has a stable
   id: ``<dataset>/<model>/<method>/s<seed>#<hash of everything that determines its result>``;
2. skips the cells already in ``workdir/results.jsonl``;
3. trains each backbone once, keyed by a hash of its training config, in
   ``workdir/models/<key>`` (``experiment.train_model``: resumable Orbax checkpoints), and
   reuses it for every post-hoc cell;
4. runs each cell: one-shot serving (retrieval metrics over the full corpus and ranking
   metrics over sampled candidates), the streaming protocol for every configured r, bytes per
   user, FLOPs per request, latency and throughput; for ``recompute`` the reference that
   stores no memory;
   A cell of ``task="ranking"`` (``config.tasks``, see :func:`run_ranking_cell`) serves the
   same memory to a backbone trained for ranking and ranks each user's candidates
   target-aware (``ranking.rank_cell``): AUC, GAUC, logloss and candidate NDCG@10 with the
   paired difference to native on the same users (standard error and bootstrap interval);
5. appends the cell's result as one JSON line (written with a single ``write`` on an
   ``O_APPEND`` descriptor, then ``fsync``). A process killed at any point loses only the
   cell in progress: on load a torn last line is dropped and truncated away, finished cells
   are never recomputed, and the file never holds half a result.

Only one sweep may run in a workdir at a time (an ``flock`` on ``workdir/sweep.lock``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import costs as costs_lib
from malloc_jax import parallel, ranking, reads, serving, stats
from malloc_jax.compressors import registry
from malloc_jax.compressors.budget import cache_spec, memory_bytes, ratio_table, resolve_params
from malloc_jax.config_validation import validate_config
from malloc_jax.evaluate import calibration_caches
from malloc_jax.experiment import (
  TRAIN_FIELDS,
  check_workdir,
  load_data,
  model_cache_spec,
  num_devices,
  ranking_eval_candidates,
  train_model,
)
from malloc_jax.fileio import append_durably
from malloc_jax.metrics import ranking_metrics, retrieval_metrics
from malloc_jax.models import backbone_spec
from malloc_jax.ranking import candidate_labels, sample_candidates
from malloc_jax.train import TASKS

RESULTS = "results.jsonl"
BASE_MODELS = ("hstu", "sasrec")
EXTRA_METHODS = ("native", "recompute", "chain")

def granularity(family: str, model_name: str) -> str:
  """The granularity a cell compresses: the method's, the variant's, or "chain"."""
  variant = model_name.partition("_")[2]
  if family == "recompute":  # the compute reference of any backbone stores no memory
    return "none"
  if family == "chain" or (variant and family != "native"):
    return "chain"
  if variant:
    spec = backbone_spec(model_name)
    return spec.granularity if spec is not None else "architecture"
  if family in registry.specs():
    return registry.get_spec(family).granularity
  return "other"


# ------------------------------------------------------------------------------------------
# Results file.


def load_results(path: str | os.PathLike, repair: bool = True) -> list[dict]:
  """Reads ``results.jsonl``; a torn last line (killed mid-write) is ignored and truncated.

  Args:
    path: the results file (missing: no results).
    repair: truncate a torn last line away (the sweep does; readers such as the report
      pass False and only ignore it).

  Returns:
    The results, one dict per complete line, in file order.

  Raises:
    ValueError: a line other than the last is not valid JSON (the file and line are named).
  """
  path = Path(path)
  if not path.exists():
    return []
  data = path.read_bytes()
  lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
  last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
  rows, offset, good_end = [], 0, 0
  for i, raw in enumerate(lines):
    has_newline = i < len(lines) - 1
    end = offset + len(raw) + has_newline
    offset = end
    if not raw.strip():
      continue
    try:  # a last row without its newline is kept when it parses (only "\n" was lost)
      row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      row = None
    if isinstance(row, dict) and not has_newline and repair:
      _end_with_newline(path)
    if not isinstance(row, dict):
      if i == last:  # a write that did not complete (killed, or lost in a crash)
        logging.warning("%s: line %d is incomplete (an interrupted write); ignoring it",
                        path, i + 1)
        if repair:
          os.truncate(path, good_end)
        break
      raise ValueError(f"{path}: line {i + 1}: not a JSON object; the results file is "
                       "corrupted (delete that line to recompute its cell)")
    rows.append(row)
    good_end = end
  return rows


def _end_with_newline(path: Path) -> None:
  """Appends the newline a complete last row lacks, so the next append starts a new line."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND)
  try:
    os.write(fd, b"\n")
    os.fsync(fd)
  finally:
    os.close(fd)


def append_result(path: str | os.PathLike, row: dict) -> None:
  """Appends one result as a JSON line: one ``write`` on an O_APPEND descriptor, then fsync."""
  append_durably(path, (json.dumps(row, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------------------------------
# Cells.


@dataclasses.dataclass(frozen=True)
class Cell:
  """One result of the sweep.

  ``steps`` is the compressor chain ``((registry name, params), ...)``; empty for the native
  memory and for ``recompute`` (no memory).
  """

  id: str
  dataset: str
  model: str
  method: str
  family: str
  seed: int
  steps: tuple
  ratio: float | None
  run: Any = dataclasses.field(compare=False, repr=False)  # the run ConfigDict of the cell
  train_key: str = ""
  task: str = "retrieval"  # "ranking": run_ranking_cell, on a backbone trained for ranking

  @property
  def label(self) -> str:
    task = "" if self.task == "retrieval" else f"{self.task}:"
    return f"{self.dataset}/{task}{self.model}/{self.method}/s{self.seed}"


def _hash(obj, n: int = 10) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def train_key(run: ml_collections.ConfigDict) -> str:
  """Hash of the fields that determine a backbone's trained weights (seed, data, model, train)."""
  full = json.loads(run.to_json_best_effort(sort_keys=True))
  name = run.model.name
  return f"{name}-{_hash({k: full[k] for k in TRAIN_FIELDS if k in full})}"  # task: optional


def _resolve(name: str, params: dict, spec) -> dict:
  """Concrete parameters of one compressor step (``ratio`` and ``"auto"`` resolved)."""
  params = {k: v for k, v in params.items() if k not in ("name", "ratios")}
  return resolve_params(name, params, spec)


def _settings(label: str, m: dict, spec, ratios, where: str, print_fn) -> list[tuple]:
  """The cells of one method entry: [(cell method label, steps, target ratio or None)]."""
  name = m.get("name")
  if name in ("native", "recompute"):
    return [(label, (), None)]
  if name == "chain":
    steps = []
    for i, s in enumerate(m.get("steps", ())):
      s = dict(s)
      if s.get("name") not in registry.specs():
        raise ValueError(f"config.methods.{label}.steps[{i}].name={s.get('name')!r}: expected "
                         f"one of {sorted(registry.specs())}")
      steps.append((s["name"], _resolve(s["name"], s, spec)))
    if not steps:
      raise ValueError(f"config.methods.{label}.steps: a chain needs at least one step")
    return [(label, tuple(steps), None)]
  if not m.get("ratios"):
    return [(label, ((name, _resolve(name, m, spec)),), None)]
  out = []
  fixed = _resolve(name, m, spec)
  for ratio, params in ratio_table(name, spec, tuple(ratios), **fixed).items():
    if params is None:
      print_fn(f"note: {label} cannot reach {ratio:g}x for {where}; skipped")
      continue
    out.append((f"{label}@{ratio:g}x", ((name, params),), float(ratio)))
  return out


def task_run(base: ml_collections.ConfigDict, task: str, overrides=None):
  """The run config of one dataset for ``task``: ``base`` itself for retrieval; for ranking
  a copy with ``task = "ranking"`` and the ``train`` / ``eval`` fields of ``overrides``
  (``config.ranking_task.<dataset>``: negatives, loss, impressions per window, ...)."""
  run = ml_collections.ConfigDict(base.to_dict())
  if task == "retrieval":
    return run
  run.task = task
  overrides = {} if overrides is None else overrides.to_dict()
  for section in ("train", "eval"):
    run[section].update(overrides.get(section, {}))
  return run


def multi_position_ranking(model) -> bool:
  """Whether ``model`` trains ``train.rank_positions`` > 1 impressions per window in one pass
  (``train.ranking_logits``: a per-event cache backbone whose layers take ``isolated``
  tokens: HSTU, SASRec, GQA, MQA, MLA, LSH). Other variants train one impression per window
  (``model.rank`` of the prefix)."""
  return hasattr(model, "_run_tokens") and all(
      "isolated" in inspect.signature(layer.step).parameters for layer in model.layers)


def _ranking_positions(run, print_fn) -> None:
  """Sets ``run.train.rank_positions`` to 1 (printed) for a backbone that cannot train more
  impressions per window in one pass (:func:`multi_position_ranking`)."""
  from flax import nnx

  from malloc_jax.experiment import build_model
  if run.train.get("rank_positions", 1) > 1 and not multi_position_ranking(
      nnx.eval_shape(lambda: build_model(run, 2))):
    print_fn(f"note: {run.model.name} trains for ranking with one impression per window "
             f"(rank_positions {run.train.rank_positions} -> 1: no multi-position pass)")
    run.train.rank_positions = 1


def expand_cells(config, print_fn=print) -> list[Cell]:
  """All cells of a sweep config, in run order (grouped by trained backbone).

  ``config.tasks`` (default ``("retrieval",)``) is an axis: each task trains its own
  backbones (a ranking backbone's run is :func:`task_run`) and runs every method on them;
  ``recompute`` (the retrieval compute reference) has no ranking cell.

  Args:
    config: a sweep config (configs/sweep.py). print_fn: notes on skipped settings.

  Returns:
    The cells: datasets x models x tasks x seeds x methods (x ratios), the references first.

  Raises:
    ValueError: an unknown method, a bad method field or an invalid run config (named).
  """
  cells = []
  methods = sorted(config.methods.items(),  # the references first, then the config's order
                   key=lambda kv: {"native": 0, "recompute": 1}.get(kv[1].get("name"), 2))
  for label, m in methods:
    if m.get("name") not in registry.specs() and m.get("name") not in EXTRA_METHODS:
      raise ValueError(f"config.methods.{label}.name={m.get('name')!r}: expected one of "
                       f"{sorted(set(registry.specs()) | set(EXTRA_METHODS))}")
  tasks = tuple(config.get("tasks", ("retrieval",)))
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"config.tasks={tasks!r}: expected distinct values from {TASKS}")
  for ds_label, base in config.datasets.items():
    for model_label, sections in config.models.items():
      if ds_label not in sections:
        raise ValueError(f"config.models.{model_label} has no section for dataset {ds_label}")
      allowed = None
      if model_label in config.get("model_methods", {}):
        allowed = [x for x in str(config.model_methods[model_label]).split("+") if x]
      for task, seed in ((t, s) for t in tasks for s in config.seeds):
        run = task_run(base, task, config.get("ranking_task", {}).get(ds_label))
        run.model = ml_collections.ConfigDict(sections[ds_label].to_dict())
        run.seed = int(seed)
        if task == "ranking":
          _ranking_positions(run, print_fn)
        validate_config(run)
        key = train_key(run)
        spec = model_cache_spec(run)
        posthoc = spec is not None
        evaluation = {"eval": run.eval.to_dict(), "ranking": config.ranking.to_dict(),
                      "requests": list(config.stream_requests)}
        if task == "ranking":  # candidates from run.eval (ranking_eval_candidates), no stream
          evaluation = {"task": task, "eval": run.eval.to_dict(),
                        "bootstrap": config.get("bootstrap", {}).to_dict()
                        if config.get("bootstrap") else {}}
        train = json.loads(run.to_json_best_effort(sort_keys=True))
        where = ds_label if task == "retrieval" else f"{ds_label}/{task}"
        for method_label, m in methods:
          m = m.to_dict()
          if allowed is not None and method_label not in allowed:
            continue
          if task == "ranking" and m["name"] == "recompute":
            continue  # the retrieval compute reference: a ranking cell serves a memory
          if m["name"] not in ("native", "recompute") and not posthoc:
            print_fn(f"note: {method_label} skipped for {model_label} (its memory is not a "
                     "KV cache)")
            continue
          for label, steps, ratio in _settings(method_label, m, spec, config.ratios,
                                               f"{where}/{model_label}", print_fn):
            ident = _hash({"train": train, "steps": steps, "evaluation": evaluation,
                           "family": m["name"]})
            head = ds_label if task == "retrieval" else f"{ds_label}/{task}"
            cells.append(Cell(id=f"{head}/{model_label}/{label}/s{seed}#{ident}",
                              dataset=ds_label, model=model_label, method=label,
                              family=m["name"], seed=int(seed), steps=steps, ratio=ratio,
                              run=run, train_key=key, task=task))
  return cells


def validate_cells(cells: list[Cell], config) -> None:
  """Checks every cell's settings before any training (bad ones would fail after it).

  Builds each cell's compressors with ``make_compressor`` (cheap: no data, no model), checks
  budgets against the history window and the streaming / ranking settings.

  Raises:
    ValueError: naming the config field (``config.methods.<label>``, ``config.stream_requests``).
  """
  for r in config.stream_requests:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
      raise ValueError(f"config.stream_requests={tuple(config.stream_requests)!r}: expected "
                       "integers >= 1 (requests of the streaming protocol)")
  for r in config.get("ratios", ()):
    if isinstance(r, bool) or not isinstance(r, int | float) or not 1 <= r < float("inf"):
      raise ValueError(f"config.ratios={tuple(config.ratios)!r}: expected finite numbers >= 1")
  neg = config.ranking.num_negatives
  if isinstance(neg, bool) or not isinstance(neg, int) or neg < 1:
    raise ValueError(f"config.ranking.num_negatives={neg!r}: expected an integer >= 1")
  for cell in cells:
    field = f"config.methods.{cell.method.split('@')[0]}"
    max_len = cell.run.data.max_len
    for name, params in cell.steps:
      params = dict(params)
      for key in ("budget", "heavy", "recent", "sinks", "window"):
        if isinstance(params.get(key), int) and params[key] > max_len:
          raise ValueError(f"{field}.{key}={params[key]}: expected at most data.max_len="
                           f"{max_len} (cell {cell.label})")
      if name == "lowrank":
        rank = params.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
          raise ValueError(f"{field}.rank={rank!r}: expected an integer >= 1 (cell {cell.label})")
        continue
      if registry.get_spec(name).calibrate is not None:
        continue  # calibrated (DuoAttention, MiniCache, ThinK): its config parameters become
        # the factory's only at calibration (registry.factory_params, on the trained backbone)
      try:
        comp_lib.make_compressor(name, **params)
      except (TypeError, ValueError) as err:
        raise ValueError(f"{field} ({name}, cell {cell.label}): {err}") from None


# ------------------------------------------------------------------------------------------
# Running one cell.


class _Backbone:
  """A trained backbone with its data and the lazily fitted arguments of calibrated methods."""

  def __init__(self, key, model, data, run, info, prefill_cache_bytes: float = 4e9):
    self.key, self.model, self.data, self.run, self.info = key, model, data, run, info
    self._fitted: dict[tuple, dict] = {}
    self._prefilled: dict[tuple, list] = {}  # prefilled serving.Batch lists
    self.prefill_cache_bytes = prefill_cache_bytes
    self._ranking_users = None  # (split, n, candidates [n, C]) of the ranking cells
    self._native_ranking = None  # ranking.rank_cell of the native memory

  def ranking_users(self):
    """(eval split, users served n, candidates [n, 1 + K]) of this backbone's ranking cells:
    ``experiment.ranking_eval_candidates`` of ``run.eval.split`` (the target's topic mates
    plus other items on synthetic ``topics`` data, else uniform items), first n users."""
    if self._ranking_users is None:
      e = self.run.eval
      split = self.data.eval_set(e.split)
      n = len(split) if not e.max_users else min(e.max_users, len(split))
      cands = ranking_eval_candidates(self.run, self.data, e.split)[:n]
      self._ranking_users = (split, n, cands)
    return self._ranking_users

  def rank(self, comp: comp_lib.Compressor) -> dict:
    """``ranking.rank_cell`` of ``comp``'s memory over :meth:`ranking_users`."""
    split, _, cands = self.ranking_users()
    e = self.run.eval
    return ranking.rank_cell(self.model, split, cands, comp, batch_size=e.batch_size,
                             query_len=e.query_len, window=e.window)

  def native_ranking(self) -> dict:
    """The native memory's ranking result, the paired reference of every ranking cell."""
    if self._native_ranking is None:
      self._native_ranking = self.rank(comp_lib.native())
    return self._native_ranking

  def user_batches(self, split, n: int, e, prefill: bool = True):
    """The eval users' batches (``serving.batches``), prefilled once per backbone.

    Every served cell of the backbone compresses the same native caches, so the prefilled
    batches are kept (in device memory) when they fit in ``prefill_cache_bytes``; a reused
    batch reports 0 prefill seconds. Otherwise each cell prefills again.
    """
    make = lambda: serving.batches(
        self.model, split, batch_size=e.batch_size, max_users=n, query_len=e.query_len,
        window=e.window, num_devices=num_devices(self.run), prefill=prefill)
    key = (e.split, n, e.batch_size, e.query_len, e.window)
    if not prefill:
      return make()
    if key in self._prefilled:
      return [dataclasses.replace(b, prefill_seconds=0.0) for b in self._prefilled[key]]
    m = self.run.model
    estimate = -(-n // e.batch_size) * e.batch_size * split.items.shape[1] * 2 * m.num_layers \
        * m.dim * 4 * 1.5  # K, V float32 + signals
    if estimate > self.prefill_cache_bytes:
      return make()
    self._prefilled[key] = list(make())
    return self._prefilled[key]

  def factory_params(self, name: str, params: dict) -> dict:
    """The factory arguments of a step; calibrated methods are fitted once per setting."""
    key = (name, json.dumps(params, sort_keys=True, default=str))
    if key not in self._fitted:
      heads, dk, dv = self.model.head_dims()
      shape = registry.CacheShape(self.model.memory_layers(), heads, self.run.data.max_len,
                                  dk, dv)
      e = self.run.eval
      caches = lambda: calibration_caches(
          self.model, self.data.valid, num_users=e.calibration_users, seed=self.run.seed,
          signals=registry.get_spec(name).calibration_signals)
      self._fitted[key] = registry.factory_params(name, params, shape, caches)
    return self._fitted[key]

  def compressor(self, steps) -> comp_lib.Compressor:
    built = [registry.make_compressor(name, **self.factory_params(name, dict(params)))
             for name, params in steps]
    if not built:
      return comp_lib.native()
    return built[0] if len(built) == 1 else comp_lib.chain(*built)


def reference_bytes(run) -> float:
  """Bytes per user of the native HSTU / SASRec memory of the same depth, width and window.

  The compression ratio of every cell (trained variants included) is relative to it.
  """
  m = run.model
  d = m.dim
  return memory_bytes("native", cache_spec(m.num_layers, 1, run.data.max_len, d, d))


def reference_spec(run):
  """Abstract cache of the native HSTU / SASRec memory of :func:`reference_bytes`."""
  m = run.model
  return cache_spec(m.num_layers, 1, run.data.max_len, m.dim, m.dim)


def run_cell(cell: Cell, backbone: _Backbone, config) -> dict:
  """Runs one cell; returns its result row (metrics, bytes, costs, timings).

  Stages: the eval users and their ranking candidates; the serving pipeline
  (``serving.serve``: compress, score, stream, guard; ``recompute`` re-encodes instead);
  quality metrics; bytes and request costs; bookkeeping. A ranking cell is
  :func:`run_ranking_cell`.
  """
  if cell.task == "ranking":
    return run_ranking_cell(cell, backbone, config)
  t0 = time.time()
  e = cell.run.eval
  split, n, candidates = _eval_users(cell, backbone, config)
  comp = None if cell.family == "recompute" else backbone.compressor(cell.steps)
  requests = tuple(int(r) for r in config.stream_requests) if comp is not None else ()
  served = serving.serve(
      backbone.model, backbone.user_batches(split, n, e, prefill=comp is not None), comp,
      candidates=candidates, requests=requests, window=e.window,
      num_devices=num_devices(cell.run), where=f"sweep cell {cell.id} ({cell.label})")
  eval_seconds = time.time() - t0
  row = _cell_header(cell, backbone, n)
  row.update(_quality(served, tuple(e.ks), backbone.model.temperature))
  t_costs = time.time()
  row.update(_bytes_and_costs(backbone.model, comp, served, cell.run, config.costs))
  row.update({f"{k}_seconds": v for k, v in served.seconds.items()})
  row["costs_seconds"] = time.time() - t_costs
  ref = reference_bytes(cell.run)
  row["reference_bytes_per_user"] = ref
  row["stores_memory"] = comp is not None  # recompute keeps only the raw events
  row["compression_ratio"] = (row["reference_stored_bytes"] / row["stored_bytes"]
                              if comp is not None else None)  # stored bytes, same users
  row["train_seconds"] = backbone.info.get("train_seconds")
  row["best_valid_ndcg10"] = backbone.info.get("best_valid_ndcg10")
  row["eval_seconds"] = eval_seconds
  # 0-based target ranks of the served users, in order: the report's paired CIs to native
  # (report.add_retrieval_ci) are computed from them.
  row["ranks"] = [int(x) for x in np.asarray(served.ranks)]
  return _finish_row(row, t0)


def _finish_row(row: dict, t0: float) -> dict:
  row["cell_seconds"] = time.time() - t0
  row["host"] = socket.gethostname()
  row["device"] = str(jax.devices()[0])
  row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  return row


# Ranking metrics of a cell and the per-user arrays (``ranking.rank_cell``'s "per_user") their
# paired differences to native are taken over: GAUC is the mean per-user AUC (every user has
# 1 + K impressions), logloss the mean per-user logloss.
RANKING_PAIRED = (("GAUC", "auc"), ("cand_NDCG@10", "ndcg10"), ("logloss", "logloss"))


def ranking_columns(res: dict, native: dict, bootstrap=None) -> dict:
  """The quality columns of a ranking cell from two ``ranking.rank_cell`` results.

  Args:
    res: the cell's result; native: the native memory's, on the same users and candidates.
    bootstrap: options of ``stats.paired_bootstrap`` (resamples, seed, level).

  Returns:
    {"AUC", "GAUC", "logloss", "cand_NDCG@10", "top1", "ranking_candidates"} and, for each
    of GAUC, cand_NDCG@10 and logloss, ``d<metric>`` (the cell minus native, mean over
    users), ``d<metric>_se`` (``ranking.paired_se``), ``d<metric>_ci_low`` / ``_ci_high``
    (paired bootstrap interval); ``ci``: the GAUC interval in the form of
    ``stats.ci_columns`` (the report's error bars).
  """
  m = res["metrics"]
  row = {"AUC": m["AUC"], "GAUC": m["GAUC"], "logloss": m["logloss"],
         "cand_NDCG@10": m["NDCG@10"], "top1": m["top1"],
         "ranking_candidates": int(res["logits"].shape[1])}
  for col, key in RANKING_PAIRED:
    ci = stats.paired_bootstrap(res["per_user"][key], native["per_user"][key],
                                **(bootstrap or {}))
    _, se = ranking.paired_se(res["per_user"][key], native["per_user"][key])
    row.update({f"d{col}": ci["diff"], f"d{col}_se": se, f"d{col}_ci_low": ci["ci_low"],
                f"d{col}_ci_high": ci["ci_high"]})
    if col == "GAUC":
      row["ci"] = ci
  return row


def run_ranking_cell(cell: Cell, backbone: _Backbone, config) -> dict:
  """Runs one ``task="ranking"`` cell; returns its result row.

  The backbone was trained for ranking (``config.task = "ranking"``). Each eval user's
  memory goes through the cell's compressor and the user's candidates read it target-aware
  (``ranking.rank_cell``, M-FALCON); the row has AUC, GAUC, logloss and candidate NDCG@10
  (:func:`ranking_columns`, paired against the native memory of the same users), the
  stored and buffer bytes of the same memories (``compressors.user_bytes``: the prefilled
  caches compressed once more, as the retrieval rows count them) and the compression ratio
  against the native HSTU / SASRec memory of the same users. No latency / FLOPs columns:
  the request costs of the sweep measure the retrieval read.
  """
  t0 = time.time()
  e = cell.run.eval
  split, n, _ = backbone.ranking_users()
  comp = backbone.compressor(cell.steps)
  native = backbone.native_ranking()
  res = native if not cell.steps else backbone.rank(comp)
  eval_seconds = time.time() - t0
  row = _cell_header(cell, backbone, n)
  row.update(ranking_columns(res, native, config.get("bootstrap", {})))
  figures, lengths = [], []
  for b in backbone.user_batches(split, n, e):
    memory = serving.compress_stage(b.cache, b.signals, compressor=comp)
    figures.append(comp_lib.user_bytes(memory, comp)[:, b.real])
    lengths.append(parallel.to_host(memory.index.length)[b.real])
  stored, buffer = (float(x) for x in np.concatenate(figures, axis=1).mean(axis=1))
  ref = float(np.mean(comp_lib.native_stored_bytes(reference_spec(cell.run),
                                                   np.concatenate(lengths))))
  row.update(stored_bytes=stored, buffer_bytes=buffer, bytes_per_user=res["bytes_per_user"],
             reference_stored_bytes=ref, reference_bytes_per_user=reference_bytes(cell.run),
             compression_ratio=ref / stored, stores_memory=True,
             train_seconds=backbone.info.get("train_seconds"),
             best_valid_gauc=backbone.info.get("best_valid_ndcg10"),  # GAUC when ranking
             eval_seconds=eval_seconds)
  return _finish_row(row, t0)


def _eval_users(cell: Cell, backbone: _Backbone, config):
  """(eval split, number of users served, ranking candidates [n, C]) of a cell."""
  e = cell.run.eval
  split = backbone.data.eval_set(e.split)
  n = len(split) if not e.max_users else min(e.max_users, len(split))
  rk = config.ranking
  candidates = sample_candidates(split.target[:n], backbone.model.num_items, rk.num_negatives,
                                 rk.seed + cell.seed)
  return split, n, candidates


def _cell_header(cell: Cell, backbone: _Backbone, n: int) -> dict:
  run = cell.run
  return {"cell": cell.id, "dataset": cell.dataset, "dataset_name": backbone.data.summary(),
          "model": cell.model, "backbone": run.model.name, "method": cell.method,
          "family": cell.family, "granularity": granularity(cell.family, run.model.name),
          "seed": cell.seed, "ratio_target": cell.ratio, "task": cell.task,
          "params": {name: p for name, p in cell.steps} if cell.steps else {},
          "train_key": cell.train_key, "num_users": int(n), "split": run.eval.split}


def _quality(served: serving.Served, ks: tuple, temperature: float) -> dict:
  """Retrieval metrics (one-shot and streamed) and ranking metrics over the candidates."""
  row = retrieval_metrics(served.ranks, ks)
  logits = served.candidate_logits
  labels = candidate_labels(logits)
  users = np.broadcast_to(np.arange(len(logits))[:, None], labels.shape)
  row.update(ranking_metrics(users, labels, logits, temperature))
  row["ranking_candidates"] = int(labels.shape[1])
  for r, ranks in served.stream_ranks.items():
    for k, v in retrieval_metrics(ranks, ks).items():
      row[f"stream{r}/{k}"] = v
    row[f"stream{r}/bytes_per_user"] = comp_lib.bytes_per_user(served.stream_memory[r])
  return row


def _bytes_and_costs(model, comp, served: serving.Served, run, c) -> dict:
  """Bytes per user (stored and buffer means over every served user; the native reference
  for the same users) and FLOPs / latency of one request batch (the last served batch)."""
  b = served.last
  stored, buffer = (float(x) for x in served.user_bytes.mean(axis=1))
  figures = {"stored_bytes": stored, "buffer_bytes": buffer}
  for r, m in served.stream_memory.items():
    figures[f"stream{r}/stored_bytes"] = float(np.mean(comp_lib.stored_bytes(
        m, comp_lib.state_shape(comp, m))))  # the last batch's users
  if comp is None:
    return {**figures, "bytes_per_user": costs_lib.events_bytes_per_user(b.events),
            "shared_bytes": 0,
            **costs_lib.recompute_costs(model, b.events, warmup=c.warmup, iters=c.iters).row()}
  return {**figures, "bytes_per_user": comp_lib.bytes_per_user(served.memory),
          "shared_bytes": comp_lib.shared_nbytes(served.memory),
          "reference_stored_bytes": float(np.mean(comp_lib.native_stored_bytes(
              reference_spec(run), served.lengths))),
          **costs_lib.serving_costs(model, served.memory, b.req, closed_form=True,
                                    warmup=c.warmup, iters=c.iters).row(),
          # Latency and peak-memory columns from the compressed read (issue 21).
          **reads.read_costs(model, served.memory, b.req, warmup=c.warmup, iters=c.iters)}


# ------------------------------------------------------------------------------------------
# The sweep.


def _fmt_seconds(s: float) -> str:
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def run_sweep(config, workdir: str | os.PathLike, print_fn=print) -> list[dict]:
  """Runs every unfinished cell of ``config``; returns the results of all its cells.

  Args:
    config: a sweep config (see configs/sweep.py).
    workdir: holds ``results.jsonl``, ``models/<key>`` (trained backbones) and the lock.
    print_fn: progress output.

  Returns:
    The result rows of this config's cells, finished now or before.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = open(workdir / "sweep.lock", "w")  # noqa: SIM115 - held for the whole sweep
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.close()
    raise RuntimeError(f"another sweep is running in {workdir} (sweep.lock is held)") from None
  try:
    return _run_locked(config, workdir, print_fn)
  finally:
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


def _run_locked(config, workdir: Path, print_fn) -> list[dict]:
  path = workdir / RESULTS
  cells = expand_cells(config, print_fn)
  validate_cells(cells, config)
  ids = [c.id for c in cells]
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})
    raise ValueError(f"sweep: duplicate cells {dup[:3]} (two method labels resolve to the "
                     "same setting?)")
  rows = load_results(path)
  done = {r["cell"]: r for r in rows if "cell" in r}
  foreign = len(set(done) - set(ids))
  todo = [c for c in cells if c.id not in done]
  total = len(cells)
  print_fn(f"sweep: {total} cells, {total - len(todo)} already in {path}, {len(todo)} to run"
           + (f" ({foreign} results of other configs kept)" if foreign else ""))
  t_start, computed = time.time(), 0
  data_cache: dict[str, Any] = {}
  backbone = None
  for cell in todo:
    if backbone is None or backbone.key != cell.train_key:
      data_key = json.dumps(cell.run.data.to_dict(), sort_keys=True)
      if data_key not in data_cache:
        data_cache[data_key] = load_data(cell.run)
        print_fn(data_cache[data_key].summary())
      data = data_cache[data_key]
      model_dir = workdir / "models" / cell.train_key
      check_workdir(model_dir, cell.run)
      print_fn(f"backbone {cell.train_key} ({cell.dataset}/{cell.model}/s{cell.seed})")
      model, info = train_model(cell.run, model_dir, data, print_fn)
      backbone = _Backbone(cell.train_key, model, data, cell.run, info,
                           float(config.get("prefill_cache_bytes", 4e9)))
    row = run_cell(cell, backbone, config)
    append_result(path, row)
    done[cell.id] = row
    computed += 1
    elapsed = time.time() - t_start
    left = sum(1 for c in cells if c.id not in done)
    eta = elapsed / computed * left
    progress = (f"[{row['cell_seconds']:.0f}s; elapsed {_fmt_seconds(elapsed)}, "
                f"ETA {_fmt_seconds(eta)}]")
    if cell.task == "ranking":
      print_fn(f"[{len(cells) - left}/{total}] {cell.label}: GAUC {row['GAUC']:.4f} "
               f"({row['dGAUC']:+.4f}, SE {row['dGAUC_se']:.4f} vs native) AUC "
               f"{row['AUC']:.4f} NDCG@10 (candidates) {row['cand_NDCG@10']:.4f} stored "
               f"bytes/user {row['stored_bytes']:,.0f} ({row['compression_ratio']:.2f}x) "
               + progress)
      continue
    stream = [k for k in row if k.startswith("stream") and k.endswith("/NDCG@10")]
    print_fn(f"[{len(cells) - left}/{total}] {cell.label}: NDCG@10 {row['NDCG@10']:.4f}"
             + "".join(f" {k.split('/')[0]} {row[k]:.4f}" for k in stream)
             + f" AUC {row['AUC']:.4f} bytes/user {row['bytes_per_user']:,.0f}"
             + (f" ({row['compression_ratio']:.2f}x)" if row["compression_ratio"] else "")
             + f" p50 {row['latency_p50_ms']:.2f} ms  "
             f"[{row['cell_seconds']:.0f}s; elapsed {_fmt_seconds(elapsed)}, "
             f"ETA {_fmt_seconds(eta)}]")
  print_fn(f"sweep finished: {total} cells in {path}")
  results = [done[i] for i in ids]
  print_fn(stage_summary(results))
  return results


def stage_summary(rows: list[dict]) -> str:
  """Where the sweep's time went: training (once per backbone) and each cell stage."""
  trained = {}
  for r in rows:
    trained.setdefault(r.get("train_key"), r.get("train_seconds") or 0.0)
  parts = {"training": sum(trained.values())}
  for k in ("prefill", "compress", "score", "stream", "costs"):
    parts[k] = sum(r.get(f"{k}_seconds") or 0.0 for r in rows)
  cells = sum(r.get("cell_seconds") or 0.0 for r in rows)
  parts["other"] = max(0.0, cells - sum(v for k, v in parts.items() if k != "training"))
  total = sum(parts.values())
  return (f"time by stage ({len(rows)} cells, {len(trained)} backbones, "
          f"{_fmt_seconds(total)} in all): "
          + ", ".join(f"{k} {_fmt_seconds(v)} ({v / max(total, 1e-9):.0%})"
                      for k, v in parts.items()))


def main(argv):
  from absl import flags

  from malloc_jax import logging_setup

  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  run_sweep(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweep.py).")
  flags.DEFINE_string("workdir", None, "Sweep directory: results.jsonl and trained models.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
