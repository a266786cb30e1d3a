"""The main job: load data, train (resumably), evaluate compressors, report.

``train_and_evaluate(config, workdir)`` is what ``python -m malloc_jax.main`` and the
notebooks call. A workdir holds one training run: its checkpoints, the training-relevant
config (a rerun with a different one is refused instead of silently mixing runs), the
results (written atomically) and saved memories.

Training, evaluation and low-rank calibration run data-parallel over all devices JAX sees
(``malloc_jax.parallel``); ``config.num_devices`` (0 or absent: all) limits them, and 1 runs
on a single device exactly as before meshes existed. After ``jax.distributed.initialize()``
every host runs this same function on the same config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from malloc_jax import checkpoint as ckpt_lib
from malloc_jax import compressors as comp_lib
from malloc_jax import parallel
from malloc_jax.config_validation import validate_config
from malloc_jax.data.dataset import SequenceDataset, build_dataset
from malloc_jax.data.synthetic import SyntheticSpec, generate_sequences
from malloc_jax.evaluate import calibration_caches, evaluate, evaluate_by_length
from malloc_jax.fileio import write_json_atomic
from malloc_jax.metrics import popularity_ranks, retrieval_metrics
from malloc_jax.models import make_model
from malloc_jax.train import (
    TASKS,
    RankingSampler,
    Trainer,
    fit,
    make_optimizer,
    tie_query_key_init,
)

TRAIN_FIELDS = ("seed", "task", "data", "model", "train")
# train.* fields added after workdirs existed, with their defaults (see check_workdir).
OPTIONAL_TRAIN_FIELDS = {"bias_lr_scale": 1.0, "rank_score_offset": 0.0}


def load_data(config) -> SequenceDataset:
  """Builds the dataset named by ``config.data.source``.

  Raw files are parsed directly (``config.data.loader="raw"``) or through ArrayRecord files
  prepared once under ``config.data.data_dir`` (``"tfds"``); both give the same dataset.
  """
  d = config.data
  if d.source == "synthetic":
    spec = SyntheticSpec(**d.synthetic.to_dict())
    items, ts = generate_sequences(spec)
    return build_dataset("synthetic", items, ts, spec.num_items, d.max_len)
  name = f"{d.source}:{Path(d.path).name}"
  if d.get("loader", "raw") == "tfds":  # ArrayRecord prepared once under data.data_dir
    from malloc_jax.data import tfds_data
    builder = tfds_data.prepare(d.source, d.path, data_dir=d.get("data_dir", ""),
                                min_events=d.min_events)
    return tfds_data.load_dataset(builder, max_len=d.max_len, name=name)
  from malloc_jax.data import parsers  # the only module that reads raw files
  inter = parsers.load(d.source, d.path, min_events=d.min_events)
  items, ts = zip(*(inter.sequence(u) for u in range(len(inter))))
  return build_dataset(name, list(items), list(ts), inter.num_items, d.max_len)


def num_devices(config) -> int:
  """``config.num_devices`` (0: all devices; absent in older configs: 0)."""
  return config.get("num_devices", 0)


def build_model(config, num_items: int):
  m = config.model.to_dict()
  name = m.pop("name")
  return make_model(name, num_items, seed=config.seed, max_len=config.data.max_len, **m)


def _train_config(config) -> dict:
  """The fields that determine the trained weights, as plain JSON values."""
  full = json.loads(config.to_json_best_effort(sort_keys=True))
  return {k: full[k] for k in TRAIN_FIELDS if k in full}  # task: absent in old configs


def check_workdir(workdir: Path, config) -> None:
  """Refuses to resume a workdir trained with a different data/model/train config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "train_config.json"
  current = _train_config(config)
  if path.exists():
    saved = json.loads(path.read_text())
    # train.steps only says where training stops (the learning rate is constant), so a
    # finished run may be extended with more steps (train_model continues it).
    # Train fields added later are compared only when set away from their defaults, so a
    # workdir written before they existed still resumes (OPTIONAL_TRAIN_FIELDS).
    strip = lambda c: {**c, "train": {k: v for k, v in c.get("train", {}).items()
                                      if k != "steps" and not (k in OPTIONAL_TRAIN_FIELDS and
                                                               v == OPTIONAL_TRAIN_FIELDS[k])}}
    if strip(saved) != strip(current):
      diffs = [f"{k}" for k in TRAIN_FIELDS if saved.get(k) != current.get(k)]
      raise ValueError(f"workdir {workdir} holds a run trained with a different config "
                       f"(differs in: {', '.join(diffs)}); use another --workdir or delete it")
  else:
    write_json_atomic(path, current)
  _check_data_files(workdir, config)


