"""Quest in the ranking task: each request event and candidate reads its own top pages.

Loads a trained ranking model (``configs/ml1m.py:task=ranking``; the workdir is copied to a
scratch folder first, so that the original's checkpoint lock is never taken), prefills the
test users' memories, stores them as Quest pages (``quest(page)``) and ranks every user's
candidates (``experiment.ranking_eval_candidates``) with ``model.rank(...,
slot_select=quest_slot_select(memory, pages))`` at several page budgets: at every layer each
query (request event or candidate) reads only the memory slots of its own ``pages`` pages with
the largest bound of its score: sum_c max(q_c min_c, q_c max_c), plus for HSTU the query's
largest relative position/time bias over the page's events (the bias needs every stored
event's time stamp, counted in the bytes read). With ``--key_bound`` (default) the same
budgets are also served with the bound of q . k alone (the bias ignored), as an ablation. Per
cell: GAUC, candidate NDCG@10 and
pooled AUC with paired 95% bootstrap intervals against native (the same users), stored bytes
per user (``QuestMemory.stored_bytes``) and bytes read per request
(``quest_rank_read_bytes``): per query (a candidate alone) and the union over the request's
queries (one batched M-FALCON pass). With ``--recent`` (default) the same budgets are also
served by a query-blind baseline that reads each row's newest pages (every query the same).

Usage:
  python scripts/quest_rank.py --config configs/ml1m.py:task=ranking,init=/work/gap/user,...\
      --workdir runs/ml1m_rank --out quest_rank.json --page 4 --pages 25,12,6,3
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from malloc_jax import ranking, stats
from malloc_jax.checkpoint import write_json_atomic
from malloc_jax.compressors.budget import native_stored_bytes
from malloc_jax.compressors.quest_pages import quest, quest_rank, quest_rank_read_bytes
from malloc_jax.evaluate import check_eval_set, padded_batches, split_request
from malloc_jax.experiment import load_data, ranking_eval_candidates, train_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (task=ranking).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the trained ranking model (read "
                               "only: copied to a scratch folder before loading).")
_OUT = flags.DEFINE_string("out", "quest_rank.json", "Output JSON.")
_PAGE = flags.DEFINE_integer("page", 4, "Events per Quest page.")
_PAGES = flags.DEFINE_list("pages", ["25", "12", "6", "3"], "Pages read per query.")
_USERS = flags.DEFINE_integer("max_users", 0, "Test users (0: all).")
_RECENT = flags.DEFINE_bool("recent", True, "Also serve the query-blind baseline that reads "
                             "each row's newest pages at the same page budgets.")
_KEY_BOUND = flags.DEFINE_bool("key_bound", True, "Also serve Quest with the bound of q . k "
                               "alone (HSTU's relative bias ignored in the page choice).")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples.")


@functools.partial(jax.jit, static_argnames=("window",))
def _prefill(model, items, ts, length, *, window):
  prefix, req = split_request(items, ts, length, 1)
  cache, _ = model.prefill(prefix, window)
  return cache, req


@functools.partial(jax.jit, static_argnames=("page",))
def _store(cache, *, page):
  comp = quest(page)
  return comp.compress(cache, comp.init(cache))[0]


@jax.jit
def _native(model, memory, req, cands):
  return model.rank(memory.materialize(), req, cands)


@functools.partial(jax.jit, static_argnames=("pages", "with_bias"))
def _quest(model, memory, req, cands, *, pages, with_bias=True):
  return quest_rank(model, memory, req, cands, pages, with_bias)


_quest_key_bound = functools.partial(_quest, with_bias=False)


def _recent_pages(memory, pages: int) -> jax.Array:
  """[L, B, H, P] bool: each row's newest ``pages`` real pages (a query-blind baseline at
  Quest's read budget; the native cache's events are a prefix of the slots)."""
  P, page = memory.kmin.shape[3], memory.page
  n_pages = -(-jnp.sum(memory.materialize().pos >= 0, axis=-1) // page)  # [L, B, H]
  p = jnp.arange(P)
  return (p < n_pages[..., None]) & (p >= n_pages[..., None] - pages)


@functools.partial(jax.jit, static_argnames=("pages",))
def _recent(model, memory, req, cands, *, pages):
  chosen = _recent_pages(memory, pages)  # [L, B, H, P]
  T = memory.k.shape[3]
  m = req.items.shape[1] + cands.shape[1]

  def select(layer, q):
    slots = jnp.repeat(chosen[layer], memory.page, axis=-1)[..., :T]  # [B, H, T]
    return jnp.broadcast_to(slots[:, :, None], q.shape[:3] + (T,))

  logits = model.rank(memory.materialize(), req, cands, slot_select=select)
  return logits, jnp.broadcast_to(chosen[:, :, :, None], chosen.shape[:3] + (m,)
                                  + chosen.shape[3:])


def main(argv):
  del argv
  config = _CONFIG.value
  t0 = time.time()
  data = load_data(config)
  print(data.summary(), flush=True)
  scratch = Path(tempfile.mkdtemp(prefix="quest_rank_"))
  shutil.copytree(_WORKDIR.value, scratch / "w", ignore=shutil.ignore_patterns("LOCK"))
  model, _ = train_model(config, scratch / "w", data, print)
  split = data.eval_set("test")
  check_eval_set(split, model.num_items)
  n = len(split) if not _USERS.value else min(_USERS.value, len(split))
  cands = ranking_eval_candidates(config, data, "test")[:n]
  page, budgets = _PAGE.value, [int(p) for p in _PAGES.value]
  # HSTU adds a relative position/time bias to q . k: the score bound reads every stored
  # event's time stamp (counted in the bytes read); SASRec has none.
  has_bias = model.has_score_bias
  cells = [(f"quest page={page} pages={p}", p, _quest) for p in budgets]
  if _KEY_BOUND.value:
    cells += [(f"quest (q.k bound) page={page} pages={p}", p, _quest_key_bound)
              for p in budgets]
  if _RECENT.value:
    cells += [(f"recent pages page={page} pages={p}", p, _recent) for p in budgets]
  labels = ["native"] + [c[0] for c in cells]
  logits = {k: [] for k in labels}
  figs = {k: [] for k in labels}  # per user: (stored, read per candidate, read union)
  bs = config.eval.batch_size
  for _, idx, real in padded_batches(n, min(bs, n)):
    cache, req = _prefill(model, jnp.asarray(split.items[idx]), jnp.asarray(split.ts[idx]),
                          jnp.asarray(split.length[idx]), window=config.eval.window)
    memory = _store(cache, page=page)
    cand = jnp.asarray(cands[idx])
    stored = memory.stored_bytes()[real].astype(np.float64)
    native = native_stored_bytes(cache, np.asarray(cache.length))[real].astype(np.float64)
    logits["native"].append(np.asarray(_native(model, memory, req, cand))[real])
    figs["native"].append(np.stack([native, native, native], 1))
    q_valid = np.concatenate([np.asarray(req.valid), np.ones(cand.shape, bool)], axis=1)
    m = req.items.shape[1]
    for label, p, fn in cells:
      lg, chosen = fn(model, memory, req, cand, pages=p)
      per_query, union = quest_rank_read_bytes(memory, chosen, q_valid,
                                               with_bias=fn is _quest and has_bias)
      logits[label].append(np.asarray(lg)[real])
      figs[label].append(np.stack([stored, per_query[:, m:].mean(1)[real],
                                   union[real].astype(np.float64)], 1))
  print(f"served {n} users ({time.time() - t0:.0f}s)", flush=True)
  logits = {k: np.concatenate(v) for k, v in logits.items()}
  figs = {k: np.concatenate(v) for k, v in figs.items()}
  per = {}
  rows = []
  for k in labels:
    summary, per[k] = ranking.impression_metrics(logits[k])
    rows.append({"method": k, **{x: summary[x] for x in ("AUC", "GAUC", "NDCG@10")},
                 "stored_bytes": figs[k][:, 0].mean(), "read_per_candidate": figs[k][:, 1].mean(),
                 "read_union": figs[k][:, 2].mean(),
                 "read_fraction_per_candidate": float((figs[k][:, 1] / figs[k][:, 0]).mean())})
  boot = dict(resamples=_RESAMPLES.value, seed=config.seed)
  for name, key in (("GAUC", "auc"), ("NDCG@10", "ndcg10")):
    cis = stats.ci_columns({k: p[key] for k, p in per.items()}, "native", **boot)
    for r in rows:
      r.setdefault("ci", {})[name] = cis[r["method"]]
  for r in rows:
    r["ci"]["AUC"] = ranking.paired_auc_bootstrap(logits[r["method"]], logits["native"], **boot)
  write_json_atomic(Path(_OUT.value), {"users": n, "page": page, "pages": budgets,
                                       "candidates": int(cands.shape[1]), "rows": rows,
                                       "seconds": time.time() - t0})
  print("| cell | GAUC | ΔGAUC [95% CI] | cand. NDCG@10 | ΔNDCG@10 [95% CI] | ΔAUC [95% CI] | "
        "stored B/user | read B/candidate | read B/request (union) | read/stored per cand. |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ci = {k: f"{v['diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"
          for k, v in r["ci"].items()}
    print(f"| {r['method']} | {r['GAUC']:.4f} | {ci['GAUC']} | {r['NDCG@10']:.4f} | "
          f"{ci['NDCG@10']} | {ci['AUC']} | {r['stored_bytes']:,.0f} | "
          f"{r['read_per_candidate']:,.0f} | {r['read_union']:,.0f} | "
          f"{r['read_fraction_per_candidate']:.3f} |", flush=True)
  shutil.rmtree(scratch)
  print(f"wrote {_OUT.value} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
