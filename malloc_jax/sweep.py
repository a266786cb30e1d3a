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
5. appends the cell's result as one JSON line (written with a single ``write`` on an
   ``O_APPEND`` descriptor, then ``fsync``). A process killed at any point loses only the
   cell in progress: on load a torn last line is dropped and truncated away, finished cells
   are never recomputed, and the file never holds half a result.

Only one sweep may run in a workdir at a time (an ``flock`` on ``workdir/sweep.lock``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax import costs as costs_lib
from malloc_jax import reads
from malloc_jax.compressors.budget import cache_spec, memory_bytes, params_for_ratio, ratio_table
from malloc_jax.compressors.registry import FACTORIES, make_compressor
from malloc_jax.config_validation import validate_config
from malloc_jax.evaluate import calibration_caches, padded_batches, split_request
from malloc_jax.experiment import TRAIN_FIELDS, _check_workdir, build_model, load_data, train_model
from malloc_jax.metrics import ranking_metrics, retrieval_metrics, target_rank
from malloc_jax.models.base import Events
from malloc_jax.ranking import candidate_labels, sample_candidates
from malloc_jax.streaming import stream_memory

RESULTS = "results.jsonl"
BASE_MODELS = ("hstu", "sasrec")
EXTRA_METHODS = ("native", "recompute", "chain")

# Granularity of each method family and trained variant (DESIGN.md's method catalogue).
GRANULARITY = {
    "native": "none", "recompute": "none",
    "h2o": "token", "snapkv": "token", "streaming": "token", "random": "token",
    "merge_evicted": "token", "longformer": "token", "beacon": "token",
    "kivi": "precision", "intactkv": "precision", "uniform": "precision",
    "lowrank": "low rank",
    "mqa": "head", "gqa": "head", "mla": "head",
    "linformer": "sequence", "lsh": "sequence",
    "rwkv": "architecture", "linear": "architecture",
}


def granularity(family: str, model_name: str) -> str:
  """The granularity a cell compresses: the method's, the variant's, or "chain"."""
  variant = model_name.partition("_")[2]
  if family == "recompute":  # the compute reference of any backbone stores no memory
    return "none"
  if family == "chain" or (variant and family != "native"):
    return "chain"
  if variant:
    return GRANULARITY.get(variant, "architecture")
  return GRANULARITY.get(family, "other")


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
  data = (json.dumps(row, sort_keys=True) + "\n").encode()
  path = Path(path)
  new = not path.exists()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(data)
    while view:
      n = os.write(fd, view)
      view = view[n:]
    os.fsync(fd)
  finally:
    os.close(fd)
  if new:  # make the new directory entry durable too
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(dfd)
    finally:
      os.close(dfd)


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

  @property
  def label(self) -> str:
    return f"{self.dataset}/{self.model}/{self.method}/s{self.seed}"


def _hash(obj, n: int = 10) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def train_key(run: ml_collections.ConfigDict) -> str:
  """Hash of the fields that determine a backbone's trained weights (seed, data, model, train)."""
  full = json.loads(run.to_json_best_effort(sort_keys=True))
  name = run.model.name
  return f"{name}-{_hash({k: full[k] for k in TRAIN_FIELDS})}"


def _auto(value, dv: int):
  """"auto" for a KIVI group or residual: the largest divisor of Dv up to 32."""
  if value != "auto":
    return value
  return max(g for g in range(1, min(32, dv) + 1) if dv % g == 0)


def _resolve(name: str, params: dict, spec, dv: int) -> dict:
  """Concrete parameters of one compressor step (``ratio`` and ``"auto"`` resolved)."""
  params = {k: _auto(v, dv) for k, v in params.items() if k not in ("name", "ratios")}
  ratio = params.pop("ratio", None)
  if ratio is not None:
    params = params_for_ratio(name, spec, float(ratio), **params)
  return params


def _model_info(run) -> tuple[Any, bool]:
  """(cache spec of the model's native memory or None, whether post-hoc methods apply)."""
  from flax import nnx
  model = nnx.eval_shape(lambda: build_model(run, 2))
  if hasattr(model, "empty_memory"):  # own memory layout: only native / recompute apply
    return None, False
  heads, dk, dv = model.head_dims()
  return cache_spec(len(model.layers), heads, run.data.max_len, dk, dv), True


def _settings(label: str, m: dict, spec, ratios, where: str, print_fn) -> list[tuple]:
  """The cells of one method entry: [(cell method label, steps, target ratio or None)]."""
  name = m.get("name")
  dv = spec.v.shape[-1] if spec is not None else 0
  if name in ("native", "recompute"):
    return [(label, (), None)]
  if name == "chain":
    steps = []
    for i, s in enumerate(m.get("steps", ())):
      s = dict(s)
      if s.get("name") not in FACTORIES:
        raise ValueError(f"config.methods.{label}.steps[{i}].name={s.get('name')!r}: expected "
                         f"one of {sorted(FACTORIES)}")
      steps.append((s["name"], _resolve(s["name"], s, spec, dv)))
    if not steps:
      raise ValueError(f"config.methods.{label}.steps: a chain needs at least one step")
    return [(label, tuple(steps), None)]
  if not m.get("ratios"):
    return [(label, ((name, _resolve(name, m, spec, dv)),), None)]
  out = []
  fixed = _resolve(name, m, spec, dv)
  for ratio, params in ratio_table(name, spec, tuple(ratios), **fixed).items():
    if params is None:
      print_fn(f"note: {label} cannot reach {ratio:g}x for {where}; skipped")
      continue
    out.append((f"{label}@{ratio:g}x", ((name, params),), float(ratio)))
  return out


def expand_cells(config, print_fn=print) -> list[Cell]:
  """All cells of a sweep config, in run order (grouped by trained backbone).

  Args:
    config: a sweep config (configs/sweep.py). print_fn: notes on skipped settings.

  Returns:
    The cells: datasets x models x seeds x methods (x ratios), the references first.

  Raises:
    ValueError: an unknown method, a bad method field or an invalid run config (named).
  """
  cells = []
  methods = sorted(config.methods.items(),  # the references first, then the config's order
                   key=lambda kv: {"native": 0, "recompute": 1}.get(kv[1].get("name"), 2))
  for label, m in methods:
    if m.get("name") not in FACTORIES and m.get("name") not in EXTRA_METHODS:
      raise ValueError(f"config.methods.{label}.name={m.get('name')!r}: expected one of "
                       f"{sorted(set(FACTORIES) | set(EXTRA_METHODS))}")
  for ds_label, base in config.datasets.items():
    for model_label, sections in config.models.items():
      if ds_label not in sections:
        raise ValueError(f"config.models.{model_label} has no section for dataset {ds_label}")
      allowed = None
      if model_label in config.get("model_methods", {}):
        allowed = [x for x in str(config.model_methods[model_label]).split("+") if x]
      for seed in config.seeds:
        run = ml_collections.ConfigDict(base.to_dict())
        run.model = ml_collections.ConfigDict(sections[ds_label].to_dict())
        run.seed = int(seed)
        validate_config(run)
        key = train_key(run)
        spec, posthoc = _model_info(run)
        evaluation = {"eval": run.eval.to_dict(), "ranking": config.ranking.to_dict(),
                      "requests": list(config.stream_requests)}
        train = json.loads(run.to_json_best_effort(sort_keys=True))
        for method_label, m in methods:
          m = m.to_dict()
          if allowed is not None and method_label not in allowed:
            continue
          if m["name"] not in ("native", "recompute") and not posthoc:
            print_fn(f"note: {method_label} skipped for {model_label} (its memory is not a "
                     "KV cache)")
            continue
          for label, steps, ratio in _settings(method_label, m, spec, config.ratios,
                                               f"{ds_label}/{model_label}", print_fn):
            ident = _hash({"train": train, "steps": steps, "evaluation": evaluation,
                           "family": m["name"]})
            cells.append(Cell(id=f"{ds_label}/{model_label}/{label}/s{seed}#{ident}",
                              dataset=ds_label, model=model_label, method=label,
                              family=m["name"], seed=int(seed), steps=steps, ratio=ratio,
                              run=run, train_key=key))
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
      try:
        make_compressor(name, **params)
      except (TypeError, ValueError) as err:
        raise ValueError(f"{field} ({name}, cell {cell.label}): {err}") from None


# ------------------------------------------------------------------------------------------
# Running one cell.


@functools.partial(jax.jit, static_argnames=("query_len", "window"))
def _prefill_batch(model, items, ts, length, *, query_len, window):
  """Stage 1 of a served cell: the native cache and signals of each user's prefix."""
  prefix, req = split_request(items, ts, length, query_len)
  cache, signals = model.prefill(prefix, window)
  return cache, signals, prefix, req


@functools.partial(jax.jit, static_argnames=("compressor",))
def _compress_batch(cache, signals, *, compressor):
  """Stage 2: the one-shot compressed memory."""
  memory, _ = compressor.compress(cache, compressor.init(cache), signals)
  return memory


@jax.jit
def _score_batch(model, memory, req, target, candidates):
  """Stage 3: read the memory; (ranks [B], candidate logits [B, C], finite [B])."""
  h = model.user_embedding(reads.serving_view(model, memory), req)  # [B, d]
  ranks = target_rank(model.logits(h), target)
  return ranks, model.logits(h, candidates), jnp.all(jnp.isfinite(h), axis=-1)


@functools.partial(jax.jit, static_argnames=("compressor", "requests", "window"))
def _stream_batch(model, prefix, req, target, *, compressor, requests, window):
  """The streaming protocol with r = ``requests``: (ranks [B], memory, finite [B])."""
  memory, _ = stream_memory(model, prefix, compressor, requests, window)
  h = model.user_embedding(reads.serving_view(model, memory), req)
  return target_rank(model.logits(h), target), memory, jnp.all(jnp.isfinite(h), axis=-1)


@jax.jit
def _recompute_cell(model, items, ts, length, target, candidates):
  """The recompute reference: the whole history + request re-encoded, no memory."""
  h = model.user_embedding(model.empty_cache(items.shape[0]), Events(items, ts, length))
  return target_rank(model.logits(h), target), model.logits(h, candidates)


class _Backbone:
  """A trained backbone with its data, lazily fitted low-rank bases and reference bytes."""

  def __init__(self, key, model, data, run, info, prefill_cache_bytes: float = 4e9):
    self.key, self.model, self.data, self.run, self.info = key, model, data, run, info
    self._bases = {}
    self._prefilled: dict[tuple, list] = {}
    self.prefill_cache_bytes = prefill_cache_bytes

  def prefilled(self, split, n: int, bs: int, e):
    """The prefix caches of the eval users in batches of ``bs``, prefilled once per backbone.

    Every served cell of the backbone compresses the same native caches, so they are kept
    (in device memory) when they fit in ``prefill_cache_bytes``; otherwise each cell
    prefills again. Yields (start, idx, real, cache, signals, prefix, req, seconds), where
    seconds is the time spent prefilling that batch now (0 when reused).
    """
    key = (e.split, n, bs, e.query_len, e.window)
    if key in self._prefilled:
      for batch in self._prefilled[key]:
        yield (*batch[:-1], 0.0)
      return
    m = self.run.model
    estimate = -(-n // bs) * bs * split.items.shape[1] * 2 * m.num_layers * m.dim * 4 * 1.5
    keep = [] if estimate <= self.prefill_cache_bytes else None  # K, V f32 + signals
    for start, idx, real in padded_batches(n, bs):
      t = time.time()
      out = jax.block_until_ready(_prefill_batch(
          self.model, jnp.asarray(split.items[idx]), jnp.asarray(split.ts[idx]),
          jnp.asarray(split.length[idx]), query_len=e.query_len, window=e.window))
      batch = (start, idx, real, *out, time.time() - t)
      if keep is not None:
        keep.append(batch)
      yield batch
    if keep is not None:
      self._prefilled[key] = keep

  def bases(self, rank: int):
    if rank not in self._bases:
      e = self.run.eval
      self._bases[rank] = comp_lib.fit_lowrank(calibration_caches(
          self.model, self.data.valid, num_users=e.calibration_users, seed=self.run.seed), rank)
    return self._bases[rank]

  def compressor(self, steps) -> comp_lib.Compressor:
    built = []
    for name, params in steps:
      params = dict(params)
      if name == "lowrank":
        params["bases"] = self.bases(int(params.pop("rank")))
      built.append(make_compressor(name, **params))
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
  """Runs one cell; returns its result row (metrics, bytes, costs, timings)."""
  t0 = time.time()
  model, run = backbone.model, cell.run
  e = run.eval
  split = backbone.data.eval_set(e.split)
  n = len(split) if not e.max_users else min(e.max_users, len(split))
  rk = config.ranking
  cands = sample_candidates(split.target[:n], model.num_items, rk.num_negatives,
                            rk.seed + cell.seed)
  requests = tuple(int(r) for r in config.stream_requests)
  bs = min(e.batch_size, n)
  comp = None if cell.family == "recompute" else backbone.compressor(cell.steps)
  ranks, logits, stream = [], [], []
  first = None
  stages = dict.fromkeys(("prefill", "compress", "score", "stream"), 0.0)
  ub = []  # per user: stored, buffer, native stored bytes (compressors.cell_bytes)
  if comp is None:
    for _start, idx, real in padded_batches(n, bs):
      args = (jnp.asarray(split.items[idx]), jnp.asarray(split.ts[idx]),
              jnp.asarray(split.length[idx]), jnp.asarray(split.target[idx]),
              jnp.asarray(cands[idx]))
      t = time.time()
      r, c = jax.block_until_ready(_recompute_cell(model, *args))
      stages["score"] += time.time() - t
      ranks.append(np.asarray(r)[real])
      logits.append(np.asarray(c)[real])
      if first is None:
        first = (args, None, ())
  else:
    for start, idx, real, cache, signals, prefix, req, prefill_s in backbone.prefilled(
        split, n, bs, e):
      stages["prefill"] += prefill_s
      target, cand = jnp.asarray(split.target[idx]), jnp.asarray(cands[idx])
      t = time.time()
      mem = jax.block_until_ready(_compress_batch(cache, signals, compressor=comp))
      t1 = time.time()
      ub.append(comp_lib.cell_bytes(mem, comp, reference_spec(run))[:, real])
      r, c, ok = jax.block_until_ready(_score_batch(model, mem, req, target, cand))
      t2 = time.time()
      s_ranks, smem = [], []
      for q in requests:
        s_r, m_r, ok_r = jax.block_until_ready(_stream_batch(
            model, prefix, req, target, compressor=comp, requests=q, window=e.window))
        s_ranks.append(s_r)
        smem.append(m_r)
        ok = ok & ok_r
      stages["compress"] += t1 - t
      stages["score"] += t2 - t1
      stages["stream"] += time.time() - t2
      bad = np.flatnonzero(~np.asarray(ok)[real])
      if bad.size:
        raise FloatingPointError(
            f"sweep cell {cell.id} ({cell.label}): non-finite user embeddings (NaN or inf in "
            f"the memory or the model) for {bad.size} user(s), first user index "
            f"{start + bad[0]}; refusing to record metrics")
      stream.append(np.stack([np.asarray(x) for x in s_ranks])[:, real] if s_ranks
                    else np.zeros((0, int(real.sum())), np.int64))
      ranks.append(np.asarray(r)[real])
      logits.append(np.asarray(c)[real])
      if first is None:
        args = (jnp.asarray(split.items[idx]), jnp.asarray(split.ts[idx]),
                jnp.asarray(split.length[idx]))
        first = (args, mem, tuple(smem))
  eval_seconds = time.time() - t0
  ks = tuple(e.ks)
  row = {"cell": cell.id, "dataset": cell.dataset, "dataset_name": backbone.data.summary(),
         "model": cell.model, "backbone": run.model.name, "method": cell.method,
         "family": cell.family, "granularity": granularity(cell.family, run.model.name),
         "seed": cell.seed, "ratio_target": cell.ratio,
         "params": {name: p for name, p in cell.steps} if cell.steps else {},
         "train_key": cell.train_key, "num_users": int(n), "split": e.split}
  row.update(retrieval_metrics(np.concatenate(ranks), ks))
  logits = np.concatenate(logits)
  labels = candidate_labels(logits)
  users = np.broadcast_to(np.arange(n)[:, None], labels.shape)
  row.update(ranking_metrics(users, labels, logits, model.temperature))
  row["ranking_candidates"] = int(labels.shape[1])
  ref = reference_bytes(run)
  args, mem, smem = first
  req_events = split_request(args[0], args[1], args[2], e.query_len)[1]
  c = config.costs
  t_costs = time.time()
  if comp is None:
    full = Events(args[0], args[1], args[2])
    row["bytes_per_user"] = costs_lib.events_bytes_per_user(full)
    row["stored_bytes"] = float(np.mean(comp_lib.events_stored_bytes(*args[:3])))
    row["shared_bytes"] = 0
    row.update(costs_lib.recompute_costs(model, full, warmup=c.warmup, iters=c.iters).row())
  else:
    row["bytes_per_user"] = comp_lib.bytes_per_user(mem)
    row.update(comp_lib.cell_bytes_row(np.concatenate(ub, axis=1)))
    row["shared_bytes"] = comp_lib.shared_nbytes(mem)
    row.update(costs_lib.serving_costs(model, mem, req_events, closed_form=True,
                                       warmup=c.warmup, iters=c.iters).row())
    # Latency and peak-memory columns from the compressed read (issue 21).
    row.update(reads.read_costs(model, mem, req_events, warmup=c.warmup, iters=c.iters))
    stream = np.concatenate(stream, axis=1)
    for j, r in enumerate(requests):
      for k, v in retrieval_metrics(stream[j], ks).items():
        row[f"stream{r}/{k}"] = v
      row[f"stream{r}/bytes_per_user"] = comp_lib.bytes_per_user(smem[j])
      row[f"stream{r}/stored_bytes"] = float(np.mean(comp_lib.stored_bytes(
          smem[j], comp_lib.state_shape(comp, smem[j]))))
  stages["costs"] = time.time() - t_costs
  row.update({f"{k}_seconds": v for k, v in stages.items()})
  row["reference_bytes_per_user"] = ref
  row["stores_memory"] = comp is not None  # recompute keeps only the raw events
  row["compression_ratio"] = (row["reference_stored_bytes"] / row["stored_bytes"]
                              if comp is not None else None)  # stored bytes, same users
  row["train_seconds"] = backbone.info.get("train_seconds")
  row["best_valid_ndcg10"] = backbone.info.get("best_valid_ndcg10")
  row["eval_seconds"] = eval_seconds
  row["cell_seconds"] = time.time() - t0
  row["host"] = socket.gethostname()
  row["device"] = str(jax.devices()[0])
  row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  return row


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
      _check_workdir(model_dir, cell.run)
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