def _check_data_files(workdir: Path, config) -> None:
  """Refuses a workdir trained on data files that have changed since (same path, new content).

  ``workdir/data_files.json`` keeps each raw file's size, mtime and SHA-256
  (``parsers.fingerprint``), the genre file of a ranking run (``data.genres``: its hard
  negatives) included; a file whose size or hash differs is named. Synthetic data are
  determined by the config (checked above) and by :func:`_check_dataset`.
  """
  if config.data.source == "synthetic":
    return
  from malloc_jax.data import parsers
  path = workdir / "data_files.json"
  current = parsers.fingerprint(config.data.source, config.data.path)
  genre = None
  if config.data.get("genres", ""):
    try:
      genre = parsers.file_fingerprint(parsers.genre_file(config.data.genres))
    except (OSError, ValueError) as err:
      raise FileNotFoundError(f"config.data.genres={config.data.genres!r}: {err}") from None
    current.append(genre)
  if not path.exists():
    write_json_atomic(path, current)
    return
  saved = {f["path"]: f for f in json.loads(path.read_text())}
  for f in current:
    old = saved.get(f["path"])
    if old is not None and (old["size"], old["sha256"]) != (f["size"], f["sha256"]):
      raise ValueError(
          f"data file {f['path']} has changed since workdir {workdir} was trained on it "
          f"(size {old['size']} -> {f['size']} bytes, sha256 {old['sha256'][:12]} -> "
          f"{f['sha256'][:12]}, modified {time.ctime(old['mtime_ns'] / 1e9)} -> "
          f"{time.ctime(f['mtime_ns'] / 1e9)}); its model would be evaluated on other data. "
          "Use another --workdir, or delete this one to retrain")
  paths = {f["path"] for f in current}
  if paths != set(saved):
    if genre is not None and paths - {genre["path"]} == set(saved):
      # A workdir written before genre files were recorded: its genre file is recorded now.
      write_json_atomic(path, current)
      return
    raise ValueError(f"workdir {workdir} was trained on data files {sorted(saved)}, not "
                     f"{sorted(f['path'] for f in current)}; use another --workdir")


def _check_dataset(workdir: Path, data: SequenceDataset) -> None:
  """Refuses a workdir whose model was trained on another dataset (users, items, content).

  ``workdir/dataset.json`` keeps the dataset's size and a SHA-256 of its arrays, so a changed
  dataset (edited files, another parser version, a changed generator) is reported as such
  before any checkpoint is read, not as an unreadable checkpoint.
  """
  h = hashlib.sha256()
  for a in (data.train.items, data.train.ts, data.train.length, data.test.items, data.test.ts,
            data.test.length, data.test.target, data.valid.target, data.popularity):
    h.update(np.ascontiguousarray(a).tobytes())
  current = {"users": len(data.test), "num_items": int(data.num_items), "sha256": h.hexdigest()}
  path = workdir / "dataset.json"
  if not path.exists():
    write_json_atomic(path, current)
    return
  saved = json.loads(path.read_text())
  if saved != current:
    diffs = [f"{k} {saved.get(k)} -> {current[k]}" for k in ("users", "num_items")
             if saved.get(k) != current[k]] or ["same sizes, different events"]
    raise ValueError(f"dataset {data.name} differs from the one workdir {workdir} was trained "
                     f"on ({'; '.join(diffs)}); use another --workdir, or delete this one to "
                     "retrain")


