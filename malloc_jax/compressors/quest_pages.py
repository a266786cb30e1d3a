"""Quest: query-aware page sparsity. Store everything; read only the pages a query needs.

Tang et al. split the cache into pages of consecutive events and keep, per page and key
channel, the minimum and maximum key. For a query q the upper bound of q . k over a page is
sum_c max(q_c min_c, q_c max_c); a request reads the bounds of every page and the keys and
values of the top pages only. Quest therefore does not shrink what is *stored* (it adds the
bounds) but what is *read* per request, so both figures are reported:
``QuestMemory.stored_bytes()`` and :func:`quest_read_bytes`. In the ranking task every
request event and candidate is a query with its own pages (:func:`quest_slot_select` for
``model.rank``; bytes :func:`quest_rank_read_bytes`). This module is the whole method: its
factory, memory, read-side functions and spec.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache
from malloc_jax.compressors.base import (
  Compressor,
  DenseIndex,
  cache_from,
  index_of,
  init_empty,
  row_counts,
)
from malloc_jax.compressors.eviction import check_int, mark_slots, top_slots
from malloc_jax.compressors.spec import MethodSpec


@struct.dataclass
class QuestMemory:
  """The full cache plus per-page key bounds.

  index: DenseIndex or SparseIndex of the cache; k [L, B, H, T, Dk], v [L, B, H, T, Dv];
  kmin, kmax [L, B, H, P, Dk] per-page channel minimum / maximum over the page's real events
  (0 for a page without events), P = ceil(T / page); page: static page size.
  """

  index: Any
  k: jax.Array
  v: jax.Array
  kmin: jax.Array
  kmax: jax.Array
  page: int = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    """The whole cache (Quest stores everything; :func:`quest_view` is a query's read)."""
    return cache_from(self.index, self.k, self.v)

  def row_events(self) -> np.ndarray:
    """[L, B, H] int64: real events each (layer, user, head) row holds (host NumPy)."""
    return row_counts(self.index, self.k.shape[0], self.k.shape[2])

  def stored_bytes(self) -> np.ndarray:
    """[B] int64 bytes of a variable-length store, with n_r the events of row r (a prefix):

      sum_r n_r (Dk s_k + Dv s_v) + sum_r ceil(n_r / page) 2 Dk s_k + index

    index: DenseIndex n * s_ts + s_len (one time stamp per event, positions implicit);
    SparseIndex sum_r n_r (s_pos + s_ts) + s_len.
    """
    n = self.row_events()  # [L, B, H]
    dk, sk = self.k.shape[-1], self.k.dtype.itemsize
    kv = n * (dk * sk + self.v.shape[-1] * self.v.dtype.itemsize)
    bounds = -(-n // self.page) * 2 * dk * self.kmin.dtype.itemsize
    s_len = self.index.length.dtype.itemsize
    if isinstance(self.index, DenseIndex):
      index = n[0, :, 0] * self.index.ts.dtype.itemsize + s_len
    else:
      index = n.sum(axis=(0, 2)) * (self.index.pos.dtype.itemsize
                                     + self.index.ts.dtype.itemsize) + s_len
    return (kv + bounds).sum(axis=(0, 2)) + index


def quest(page: int = 16) -> Compressor:
  """Quest's store: the cache as it is plus per-page channel min / max of the keys.

  Pages are ``page`` consecutive slots of each (layer, user, head) row; the bounds are taken
  over the page's real events only.

  Args:
    page: events per page (>= 1; the paper uses 16).

  Returns:
    A Compressor; memory: :class:`QuestMemory`; state: EmptyState; no signals needed. Read
    a request with :func:`quest_select` / :func:`quest_view`; bytes read per request:
    :func:`quest_read_bytes`.

  References: Tang, Zhao, Zhu, Xiao, Kasikci, Han, "Quest: Query-Aware Sparsity for
    Efficient Long-Context LLM Inference", ICML 2024 (arXiv 2406.10774).
  """
  page = check_int("quest", "page", page, 1)


  def compress(cache, state, signals=None):
    del signals
    L, B, H, T, dk = cache.k.shape
    P = -(-T // page)
    pad = [(0, 0)] * 3 + [(0, P * page - T)]
    valid = jnp.pad(cache.pos >= 0, pad).reshape(L, B, H, P, page, 1)
    k = jnp.pad(cache.k, pad + [(0, 0)]).reshape(L, B, H, P, page, dk)
    kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=4)  # [L, B, H, P, Dk]
    kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=4)
    any_valid = jnp.any(valid, axis=4)
    memory = QuestMemory(index=index_of(cache), k=cache.k, v=cache.v,
                         kmin=jnp.where(any_valid, kmin, 0).astype(cache.k.dtype),
                         kmax=jnp.where(any_valid, kmax, 0).astype(cache.k.dtype), page=page)
    return memory, state

  return Compressor(init_empty, compress)


def _page_valid(memory: QuestMemory) -> jax.Array:
  """[L, B, H, P] bool: the page holds at least one real event."""
  pos = memory.materialize().pos  # [L, B, H, T]
  L, B, H, T = pos.shape
  P = memory.kmin.shape[3]
  pos = jnp.pad(pos, [(0, 0)] * 3 + [(0, P * memory.page - T)], constant_values=-1)
  return jnp.any(pos.reshape(L, B, H, P, memory.page) >= 0, axis=-1)


def quest_scores(memory: QuestMemory, q: jax.Array) -> jax.Array:
  """Upper bounds [L, B, H, P] of q . k over each page: sum_c max(q_c min_c, q_c max_c).

  Args:
    q: [L, B, H, Dk] the request's query at each layer and head (float32 math).
  """
  q = q.astype(jnp.float32)[:, :, :, None, :]  # [L, B, H, 1, Dk]
  lo, hi = memory.kmin.astype(jnp.float32), memory.kmax.astype(jnp.float32)
  return jnp.sum(jnp.maximum(q * lo, q * hi), axis=-1)


def quest_select(memory: QuestMemory, q: jax.Array, pages: int) -> jax.Array:
  """[L, B, H, P] bool: the ``pages`` real pages with the largest upper bound per row
  (ties to the smaller page; a row with fewer real pages selects them all)."""
  pages = check_int("quest", "pages", pages, 1)
  score = quest_scores(memory, q)
  P = score.shape[-1]
  tier = _page_valid(memory).astype(jnp.int32)
  sel, picked = top_slots(tier, score, jnp.zeros(tier.shape, jnp.int32), min(pages, P))
  return mark_slots(sel, picked, P)


def quest_view(memory: QuestMemory, q: jax.Array, pages: int) -> Cache:
  """The Cache a query reads: events outside its selected pages masked (pos -1).

  A read-only view for attention (occupied slots are no longer a prefix); do not extend it.
  """
  cache = memory.materialize()
  chosen = quest_select(memory, q, pages)  # [L, B, H, P]
  T = cache.capacity
  slot_page = jnp.repeat(chosen, memory.page, axis=-1)[..., :T]  # [L, B, H, T]
  return cache.replace(pos=jnp.where(slot_page, cache.pos, -1),
                       ts=jnp.where(slot_page, cache.ts, 0), contiguous=False)


def quest_read_bytes(memory: QuestMemory, chosen: jax.Array) -> np.ndarray:
  """[B] int64 bytes one request reads per user (host NumPy), ``chosen`` from quest_select:

    sum_r ceil(n_r / page) 2 Dk s_k  (the bounds of every real page)
    + sum_r (real events in r's chosen pages) (Dk s_k + Dv s_v)

  Positions and time stamps of the read events are not counted (a page's are implicit from
  its start in a contiguous store).
  """
  n = memory.row_events()  # [L, B, H]
  dk, sk = memory.k.shape[-1], memory.k.dtype.itemsize
  per_event = dk * sk + memory.v.shape[-1] * memory.v.dtype.itemsize
  pos = np.asarray(memory.materialize().pos)  # [L, B, H, T]
  T = pos.shape[-1]
  slot_page = np.repeat(np.asarray(chosen), memory.page, axis=-1)[..., :T]
  read = ((pos >= 0) & slot_page).sum(axis=-1, dtype=np.int64)
  bounds = -(-n // memory.page) * 2 * dk * memory.kmin.dtype.itemsize
  return (bounds + read * per_event).sum(axis=(0, 2))


def _select_pages(score: jax.Array, valid: jax.Array, pages: int) -> jax.Array:
  """[..., P] bool: the ``pages`` valid entries of ``score`` [..., P] with the largest value
  (ties to the smaller page; fewer valid pages: all of them)."""
  P = score.shape[-1]
  tier = jnp.broadcast_to(valid, score.shape).astype(jnp.int32)
  sel, picked = top_slots(tier, score, jnp.zeros(score.shape, jnp.int32), min(pages, P))
  return mark_slots(sel, picked, P)


def quest_query_pages(memory: QuestMemory, layer: int, q: jax.Array, pages: int,
                      bias: jax.Array | None = None) -> jax.Array:
  """[B, H, m, P] bool: each query's top ``pages`` real pages of ``layer`` by Quest's bound.

  The per-query form of :func:`quest_select`: every one of the m queries (a ranking
  request's events and candidates) ranks the pages of its own (user, head) row by
  sum_c max(q_c min_c, q_c max_c) and keeps the ``pages`` largest among the real pages.
  With ``bias`` (the additive score bias of each query on each slot, HSTU's rab) the bound
  is of the whole pre-activation score q . k + bias: the key bound plus the largest bias
  over the page's real events.

  Args:
    memory: a QuestMemory; layer: its layer index (static).
    q: [B, H, m, Dk] queries of that layer (float32 math).
    pages: pages read per query (>= 1).
    bias: [B, H, m, T] or None.
  """
  pages = check_int("quest", "pages", pages, 1)
  q = q.astype(jnp.float32)[:, :, :, None, :]  # [B, H, m, 1, Dk]
  lo = memory.kmin[layer].astype(jnp.float32)[:, :, None]  # [B, H, 1, P, Dk]
  hi = memory.kmax[layer].astype(jnp.float32)[:, :, None]
  score = jnp.sum(jnp.maximum(q * lo, q * hi), axis=-1)  # [B, H, m, P]
  if bias is not None:
    real = memory.materialize().pos[layer][:, :, None] >= 0  # [B, H, 1, T]
    score = score + _page_max(bias.astype(jnp.float32), real, memory.page)
  return _select_pages(score, _page_valid(memory)[layer][:, :, None], pages)


def _page_max(x: jax.Array, real: jax.Array, page: int) -> jax.Array:
  """[..., P]: the largest x [..., T] over each page's real slots (``real`` [..., T] bool,
  broadcast); 0 for a page without one (such a page is never selected)."""
  T = x.shape[-1]
  P = -(-T // page)
  x = jnp.where(jnp.broadcast_to(real, x.shape), x, -jnp.inf)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, P * page - T)], constant_values=-jnp.inf)
  out = jnp.max(x.reshape(*x.shape[:-1], P, page), axis=-1)
  return jnp.where(jnp.isfinite(out), out, 0.0)


