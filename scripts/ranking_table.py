r"""Target-aware ranking on synthetic ``topics`` histories: which memories keep the evidence.

Trains a backbone for ranking (``task="ranking"``: at 16-32 positions of each window the
true next item against its 9 topic mates and 10 uniform items, listwise softmax
cross-entropy, candidates read the history M-FALCON style, W_k = W_q at init: the design
that learns, BENCHMARKS.md), then serves every test user's memory through each compressor at 2x..32x and ranks the
user's impression (the true next item, every other member of its topic as hard negatives,
uniform items of other topics as easy ones). Prints a table of AUC, GAUC, logloss and
candidate NDCG@10 with the paired standard error of each row's GAUC and NDCG@10 difference
against the native memory over the same users, plus the Bayes-optimal ranker (float64,
whole history and truncated memories) and a history-blind ranker (training popularity of
the candidates), and the fraction of the Bayes GAUC lift over history-blind each row reaches.

  # 2 CPU cores, about 8 minutes on a shared machine (README): SASRec, 240 s of training
  python scripts/ranking_table.py --out runs/ranking_cpu.json
  # 2 CPU cores, about an hour: HSTU at 512 events, 55 minutes of training (BENCHMARKS.md)
  python scripts/ranking_table.py --preset=cpu512 --out runs/ranking_cpu512.json
  # one H200, about 5-7 minutes of wall time: HSTU at 1,024 events, 150 s of training
  python scripts/ranking_table.py --preset=gpu --out runs/ranking_gpu.json
  # plus a row per trained variant, each trained for ranking by the same steps/seconds rule
  # and served from its own memory (variants without a multi-position training pass train
  # one impression per window; the row label says so):
  python scripts/ranking_table.py --variants=all --out runs/ranking_variants.json
  # HSTU at 512 events once, kept; then every variant against it without retraining it, and
  # Quest read per query (BENCHMARKS.md, "Variant rows at 512 events"):
  python scripts/ranking_table.py --preset=cpu512 --steps=13628 --save_backbone=runs/bb512 \
      --out runs/main512.json
  python scripts/ranking_table.py --preset=cpu512 --steps=13628 --backbone=runs/bb512 \
      --variants=all --variant_seconds=300 --methods=streaming --ratios=8 --out runs/var512.json
  python scripts/ranking_table.py --preset=cpu512 --steps=13628 --backbone=runs/bb512 \
      --methods= --quest_page=4 --out runs/quest512.json
  # the variants converted from the trained backbone and uptrained (GQA-style), with a
  # control row (the backbone itself trained for the same budget):
  python scripts/ranking_table.py --preset=cpu512 --steps=13628 --backbone=runs/bb512 \
      --variants=all --variant_init=backbone --variant_seconds=150 --out runs/uptrain512.json
  # learning curve only (no table), any backbone, e.g. HSTU on the CPU:
  python scripts/ranking_table.py --model=hstu --length=128 --train_only --steps=2500

The "oracle vote" rows are NOT deployable: their eviction reads the attention of the
request's own candidates (``ranking.candidate_signals``), which a memory compressed before
the request cannot know; they bound what attention-based eviction can reach. Standard errors
are paired over users (``ranking.paired_se``; bootstrap CIs are the job of
``malloc_jax.stats`` once it exists).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from malloc_jax import compressors as C
from malloc_jax import config_lib, ranking
from malloc_jax.checkpoint import (
  CheckpointError,
  load_memories,
  load_memories_meta,
  save_memories,
  write_json_atomic,
)
from malloc_jax.compressors.budget import cache_spec, ratio_table
from malloc_jax.compressors.registry import make_compressor
from malloc_jax.data.dataset import build_dataset
from malloc_jax.data.synthetic import (
  SyntheticSpec,
  bayes_ranking_scores,
  generate_sequences,
  memory_views,
  ranking_candidates,
  topic_index,
)
from malloc_jax.evaluate import calibration_caches
from malloc_jax.experiment import warm_start
from malloc_jax.models import VARIANT_SPECS, make_model
from malloc_jax.sweep import multi_position_ranking
from malloc_jax.train import RankingSampler, Trainer, fit, make_optimizer, tie_query_key_init

PRESETS = {
    # 2 CPU cores (shared), about 8 minutes: SASRec, the backbone that learns the memory
    # lookup within a CPU budget (BENCHMARKS.md, target-aware ranking).
    "cpu": dict(length=256, users=2000, items=1000, topic_size=10, model="sasrec", dim=32,
                heads=1, layers=1, steps=3000, batch=16, positions=16, lr=3e-3,
                rank_loss="listwise", uniform_neg=10, hard_neg=9, tied_qk=True,
                max_train_seconds=240.0, eval_users=500, eval_every=250),
    # 2 CPU cores (shared), about an hour: HSTU at 512 events, 55 minutes of training; the
    # top layer computes only the candidates' rows, the rab tables learn 30x faster and start
    # at -3 (BENCHMARKS.md, HSTU at 512 events on the CPU, fourth session).
    "cpu512": dict(length=512, users=2000, items=1000, topic_size=10, model="hstu", dim=32,
                   heads=1, layers=1, steps=100000, batch=16, positions=8, lr=3e-3,
                   rank_loss="listwise", uniform_neg=10, hard_neg=9, tied_qk=True,
                   score_offset=-3.0, bias_lr_scale=30.0, max_train_seconds=3300.0,
                   eval_users=500, eval_every=1000),
    # One H200, about 5-7 minutes of wall time: HSTU (the acceptance backbone) at
    # 1,024 events; training stops at max_train_seconds whatever the steps.
    "gpu": dict(length=1024, users=8000, items=1000, topic_size=10, model="hstu", dim=64,
                heads=2, layers=2, steps=20000, batch=64, positions=32, lr=3e-3,
                rank_loss="listwise", uniform_neg=10, hard_neg=9, tied_qk=True,
                max_train_seconds=150.0, eval_users=2000, eval_every=500),
}
_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset (flags override).")
_INT = {k: flags.DEFINE_integer(k, None, f"Override the preset's {k}.")
        for k in ("length", "users", "items", "topic_size", "dim", "heads", "layers", "steps",
                  "batch", "eval_users", "eval_every", "easy", "uniform_neg", "hard_neg",
                  "popularity_neg", "seed", "positions")}
_LR = flags.DEFINE_float("lr", None, "Override the preset's learning rate.")
_LOSS = flags.DEFINE_enum("rank_loss", None, ["bce", "listwise"],
                          "Override the preset's ranking loss (train.rank_loss).")
_MAX_S = flags.DEFINE_float("max_train_seconds", None,
                            "Stop training after this many seconds (as well as --steps).")
_TIED = flags.DEFINE_bool("tied_qk", None, "Override the preset: initialize W_k = W_q "
                          "(train.tie_query_key_init).")
_OFFSET = flags.DEFINE_float("score_offset", None, "Override the preset: HSTU attention "
                             "score offset at init (with --tied_qk).")
_QK_SCALE = flags.DEFINE_float("qk_scale", None, "Override the preset: scale of the tied "
                               "query/key projection at init (train.tie_query_key_init).")
_WARM_LEN = flags.DEFINE_integer("warm_length", None, "Override the preset: curriculum, first "
                                  "train on each user's last warm_length events (0: none), then "
                                  "warm-start the full-length model from it "
                                  "(experiment.warm_start grows the position tables).")
_WARM_S = flags.DEFINE_float("warm_seconds", None, "Override the preset: training seconds of "
                             "the warm_length stage.")
_WARM_BATCH = flags.DEFINE_integer("warm_batch", None, "Override the preset: batch of the "
                                   "warm_length stage (default: batch).")
_BIAS_LR = flags.DEFINE_float("bias_lr_scale", None, "Override the preset: learning-rate "
                              "multiplier of HSTU's rab tables (train.make_optimizer).")
_TRAIN_ONLY = flags.DEFINE_bool("train_only", False,
                                "Learning curve only: skip the serving table.")
_MODEL = flags.DEFINE_string("model", None, "Backbone (hstu, sasrec, or a variant).")
_RATIOS = flags.DEFINE_list("ratios", "2,4,8,16,32", "Memory reductions.")
_METHODS = flags.DEFINE_list("methods", "streaming,random,h2o,snapkv,lowrank,kivi,uniform",
                             "Post-hoc methods (native always runs; oracle rows with h2o).")
_VARIANTS = flags.DEFINE_list("variants", [], "Trained variants, each trained for ranking with "
                              "the preset's settings and budget and served from its own "
                              "memory (a row each); 'all' = every variant.")
_SAVE = flags.DEFINE_string("save_backbone", None, "Save the trained main backbone's "
                            "parameters (Orbax) and the settings that made it in this directory.")
_LOAD = flags.DEFINE_string("backbone", None, "Load the main backbone from a --save_backbone "
                            "directory instead of training it; its data and model settings must "
                            "equal this run's (checked before anything runs).")
_VINIT = flags.DEFINE_enum("variant_init", "scratch", ["scratch", "backbone"],
                           "How each --variants model starts: its own init ('scratch'), or "
                           "'backbone': converted from the trained main backbone (every "
                           "parameter of the same shape copied, the others at init) and "
                           "uptrained (GQA-style), with a control row: the main backbone "
                           "itself trained for the same budget.")
_VSEC = flags.DEFINE_float("variant_seconds", None, "Training seconds of each variant (and of "
                           "the control row) instead of the main backbone's rule.")
_QUEST = flags.DEFINE_integer("quest_page", 0, "Also serve Quest read per query "
                              "(ranking.quest_rank_cell) with pages of this many events, at "
                              "each --ratios read budget (pages = capacity / page / ratio), "
                              "with the bound of the whole score and, for HSTU, of q . k "
                              "alone; 0: not served.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.")

# Settings that define the data and the backbone: a --backbone must have been trained with
# the same values.
BACKBONE_FIELDS = ("length", "users", "items", "topic_size", "seed", "model", "dim", "heads",
                   "layers")


def settings() -> dict:
  s = dict(dict(easy=10, uniform_neg=10, hard_neg=9, popularity_neg=0, seed=0,
                rank_loss="bce", positions=1, tied_qk=False, score_offset=0.0, qk_scale=1.0,
                bias_lr_scale=1.0,
                warm_length=0, warm_seconds=0.0, warm_batch=0,
                max_train_seconds=float("inf")),
           **PRESETS[_PRESET.value])
  for k, f in _INT.items():
    if f.value is not None:
      s[k] = f.value
  if _LR.value is not None:
    s["lr"] = _LR.value
  if _LOSS.value is not None:
    s["rank_loss"] = _LOSS.value
  if _TIED.value is not None:
    s["tied_qk"] = _TIED.value
  if _OFFSET.value is not None:
    s["score_offset"] = _OFFSET.value
  if _MAX_S.value is not None:
    s["max_train_seconds"] = _MAX_S.value
  if _QK_SCALE.value is not None:
    s["qk_scale"] = _QK_SCALE.value
  if _BIAS_LR.value is not None:
    s["bias_lr_scale"] = _BIAS_LR.value
  for k, f in (("warm_length", _WARM_LEN), ("warm_seconds", _WARM_S),
               ("warm_batch", _WARM_BATCH)):
    if f.value is not None:
      s[k] = f.value
  if _MODEL.value:
    s["model"] = _MODEL.value
  return s


def lift_fraction(gauc, blind, bayes):
  return (gauc - blind) / (bayes - blind) if bayes != blind else float("nan")


def reference_gauc(spec, hist, last, cands, popularity) -> dict:
  """GAUC of the Bayes-optimal ranker (whole history, float64) and of the history-blind one
  (training popularity of the candidates) on impressions ``cands`` [U, 1 + K]."""
  p = bayes_ranking_scores(spec, hist, last, cands)
  q = np.clip(p / p.sum(1, keepdims=True), 1e-12, 1 - 1e-12)
  bayes = ranking.impression_metrics(np.log(q) - np.log1p(-q))[0]["GAUC"]
  blind = ranking.impression_metrics(np.log(popularity[cands].astype(np.float64) + 1.0))[0]
  return {"bayes": bayes, "blind": blind["GAUC"]}


def variant_names(names: list[str]) -> list[str]:
  """The ``--variants`` list ('all': every registered trained variant), checked. A plain
  backbone (hstu, sasrec) may be listed too: trained by the variants' rule, it is their
  same-budget reference row."""
  if names == ["all"]:
    return sorted(VARIANT_SPECS)
  bad = [n for n in names if n not in VARIANT_SPECS and n not in ("hstu", "sasrec")]
  if bad:
    raise ValueError(f"--variants: {bad} unknown; expected names from {sorted(VARIANT_SPECS)}, "
                     "hstu, sasrec or 'all'")
  return list(names)


def variant_options(name: str, s: dict) -> dict:
  """Model arguments of trained variant ``name`` at the preset's width and depth: the
  variant's own fields from ``configs/<name>.py`` (as the sweep builds it); head-sharing
  variants (MQA, GQA) keep that config's query heads so that heads are shared."""
  section = _sweep_config()._variant_section(
      name, f"runlocal=False,steps=-1,max_len={s['length']},data=synthetic,path=",
      config_lib.base_config(f"max_len={s['length']}")).to_dict()
  heads = s["heads"]
  if name.endswith(("_mqa", "_gqa")):
    heads = max(heads, section["heads"])
  opts = {k: v for k, v in section.items()
          if k not in ("name", "dim", "num_layers", "dropout", "temperature", "heads")}
  return {"heads": heads, **opts}