def _locked_workdir(fn):
  """Runs ``fn(config, workdir, ...)`` holding ``workdir``'s lock (one run per workdir)."""

  @functools.wraps(fn)
  def wrapper(config, workdir, *args, **kwargs):
    if workdir is None or not str(workdir).strip():
      raise ValueError(f"workdir={workdir!r}: expected a directory (--workdir=<dir>); an empty "
                       "one would write into the current directory")
    validate_config(config)
    with ckpt_lib.workdir_lock(workdir, fn.__name__):
      return fn(config, workdir, *args, **kwargs)

  return wrapper


def warm_start(params, source: dict, kept: list[str] | None = None) -> tuple[object, list[str]]:
  """``params`` (an ``nnx.State`` of parameters) with every leaf taken from ``source``.

  ``source`` is the nested dict of :func:`checkpoint.load_best_params` (same module tree).
  A leaf of the same shape is copied. A leaf that is larger along exactly one axis (a
  position table of a longer capacity: HSTU's ``rab_pos`` [H, max_len], the absolute
  ``pos_emb`` [max_len, D]) gets the source in its leading part and the source's last entry
  along that axis repeated over the rest (positions never trained start as the farthest one
  trained). Any other difference, or a leaf missing from ``source``, raises ValueError naming
  the leaf. Returns (new params, the names of the extended leaves).

  ``kept`` (a list, or None): a partial warm start, for converting a trained model into a
  variant of it (GQA-style "uptraining", Ainslie et al. 2023): a leaf that is missing from
  ``source`` or whose shape cannot be taken keeps its value in ``params`` (its init) and its
  name is appended to ``kept`` instead of raising. Only the position and time-bias tables
  (``rab_*``, ``pos_emb``) grow then: a single-head ``rab_pos`` [1, N] fills every head of a
  multi-head [H, N] table; a projection of another shape is never padded.
  """
  from flax import nnx
  pure = nnx.to_pure_dict(params)
  extended = []

  def fill(path, target):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    node = source
    for k in path:
      key = str(getattr(k, "key", k))
      if not isinstance(node, dict) or key not in node:
        if kept is not None:
          kept.append(f"{name} (not in the source)")
          return target
        raise ValueError(f"train.init_from: the source checkpoint has no parameter {name!r}")
      node = node[key]
    if isinstance(node, dict) and set(node) == {"value"}:
      node = node["value"]
    src = np.asarray(node)
    tgt_shape = tuple(np.shape(target))
    if src.shape == tgt_shape:
      return jnp.asarray(src, dtype=jnp.asarray(target).dtype)
    diff = [a for a, (s, t) in enumerate(zip(src.shape, tgt_shape, strict=False)) if s != t]
    growable = kept is None or "rab_" in name or "pos_emb" in name
    if (len(src.shape) != len(tgt_shape) or len(diff) != 1
        or src.shape[diff[0]] > tgt_shape[diff[0]] or not growable):
      if kept is not None:
        kept.append(f"{name} {src.shape} -> {tgt_shape} (shape differs)")
        return target
      raise ValueError(f"train.init_from: parameter {name!r} has shape {src.shape} in the "
                       f"source checkpoint and {tgt_shape} here (only a position table may "
                       "grow, along one axis)")
    a = diff[0]
    last = np.take(src, [src.shape[a] - 1], axis=a)
    pad = np.repeat(last, tgt_shape[a] - src.shape[a], axis=a)
    extended.append(f"{name} {src.shape} -> {tgt_shape}")
    return jnp.asarray(np.concatenate([src, pad], axis=a), dtype=jnp.asarray(target).dtype)

  new = jax.tree_util.tree_map_with_path(fill, pure)
  out = jax.tree.map(lambda x: x, params)  # replace_by_pure_dict works in place: a copy
  nnx.replace_by_pure_dict(out, new)
  return out, extended