def quest_slot_select(memory: QuestMemory, pages: int, with_bias: bool = True):
  """The ``slot_select`` of ``SequenceRecommender.rank`` that reads a Quest memory.

  Each request event and candidate reads, at every layer, only the memory slots of its own
  top ``pages`` pages (:func:`quest_query_pages`), its query being that layer's query of the
  token (so a candidate's selection at layer l depends on what it read below l). Call
  ``model.rank(memory.materialize(), request, candidates, slot_select=...)``.

  ``with_bias`` (default): where the layer adds a score bias to q . k (HSTU's relative
  position and time bias, which the layer passes as ``bias=``), the page bound is of the
  whole score, q . k + bias, as Quest bounds the score its attention uses; the bias needs
  each read page's time stamps (counted by :func:`quest_rank_read_bytes` with
  ``with_bias=True``). ``False``: the key bound alone (the score without the bias), as an
  ablation. SASRec has no bias: both are the same.

  Returns:
    A callable (layer, q [B, H, m, Dk], bias=None) -> [B, H, m, T] bool.

  References: Tang et al., Quest, ICML 2024 (per-query page selection by the key bounds).
  """
  pages = check_int("quest", "pages", pages, 1)
  T = memory.k.shape[3]

  def select(layer, q, bias=None):
    chosen = quest_query_pages(memory, layer, q, pages,
                               bias=bias if with_bias else None)  # [B, H, m, P]
    return jnp.repeat(chosen, memory.page, axis=-1)[..., :T]

  return select