def _sweep_config():
  path = Path(__file__).resolve().parents[1] / "configs" / "sweep.py"
  spec = importlib.util.spec_from_file_location("_ranking_table_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _strkeys(d):
  """A pure parameter dict with string keys (as Orbax and ``warm_start`` read them)."""
  return {str(k): _strkeys(v) for k, v in d.items()} if isinstance(d, dict) else d


def save_backbone(directory: str, model, s: dict, info: dict) -> None:
  """The trained main backbone's parameters and the settings and curve that made it."""
  meta = {"settings": {k: s[k] for k in BACKBONE_FIELDS}, "all_settings": s,
          "info": {k: info[k] for k in ("curve", "train_seconds", "steps_done", "tied_qk")}}
  params = jax.tree.map(np.asarray, _strkeys(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  save_memories(directory, params, json.loads(json.dumps(meta, default=float)))
  print(f"saved the backbone to {directory}", flush=True)


def check_backbone(directory: str, s: dict) -> dict:
  """The meta of a --save_backbone directory, after checking that it was trained with this
  run's data and model settings (ValueError naming the first field that differs)."""
  try:
    meta = load_memories_meta(directory)  # the newest save, as load_memories restores
  except (CheckpointError, FileNotFoundError) as err:
    raise CheckpointError(f"--backbone={directory}: no saved backbone there (expected a "
                          f"--save_backbone directory): {err}") from None
  for k in BACKBONE_FIELDS:
    if meta["settings"].get(k) != s[k]:
      raise ValueError(f"--backbone={directory}: it was trained with {k}="
                       f"{meta['settings'].get(k)!r}, this run has {k}={s[k]!r}")
  return meta


def load_backbone(directory: str, s: dict, num_items: int):
  """(model, info) of a --save_backbone directory (settings checked by check_backbone)."""
  meta = check_backbone(directory, s)
  model = make_model(s["model"], num_items, dim=s["dim"], num_layers=s["layers"],
                     max_len=s["length"], dropout=0.0, seed=s["seed"], heads=s["heads"])
  state = nnx.state(model, nnx.Param)
  like = jax.tree.map(np.asarray, _strkeys(nnx.to_pure_dict(state)))
  params, _ = load_memories(directory, like)
  new, extended = warm_start(state, params)  # same shapes: an exact copy (checked)
  assert not extended, extended
  nnx.update(model, new)
  print(f"loaded the backbone from {directory} ({meta['info']['steps_done']} steps, "
        f"{meta['info']['train_seconds']:.0f}s of training)", flush=True)
  return model, dict(meta["info"], loaded_from=str(directory))


def train_ranker(name: str, options: dict, s: dict, data, sampler, valid, init=None,
                 partial: bool = False):
  """Trains backbone ``name`` for ranking with the preset's settings; returns (model, info).

  The same rule for every backbone: ``s["steps"]`` steps or ``s["max_train_seconds"]`` of
  training (validation excluded), whichever comes first. W_k = W_q at init where the layers
  have a q/k projection (``tie_query_key_init``); a variant without one (MLA, RWKV, LSH)
  trains from its plain init and ``info["tied_qk"]`` says so.

  Args:
    name: backbone. options: extra model arguments (``heads`` and variant fields).
    valid: (validation candidates [U, C], {"bayes", "blind"} GAUCs, hard negatives per row).
    init: parameters (``nnx.to_pure_dict``) of a shorter-length model to start from
      (``experiment.warm_start``; no W_k = W_q tying then), or None.
    partial: ``init`` is another model (a variant converted from the main backbone): W_k =
      W_q tying is applied first where possible, then every parameter of the same shape is
      taken from ``init`` and the others keep their init (``info["kept"]`` names them).

  Returns:
    (trained model, {"curve", "train_seconds", "steps_done", "tied_qk", "eval_seconds"}).
  """
  val_cands, val_ref, hard_eval = valid
  opts = {"heads": s["heads"], **options}
  model = make_model(name, data.num_items, dim=s["dim"], num_layers=s["layers"],
                     max_len=s["length"], dropout=0.0, seed=s["seed"], **opts)
  if not multi_position_ranking(model) and s["positions"] > 1:
    print(f"{name}: one impression per window (no multi-position training pass)", flush=True)
    sampler = dataclasses.replace(sampler, positions=1)
  tied, kept = False, None
  if init is not None and not partial:
    params, extended = warm_start(nnx.state(model, nnx.Param), init)
    nnx.update(model, params)
    print(f"{name}: warm start, grown {extended}", flush=True)
  elif s["tied_qk"]:
    try:
      tie_query_key_init(model, s["score_offset"], s["qk_scale"])
      tied = True
    except ValueError as err:
      if name in ("hstu", "sasrec"):
        raise
      print(f"{name}: trained without W_k = W_q ({err})", flush=True)
  if init is not None and partial:
    kept = []
    params, extended = warm_start(nnx.state(model, nnx.Param), init, kept=kept)
    nnx.update(model, params)
    n_all = len(jax.tree.leaves(params))
    print(f"{name}: converted from the backbone: {n_all - len(kept)} of {n_all} parameter "
          f"arrays taken (grown: {extended}); kept at init: {kept}", flush=True)
  trainer = Trainer(model, make_optimizer(s["lr"], 0.0, bias_lr_scale=s["bias_lr_scale"]), 0, dropout=False, task="ranking",
                    sampler=sampler)
  curve = []
  t_train = time.time()
  eval_seconds = [0.0]

  def on_step(step, state, logs):
    stop = time.time() - t_train - eval_seconds[0] > s["max_train_seconds"]
    if step % s["eval_every"] == 0 or step == s["steps"] or stop:
      t_eval = time.time()
      res = ranking.rank_cell(trainer.merge(state["params"]), data.valid, val_cands,
                              C.native(), batch_size=64)
      m = res["metrics"]
      # Top-1 among the positive and its topic's other members (the probe metric).
      top1_hard = float(ranking.per_user_candidate_metrics(
          res["logits"][:, :1 + hard_eval])["top1"].mean())
      lift = lift_fraction(m["GAUC"], val_ref["blind"], val_ref["bayes"])
      curve.append({"step": step, "seconds": time.time() - t_train, "loss": logs.get("loss"),
                    "valid_GAUC": m["GAUC"], "valid_NDCG@10": m["NDCG@10"],
                    "valid_top1_hard": top1_hard, "valid_lift": lift,
                    "train_seconds": time.time() - t_train - eval_seconds[0]})
      print(f"  {name} step {step}: valid GAUC {m['GAUC']:.4f} ({lift:.0%} of the Bayes lift)"
            f" NDCG@10 {m['NDCG@10']:.4f} top-1 (topic) {top1_hard:.3f} loss "
            f"{logs.get('loss', float('nan')):.4f} ({time.time() - t_train:.0f}s, "
            f"{time.time() - t_train - eval_seconds[0]:.0f}s training)", flush=True)
      eval_seconds[0] += time.time() - t_eval
    return stop

  state = fit(trainer, data, steps=s["steps"], batch_size=s["batch"], seed=s["seed"],
              log_every=max(1, s["eval_every"] // 5), on_step=on_step)
  train_seconds = time.time() - t_train - eval_seconds[0]
  steps_done = curve[-1]["step"] if curve else 0
  print(f"{name}: trained {steps_done} steps in {train_seconds:.0f}s (+{eval_seconds[0]:.0f}s "
        "validation)", flush=True)
  return trainer.merge(state["params"]), {"curve": curve, "train_seconds": train_seconds,
                                          "steps_done": steps_done, "tied_qk": tied,
                                          "positions": sampler.positions,
                                          "eval_seconds": eval_seconds[0], "kept": kept}


def main(argv):
  del argv
  s = settings()
  variant_list = variant_names(_VARIANTS.value)  # checked before any training
  if _LOAD.value:
    check_backbone(_LOAD.value, s)  # before the data and references are built
    if s["warm_length"]:
      raise ValueError("--backbone with --warm_length: the curriculum trains the backbone, "
                       "which is loaded here")
  t_all = time.time()
  print(f"devices: {jax.devices()}  settings: {s}", flush=True)
  spec = SyntheticSpec(kind="topics", num_users=s["users"], num_items=s["items"],
                       topic_size=s["topic_size"], min_len=int(0.9 * s["length"]),
                       max_len=s["length"], lag=1, p_copy=0.5, p_noise=0.05, branching=2,
                       seed=s["seed"])
  items, stamps = generate_sequences(spec)
  data = build_dataset(f"topics-{s['length']}", items, stamps, spec.num_items, s["length"])
  print(data.summary(), flush=True)
  members, topic, _ = topic_index(spec)
  S = members.shape[1]
  hard_eval = S - 1
  sampler = RankingSampler(uniform=s["uniform_neg"], popularity=s["popularity_neg"],
                           hard=s["hard_neg"], item_popularity=data.popularity, groups=members,
                           item_group=topic, loss=s["rank_loss"],
                           positions=s["positions"])
  n_eval = min(s["eval_users"], len(data.test))
  test = data.test
  cands = ranking_candidates(spec, test.target[:n_eval], hard_eval, s["easy"], seed=1)
  n_val = min(256, len(data.valid))
  val_cands = ranking_candidates(spec, data.valid.target[:n_val], hard_eval, s["easy"],
                                 seed=2)
  # Reference GAUCs of the validation impressions: the learning curve reports the fraction
  # of the Bayes lift over the history-blind ranker each evaluation reaches.
  val = data.valid
  val_hist = [val.items[u, :max(val.length[u] - 1, 0)] for u in range(n_val)]
  val_last = np.array([val.items[u, val.length[u] - 1] for u in range(n_val)])
  val_bayes = reference_gauc(spec, val_hist, val_last, val_cands, data.popularity)
  print(f"validation references: Bayes (whole) GAUC {val_bayes['bayes']:.4f}, history-blind "
        f"{val_bayes['blind']:.4f}", flush=True)
  valid = (val_cands, val_bayes, hard_eval)
  init, warm_info = None, None
  if s["warm_length"] and not _LOAD.value:  # curriculum: the users' last warm_length events first
    wl = s["warm_length"]
    data_w = build_dataset(f"topics-{s['length']}-last{wl}", items, stamps, spec.num_items, wl)
    vw = data_w.valid
    hist_w = [vw.items[u, :max(vw.length[u] - 1, 0)] for u in range(n_val)]
    last_w = np.array([vw.items[u, vw.length[u] - 1] for u in range(n_val)])
    ref_w = reference_gauc(spec, hist_w, last_w, val_cands, data.popularity)
    print(f"warm stage: last {wl} events, validation Bayes GAUC {ref_w['bayes']:.4f}, "
          f"history-blind {ref_w['blind']:.4f}", flush=True)
    s_w = dict(s, length=wl, max_train_seconds=s["warm_seconds"],
               batch=s["warm_batch"] or s["batch"])
    wmodel, warm_info = train_ranker(s["model"], {}, s_w, data_w, sampler,
                                     (val_cands, ref_w, hard_eval))
    init = _strkeys(nnx.to_pure_dict(nnx.state(wmodel, nnx.Param)))  # warm_start's keys
  if _LOAD.value:
    model, info = load_backbone(_LOAD.value, s, data.num_items)
  else:
    model, info = train_ranker(s["model"], {}, s, data, sampler, valid, init=init)
    if _SAVE.value:
      save_backbone(_SAVE.value, model, s, info)
  if warm_info is not None:
    info["warm"] = {k: warm_info[k] for k in ("curve", "train_seconds", "steps_done")}
    info["train_seconds"] += warm_info["train_seconds"]
  curve, train_seconds, steps_done = info["curve"], info["train_seconds"], info["steps_done"]
  if _TRAIN_ONLY.value:
    out = {"settings": s, "train_seconds": train_seconds, "steps_done": steps_done,
           "curve": curve, "valid_references": val_bayes, "warm": info.get("warm"),
           "devices": [str(d) for d in jax.devices()]}
    if _OUT.value:
      Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
      write_json_atomic(Path(_OUT.value), json.loads(json.dumps(out, default=float)))
    return

  # --- reference rows: Bayes-optimal (float64) and history-blind ----------------------------
  hist = [test.items[u, :max(test.length[u] - 1, 0)] for u in range(n_eval)]
  last = np.array([test.items[u, test.length[u] - 1] for u in range(n_eval)])
  rows, per_user = [], {}

  def add(label, group, summary, per, bytes_per_user=float("nan")):
    rows.append({"row": label, "group": group, "bytes_per_user": bytes_per_user,
                 **{k: summary[k] for k in ("AUC", "GAUC", "logloss", "NDCG@10")}})
    per_user[label] = per

  for view, mem in memory_views(hist, seed=3).items():
    p = bayes_ranking_scores(spec, mem, last, cands)
    q = np.clip(p / p.sum(1, keepdims=True), 1e-12, 1 - 1e-12)  # one positive per impression
    summary, per = ranking.impression_metrics(np.log(q) - np.log1p(-q))
    add(f"Bayes ({view})", "reference", summary, per)
  blind = np.log(data.popularity[cands].astype(np.float64) + 1.0)
  summary, per = ranking.impression_metrics(blind)
  add("history-blind (popularity)", "reference", summary, per)

  # --- served rows -------------------------------------------------------------------------
  heads, dk, dv = model.head_dims()
  cspec = cache_spec(len(model.layers), heads, s["length"], dk, dv)
  ratios = [float(r) for r in _RATIOS.value]
  bases = {}
  group = max(g for g in range(1, min(32, dv) + 1) if dv % g == 0)

  def build(method, params):
    params = dict(params)
    if method == "lowrank":
      r = params.pop("rank")
      if r not in bases:
        bases[r] = C.fit_lowrank(calibration_caches(model, data.valid, num_users=64), r)
      params["bases"] = bases[r]
    return make_compressor(method, **params)

  cells = [("native", "native", "native", {}, False)]
  for method in _METHODS.value:
    if method == "kivi":
      for bits in (4, 2):
        cells.append((f"kivi {bits}-bit", "kivi", "kivi",
                      {"bits": bits, "group": group, "residual": group}, False))
      continue
    if method == "uniform":
      for bits in (8, 4):
        cells.append((f"uniform {bits}-bit", "uniform", "uniform", {"bits": bits}, False))
      continue
    for ratio, params in ratio_table(method, cspec, ratios).items():
      if params is None:
        print(f"{method}: {ratio:g}x is out of reach, skipped", flush=True)
        continue
      cells.append((f"{method} {ratio:g}x", method, method, params, False))
      if method == "h2o":
        cells.append((f"ORACLE vote h2o {ratio:g}x (not deployable)", "oracle", method,
                      params, True))
  for label, group_name, method, params, oracle in cells:
    t0 = time.time()
    res = ranking.rank_cell(model, test, cands, build(method, params), batch_size=64,
                            oracle=oracle)
    add(label, group_name, res["metrics"], res["per_user"], res["bytes_per_user"])
    print(f"{label}: GAUC {res['metrics']['GAUC']:.4f} ({time.time() - t0:.1f}s)", flush=True)

  # --- Quest read per query: stores everything, each query reads its own top pages ---------
  if _QUEST.value:
    page = _QUEST.value
    n_pages = -(-s["length"] // page)
    has_bias = model.has_score_bias
    for ratio in ratios:
      pages = max(1, round(n_pages / ratio))
      for with_bias in ((True, False) if has_bias else (True,)):
        t0 = time.time()
        res = ranking.quest_rank_cell(model, test, cands, page=page, pages=pages,
                                      with_bias=with_bias, batch_size=64)
        label = (f"quest reads {n_pages / pages:.3g}x (page {page}, {pages} of {n_pages} "
                 f"pages{'' if with_bias or not has_bias else ', q.k bound only'}; reads "
                 f"{res['read_per_candidate']:,.0f} B/candidate, "
                 f"{res['read_union']:,.0f} B/request)")
        add(label, "quest", res["metrics"], res["per_user"], res["bytes_per_user"])
        rows[-1].update(read_per_candidate=res["read_per_candidate"],
                        read_union=res["read_union"])
        print(f"{label}: GAUC {res['metrics']['GAUC']:.4f} ({time.time() - t0:.1f}s)",
              flush=True)

  # --- trained variants: each trained for ranking by the same rule, served from its memory --
  variants = {}
  s_v = dict(s) if _VSEC.value is None else dict(s, max_train_seconds=_VSEC.value)
  from_backbone = _VINIT.value == "backbone" and variant_list
  source = _strkeys(nnx.to_pure_dict(nnx.state(model, nnx.Param))) if from_backbone else None
  # With --variant_init=backbone a control row first: the main backbone trained for the same
  # budget, which separates what the extra training buys from what the variant's memory costs.
  failed = {}
  for name in ([s["model"]] if from_backbone else []) + variant_list:
    plain = name not in VARIANT_SPECS  # the control, or a same-budget reference backbone
    control = from_backbone and name == s["model"] and plain
    opts = {} if plain else variant_options(name, s)
    try:  # one variant's failure must not lose the others' rows: reported, exit code 1
      vmodel, vinfo = train_ranker(name, opts, s_v, data, sampler, valid, init=source,
                                   partial=from_backbone)
      t0 = time.time()
      res = ranking.rank_cell(vmodel, test, cands, C.native(), batch_size=64)
    except Exception as err:  # noqa: BLE001 - reported below and in the JSON
      import traceback
      traceback.print_exc()
      failed[name] = f"{type(err).__name__}: {err}"
      print(f"variant {name}: FAILED ({failed[name][:300]}); continuing", flush=True)
      continue
    kept = vinfo["kept"]
    if control:
      head = f"control: backbone {name} (+"
    elif plain and not from_backbone:
      head = f"reference: {name} from scratch, the variants' budget ("
    elif from_backbone:
      head = f"variant {name} (from the backbone, {len(kept)} arrays at init; +"
    else:
      head = f"variant {name} ("
    label = (head + f"{vinfo['steps_done']} steps, {vinfo['train_seconds']:.0f}s"
             + ("" if vinfo["tied_qk"] or from_backbone
                else ", shared q/k" if all(hasattr(layer, "uvq") for layer in vmodel.layers)
                else ", W_k untied")
             + (f", {vinfo['positions']} impression/window"
                if vinfo["positions"] != s["positions"] else "") + ")")
    add(label, "variant", res["metrics"], res["per_user"], res["bytes_per_user"])
    variants[name] = {k: vinfo[k] for k in ("curve", "train_seconds", "steps_done", "tied_qk",
                                            "positions", "kept")}
    variants[name]["init"] = "backbone" if from_backbone else "scratch"
    print(f"{label}: GAUC {res['metrics']['GAUC']:.4f} ({time.time() - t0:.1f}s)", flush=True)

  # --- table -------------------------------------------------------------------------------
  bayes, blind_g = rows[0]["GAUC"], next(r["GAUC"] for r in rows
                                          if r["row"].startswith("history-blind"))
  native = per_user["native"]
  for r in rows:
    d, se = ranking.paired_se(per_user[r["row"]]["auc"], native["auc"])
    dn, sen = ranking.paired_se(per_user[r["row"]]["ndcg10"], native["ndcg10"])
    r.update(dGAUC=d, se_dGAUC=se, dNDCG=dn, se_dNDCG=sen,
             bayes_lift=lift_fraction(r["GAUC"], blind_g, bayes))
  header = ("| row | bytes/user | AUC | GAUC | logloss | NDCG@10 | ΔGAUC vs native (SE) | "
            "ΔNDCG@10 (SE) | Bayes lift |")
  lines = [header, "|" + "---|" * 9]
  for r in rows:
    b = "" if math.isnan(r["bytes_per_user"]) else f"{r['bytes_per_user']:,.0f}"
    lines.append(f"| {r['row']} | {b} | {r['AUC']:.4f} | {r['GAUC']:.4f} | {r['logloss']:.4f}"
                 f" | {r['NDCG@10']:.4f} | {r['dGAUC']:+.4f} ({r['se_dGAUC']:.4f}) | "
                 f"{r['dNDCG']:+.4f} ({r['se_dNDCG']:.4f}) | {r['bayes_lift']:.2f} |")
  table = "\n".join(lines)
  print(f"\n{n_eval} test users, {cands.shape[1]} candidates each (1 positive, {hard_eval} "
        f"same-topic, {s['easy']} other-topic); trained {steps_done} steps in "
        f"{train_seconds:.0f}s; ΔGAUC/ΔNDCG: paired over users, SE = sd/sqrt(n)\n")
  print(table, flush=True)
  print(f"total {time.time() - t_all:.0f}s (training {train_seconds:.0f}s, "
        f"{steps_done} steps)", flush=True)
  out = {"settings": s, "train_seconds": train_seconds, "steps_done": steps_done,
         "curve": curve, "valid_references": val_bayes, "warm": info.get("warm"),
         "rows": rows, "variants": variants, "failed_variants": failed,
         "num_users": n_eval, "candidates": int(cands.shape[1]), "table": table,
         "devices": [str(d) for d in jax.devices()], "total_seconds": time.time() - t_all}
  if _OUT.value:
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(_OUT.value), json.loads(json.dumps(out, default=float)))
    print(f"wrote {_OUT.value}")
  if failed:
    print(f"FAILED variants (no row): {failed}", flush=True)
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