def train_model(config, workdir: Path, data: SequenceDataset, print_fn=print):
  """Trains (or resumes, or reloads) the backbone; returns (model, training info)."""
  workdir = Path(workdir)
  _check_dataset(workdir, data)
  model = build_model(config, data.num_items)
  t = config.train
  sampler = ranking_sampler(config, data)  # None unless config.task == "ranking"
  if sampler is not None and t.get("rank_tied_qk", False):
    # W_k = W_q at init: leaves the ranking plateau (BENCHMARKS); HSTU's rab may start at
    # train.rank_score_offset (the cpu512 recipe: -3).
    tie_query_key_init(model, t.get("rank_score_offset", 0.0))
  # train.bias_lr_scale: HSTU's rab tables learn that many times faster (cpu512 recipe: 30).
  tx = make_optimizer(t.lr, t.weight_decay, bias_lr_scale=t.get("bias_lr_scale", 1.0))
  trainer = Trainer(model, tx, t.num_negatives,
                    dropout=config.model.dropout > 0, task=config.get("task", "retrieval"),
                    sampler=sampler, negative_sharing=t.get("negative_sharing", "batch"))
  val_cands = None if sampler is None else ranking_eval_candidates(config, data, "valid")
  # On several devices the state is replicated, and restored onto the same devices.
  mesh = parallel.data_mesh(num_devices(config))
  init = parallel.replicate(mesh, trainer.init_state)
  store = ckpt_lib.TrainCheckpoints(workdir / "checkpoints")
  target = {"train": init, "best": init["params"]}
  restored = store.restore(target)
  meta = {"step": 0, "best_metric": -1.0, "best_step": 0, "bad_evals": 0, "done": False,
          "train_seconds": 0.0}
  state, best = init, None
  if restored is None and t.get("init_from", ""):
    source, src_meta = ckpt_lib.load_best_params(t.init_from)
    params, extended = warm_start(init["params"], source)
    state = init = parallel.replicate(mesh, {"params": params,
                                              "opt_state": trainer.tx.init(params)})
    print_fn(f"initialized from {t.init_from} (best step {src_meta.get('best_step')}, "
             f"validation {src_meta.get('best_metric', float('nan')):.4f})"
             + (f"; extended: {', '.join(extended)}" if extended else ""))
  if restored is not None:
    step, saved, meta = restored
    state, best = saved["train"], saved["best"]
    extend = (meta["done"] and meta["step"] < t.steps
              and not (t.patience and meta["bad_evals"] >= t.patience))
    if extend:  # stopped by an earlier, smaller train.steps: continue to the new limit
      meta["done"] = False
      write_json_atomic(workdir / "train_config.json", _train_config(config))
    print_fn(f"resumed from checkpoint step {step}" + (" (training finished)"
                                                         if meta["done"] else "") +
             (f", extended to {t.steps} steps" if extend else ""))
  t_start = time.time() - meta["train_seconds"]
  valid_users = t.eval_users or None

  def validation(model) -> tuple[float, str]:
    """(best-model criterion, its log text): validation GAUC of the candidates for
    task="ranking", else validation NDCG@10 of the retrieval task."""
    if sampler is not None:
      from malloc_jax import ranking
      res = ranking.rank_cell(model, data.valid, val_cands, comp_lib.native(),
                              batch_size=config.eval.batch_size)
      m = res["metrics"]
      return m["GAUC"], f"GAUC {m['GAUC']:.4f} NDCG@10 {m['NDCG@10']:.4f}"
    if int(t.get("length_buckets", 0)) > 1:  # trimmed windows: the same ranks, faster
      m = evaluate_by_length(model, data.valid, comp_lib.native(), buckets=t.length_buckets,
                             batch_size=config.eval.batch_size, max_users=valid_users,
                             num_devices=num_devices(config))
    else:
      m = evaluate(model, data.valid, comp_lib.native(), batch_size=config.eval.batch_size,
                   max_users=valid_users, num_devices=num_devices(config)).metrics
    return m["NDCG@10"], f"NDCG@10 {m['NDCG@10']:.4f} HR@10 {m['HR@10']:.4f}"

  def save(step, state):
    meta.update(train_seconds=time.time() - t_start, step=step)
    store.save(step, {"train": state, "best": best if best is not None else state["params"]},
               meta)

  def on_step(step, st, logs):
    nonlocal best
    stop = False
    if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
      metric, shown = validation(trainer.merge(st["params"]))
      improved = metric > meta["best_metric"]
      if improved:
        best = jax.tree.map(jnp.copy, st["params"])
        meta.update(best_metric=metric, best_step=step, bad_evals=0)
      else:
        meta["bad_evals"] += 1
      print_fn(f"  valid {shown}{' (best)' if improved else ''}")
      stop = bool(t.patience) and meta["bad_evals"] >= t.patience
    if stop or step == t.steps:
      meta["done"] = True
    if stop or step % t.checkpoint_every == 0 or step == t.steps:
      save(step, st)
    return stop

  if not meta["done"]:
    state = fit(trainer, data, steps=t.steps, batch_size=t.batch_size, seed=config.seed,
                state=state, start_step=meta["step"], log_every=t.log_every, on_step=on_step,
                print_fn=print_fn, num_devices=num_devices(config),
                length_buckets=int(t.get("length_buckets", 0)))
    store.wait()
  store.close()
  params = best if (t.eval_every and best is not None) else state["params"]
  info = {"train_seconds": meta["train_seconds"], "steps": meta.get("step", t.steps),
          "best_step": meta["best_step"], "best_valid_ndcg10": meta["best_metric"],
          "update_compiles": trainer.compiles}
  return trainer.merge(params), info