def quest_rank_pages(memory: QuestMemory, queries: jax.Array, pages: int,
                     biases: jax.Array | None = None) -> jax.Array:
  """[L, B, H, m, P] bool: :func:`quest_query_pages` of every layer for ``queries``
  [L, B, H, m, Dk] (``model.rank(..., return_queries=True)``'s) and, for the bounds of the
  whole score, ``biases`` [L, B, H, m, T] (``model.rank_slot_bias``) or None."""
  return jnp.stack([quest_query_pages(memory, i, queries[i], pages,
                                      None if biases is None else biases[i])
                    for i in range(queries.shape[0])])


def quest_rank(model, memory: QuestMemory, request, candidates, pages: int,
               with_bias: bool = True):
  """``model.rank`` of a Quest memory with per-query reads, and each query's pages.

  Every request event and candidate reads, at every layer, only its own top ``pages`` pages
  (:func:`quest_slot_select`; ``with_bias``: the bound of q . k plus the layer's score bias
  where it has one). Returns (logits [B, C], chosen [L, B, H, m + C, P] bool), ``chosen``
  recomputed from the queries (and biases) the pass used, for :func:`quest_rank_read_bytes`.
  """
  cache = memory.materialize()
  logits, queries = model.rank(cache, request, candidates,
                               slot_select=quest_slot_select(memory, pages, with_bias),
                               return_queries=True)
  biases = model.rank_slot_bias(cache, request, candidates) if with_bias else None
  return logits, quest_rank_pages(memory, queries, pages, biases)