# --- config.task = "ranking" (target-aware, M-FALCON; see malloc_jax.ranking) --------------


def _topics(config):
  """(members [Z, S], group [V + 1]) of the item groups of ``config``'s data, else (None, None).

  Synthetic ``topics`` data: the generator's topics. Real data with ``config.data.genres``
  (a MovieLens ``movies.dat`` or ML-100K ``u.item``): each item's primary (first-listed)
  genre, items mapped to the dataset's dense ids (:func:`item_genre_groups`).
  """
  d = config.data
  if d.source == "synthetic":
    if d.synthetic.kind != "topics":
      return None, None
    from malloc_jax.data.synthetic import topic_index
    members, topic, _ = topic_index(SyntheticSpec(**d.synthetic.to_dict()))
    return members, topic
  if not d.get("genres", ""):
    return None, None
  return item_genre_groups(d.source, d.path, d.genres, d.min_events)


@functools.lru_cache(maxsize=4)
def item_genre_groups(source: str, path: str, genres: str, min_events: int):
  """(members [G, S], item_group [V + 1]) of the primary genres of a real dataset's items.

  Args:
    source, path, min_events: the dataset (``config.data``), parsed for its dense item ids.
    genres: the genre file (``parsers.load_genres``: ``movies.dat`` or ``u.item``).

  Raises:
    ValueError / FileNotFoundError naming the genre file: missing, malformed, or without a
    line for one of the dataset's items.
  """
  from malloc_jax.data import item_groups, parsers
  inter = parsers.load(source, path, min_events=min_events)
  try:
    g = parsers.load_genres(genres)
  except FileNotFoundError as err:
    raise FileNotFoundError(f"config.data.genres={genres!r}: {err}") from None
  return item_groups.groups_from_labels(g.primary_for_items(inter.item_ids))


def ranking_sampler(config, data: SequenceDataset):
  """The training impressions of ``config.task = "ranking"`` (None for retrieval).

  ``config.train.rank_negatives`` = {uniform, popularity, hard} counts, ``train.rank_loss``
  ("bce" | "listwise"), ``train.rank_positions`` (impressions per window); hard negatives
  are the other members of the positive's topic (synthetic ``topics`` data) or primary genre
  (real data with ``data.genres``), uniform among them.
  """
  task = config.get("task", "retrieval")
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  if task == "retrieval":
    return None
  t = config.train
  neg = t.get("rank_negatives", {"uniform": 10, "popularity": 0, "hard": 0})
  members, topic = _topics(config)
  return RankingSampler(uniform=neg["uniform"], popularity=neg["popularity"],
                        hard=neg["hard"], item_popularity=data.popularity, groups=members,
                        item_group=topic, loss=t.get("rank_loss", "bce"),
                        positions=t.get("rank_positions", 1))


def ranking_eval_candidates(config, data: SequenceDataset, split: str):
  """[U, 1 + K] candidates of each user of ``split`` (positive first): on topics data the
  target's whole topic plus ``eval.rank_easy`` items of other topics; on real data with
  ``data.genres`` ``eval.rank_hard`` (default 9) other items of the target's primary genre
  plus ``eval.rank_easy`` (default 10) items of other genres
  (``item_groups.grouped_candidates``); else ``eval.rank_negatives`` uniform items."""
  from malloc_jax import ranking
  from malloc_jax.data.synthetic import ranking_candidates
  target = data.eval_set(split).target
  members, group = _topics(config)
  seed = config.seed + (1 if split == "test" else 2)
  if members is not None and config.data.source != "synthetic":
    from malloc_jax.data.item_groups import grouped_candidates
    return grouped_candidates(target, members, group, config.eval.get("rank_hard", 9),
                              config.eval.get("rank_easy", 10), seed=seed)
  if members is not None:
    spec = SyntheticSpec(**config.data.synthetic.to_dict())
    return ranking_candidates(spec, target, members.shape[1] - 1,
                              config.eval.get("rank_easy", 10), seed=seed)
  return ranking.sample_candidates(target, data.num_items,
                                   config.eval.get("rank_negatives", 19), seed=seed)


def ranking_rows(config, model, data: SequenceDataset, comps, print_fn=print) -> list[dict]:
  """Serves every compressor's memory to the test users and ranks their candidates."""
  from malloc_jax import ranking
  e = config.eval
  split = data.eval_set(e.split)
  cands = ranking_eval_candidates(config, data, e.split)
  if e.max_users:
    cands = cands[:e.max_users]
  rows, native = [], None
  for label, comp in sorted(comps.items(), key=lambda kv: kv[0] != "native"):
    print_fn(f"ranking with {label} ...")
    res = ranking.rank_cell(model, split, cands, comp, batch_size=e.batch_size,
                            query_len=e.query_len, window=e.window)
    native = res if label == "native" else native
    row = {"method": label, "bytes_per_user": res["bytes_per_user"],
           **{k: res["metrics"][k] for k in ("AUC", "GAUC", "logloss", "NDCG@10")}}
    if native is not None:
      row["dGAUC"], row["se_dGAUC"] = ranking.paired_se(res["per_user"]["auc"],
                                                          native["per_user"]["auc"])
    rows.append(row)
  return rows