def quest_rank_read_bytes(memory: QuestMemory, chosen: jax.Array, q_valid: jax.Array,
                          with_bias: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Bytes a ranking request reads from a Quest memory when each query picks its pages.

  With ``chosen`` [L, B, H, m, P] from :func:`quest_rank_pages` and ``q_valid`` [B, m]
  (real request events and candidates), per query j and per user (host NumPy, int64):

    per_query[b, j] = sum_r ceil(n_r / page) 2 Dk s_k
                      + sum_r (real events in the pages query j chose in row r) (Dk s_k + Dv s_v)

  (0 for a padding query), r over the (layer, head) rows of user b: the bounds of every real
  page plus the keys and values of the chosen pages, as :func:`quest_read_bytes` for one
  query. ``union[b]``: the same with the chosen pages of all the request's real queries
  merged, i.e. what one batched pass (M-FALCON) has to fetch: the bounds once and each page
  chosen by any query once. Positions and time stamps are not counted, except with
  ``with_bias`` (the pages were chosen by the bound of q . k + bias, which needs the time
  stamp of every stored event to evaluate HSTU's time bias): then every real event's time
  stamp, n_user s_ts, is added to both figures (positions stay implicit in a prefix store).

  Returns:
    (per_query [B, m], union [B]).
  """
  n = memory.row_events()  # [L, B, H]
  dk, sk = memory.k.shape[-1], memory.k.dtype.itemsize
  per_event = dk * sk + memory.v.shape[-1] * memory.v.dtype.itemsize
  L, B, H, T = memory.k.shape[:4]
  P, page = memory.kmin.shape[3], memory.page
  pos = np.pad(np.asarray(memory.materialize().pos), [(0, 0)] * 3 + [(0, P * page - T)],
               constant_values=-1)
  events = (pos.reshape(L, B, H, P, page) >= 0).sum(axis=-1, dtype=np.int64)  # [L, B, H, P]
  bounds = (-(-n // page) * 2 * dk * memory.kmin.dtype.itemsize).sum(axis=(0, 2))  # [B]
  chosen = np.asarray(chosen) & np.asarray(q_valid)[None, :, None, :, None]
  read = np.einsum("lbhjp,lbhp->bj", chosen.astype(np.int64), events)  # [B, m]
  if with_bias:
    ts = memory.materialize().ts
    bounds = bounds + (pos[0, :, 0] >= 0).sum(axis=-1, dtype=np.int64) * ts.dtype.itemsize
  per_query = np.where(np.asarray(q_valid), bounds[:, None] + read * per_event, 0)
  union = (chosen.any(axis=3) * events).sum(axis=(0, 2, 3))  # [B]
  return per_query.astype(np.int64), (bounds + union * per_event).astype(np.int64)


SPECS = (MethodSpec(
    name="quest", factory=quest, granularity="token", example={"page": 4},
    reference="Tang et al., Quest: Query-Aware Sparsity for Efficient Long-Context LLM "
    "Inference, ICML 2024"),)