def format_ranking_table(rows: list[dict]) -> str:
  lines = ["| method | AUC | GAUC | logloss | NDCG@10 | ΔGAUC vs native (SE) | bytes/user |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    d = f"{r['dGAUC']:+.4f} ({r['se_dGAUC']:.4f})" if "dGAUC" in r else "-"
    lines.append(f"| {r['method']} | {r['AUC']:.4f} | {r['GAUC']:.4f} | {r['logloss']:.4f} | "
                 f"{r['NDCG@10']:.4f} | {d} | {r['bytes_per_user']:,.0f} |")
  return "\n".join(lines)


def model_cache_spec(config):
  """The abstract native Cache (batch 1) of ``config``'s model, or None when its memory is
  not a KV cache (a trained variant with its own layout: only native / recompute apply).

  Built with ``nnx.eval_shape``: no weights are allocated.
  """
  from flax import nnx
  model = nnx.eval_shape(lambda: build_model(config, 2))
  if hasattr(model, "empty_memory"):
    return None
  heads, dk, dv = model.head_dims()
  return comp_lib.cache_spec(model.memory_layers(), heads, config.data.max_len, dk, dv)


def resolve_compressors(config) -> dict[str, tuple[str, dict]]:
  """``{label: (method, params)}`` of ``config.compressors`` with ratios and "auto" resolved
  for the model's cache shape (before any training, so a bad setting fails early)."""
  cache = model_cache_spec(config)
  out = {}
  for label, spec in config.compressors.items():
    params = spec.to_dict()
    name = params.pop("name")
    try:
      out[label] = (name, params if cache is None
                    else comp_lib.resolve_params(name, params, cache))
    except ValueError as err:
      raise ValueError(f"config.compressors.{label}: {err}") from None
  return out


def make_compressors(config, model, data: SequenceDataset,
                     resolved: dict | None = None) -> dict[str, comp_lib.Compressor]:
  """Builds the configured compressors; calibrated methods (low rank) fit on validation
  histories of ``data`` (``config.eval.calibration_users`` users)."""
  resolved = resolve_compressors(config) if resolved is None else resolved
  heads, dk, dv = model.head_dims()
  shape = comp_lib.CacheShape(model.memory_layers(), heads, config.data.max_len, dk, dv)
  caches = lambda name: lambda: calibration_caches(
      model, data.valid, num_users=config.eval.calibration_users, seed=config.seed,
      num_devices=num_devices(config), signals=comp_lib.get_spec(name).calibration_signals)
  return {label: comp_lib.build_compressor(name, params, shape, caches(name))
          for label, (name, params) in resolved.items()}


def _json_params(params: dict) -> dict:
  return {k: v if isinstance(v, int | float | str | bool) or v is None else str(v)
          for k, v in params.items()}


def format_table(rows: list[dict]) -> str:
  head = "| method | HR@10 | NDCG@10 | MRR | stored B/user | buffer B/user | ratio |"
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in rows:
    b = r.get("bytes_per_user")
    lines.append(f"| {r['method']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['MRR']:.4f} | "
                 + (f"{r['stored_bytes']:,.0f} | {b:,.0f} | {r['compression_ratio']:.2f}x |"
                    if b else "- | - | - |"))
  return "\n".join(lines)


@_locked_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, print_fn=print) -> dict:
  """Runs the whole job; returns the results dict also written to ``workdir/results.json``."""
  validate_config(config)
  resolved = resolve_compressors(config)
  workdir = Path(workdir)
  check_workdir(workdir, config)
  t0 = time.time()
  data = load_data(config)
  print_fn(data.summary())
  print_fn(parallel.describe(parallel.data_mesh(num_devices(config))))
  model, info = train_model(config, workdir, data, print_fn)
  if config.get("task", "retrieval") == "ranking":
    rows = ranking_rows(config, model, data, make_compressors(config, model, data), print_fn)
    results = {"dataset": data.summary(), "split": config.eval.split, "task": "ranking",
               "train": info, "rows": rows, "seconds": time.time() - t0,
               "devices": [str(d) for d in jax.devices()]}
    ckpt_lib.write_json_atomic(workdir / "results.json", results)
    print_fn(format_ranking_table(rows))
    print_fn(f"results: {workdir / 'results.json'}  ({results['seconds']:.0f}s)")
    return results
  split = data.eval_set(config.eval.split)
  e = config.eval
  ks = tuple(e.ks)
  pop = retrieval_metrics(popularity_ranks(data.popularity, split.target), ks)
  rows = [{"method": "popularity", **pop}]
  comps = make_compressors(config, model, data, resolved)
  for label, comp in sorted(comps.items(), key=lambda kv: kv[0] != "native"):
    print_fn(f"evaluating {label} ...")
    res = evaluate(model, split, comp, batch_size=e.batch_size, ks=ks, query_len=e.query_len,
                   window=e.window, max_users=e.max_users or None,
                   num_devices=num_devices(config))
    rows.append({"method": label, "params": _json_params(resolved[label][1]), **res.row()})
  native_row = next((r for r in rows if r["method"] == "native"), None)
  # Stored bytes of the same users, native over method (issue 14); buffer bytes beside them.
  ref = native_row["stored_bytes"] if native_row else None
  for r in rows[1:]:
    r["compression_ratio"] = (ref / r["stored_bytes"]) if ref else float("nan")
  results = {"dataset": data.summary(), "split": e.split, "train": info, "rows": rows,
             "seconds": time.time() - t0, "devices": [str(d) for d in jax.devices()],
             "num_devices": parallel.num_shards(parallel.data_mesh(num_devices(config)))}
  write_json_atomic(workdir / "results.json", results)
  print_fn(format_table(rows))
  print_fn(f"results: {workdir / 'results.json'}  ({results['seconds']:.0f}s)")
  return results
