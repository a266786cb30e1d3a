"""Shared serving logic of the cached sequence recommenders (HSTU, SASRec).

Every backbone is an ``nnx.Module`` (a pytree, so it passes straight through ``jax.jit``)
whose layers implement one method::

  layer.step(x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, train_rng)
      -> (y [B, m, d], k_new [B, H, m, Dk], v_new [B, H, m, Dv], attn [B, H, m, T + m]
          [, q [B, H, m, Dk]])

where the m new events attend to the T cached slots plus themselves (causally, by original
position). The full forward pass is the same step with an empty cache (T = 0); ``prefill``,
``extend`` and ``score`` thread a :class:`~malloc_jax.cache.Cache` through the layers.

Attention weights ``attn`` are what eviction methods read: for softmax attention the
probabilities, for HSTU's pointwise attention the magnitude |SiLU(s)| / N of each weight.
A layer whose query heads match its key heads may also return its queries ``q``: ``extend``
then gives the last W of them as ``Signals.window_queries`` (ThinK's channel scores); layers
that return four values leave them None.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from flax import nnx, struct

from malloc_jax import cache as cache_lib
from malloc_jax import reads
from malloc_jax.cache import Cache, Signals


@struct.dataclass
class Events:
  """A batch of event sequences, right-padded.

  items [B, N] int32 (0 = padding), ts [B, N] int32 timestamps, length [B] int32.
  """

  items: jax.Array
  ts: jax.Array
  length: jax.Array

  @property
  def valid(self) -> jax.Array:
    return jnp.arange(self.items.shape[1])[None, :] < self.length[:, None]


def _place(cached: jax.Array, new: jax.Array, fill: jax.Array) -> jax.Array:
  """Lays [.., B, .., T] cached and [.., B, .., m] new key-axis values out like ``append``.

  Both have the batch on axis 1 and keys on the last axis; the new part is written at each
  user's fill index of a T + m buffer, exactly where ``cache.append`` writes the new slots.
  """
  m = new.shape[-1]
  buf = jnp.pad(cached, [(0, 0)] * (cached.ndim - 1) + [(0, m)])

  def row(b, n, f):
    return jax.lax.dynamic_update_slice(b, n, (0,) * (b.ndim - 1) + (f,))

  return jax.vmap(row, in_axes=(1, 1, 0), out_axes=1)(buf, new, fill)


class SequenceRecommender(nnx.Module):
  """Base class: embeddings, item scoring and the cache protocol. Subclasses set layers."""

  num_items: int
  temperature: float

  # --- subclass hooks -------------------------------------------------------------------
  def embed(self, items, pos, train_rng=None):  # -> [B, m, d]
    raise NotImplementedError

  def head_dims(self) -> tuple[int, int, int]:  # (kv heads, Dk, Dv)
    raise NotImplementedError

  def output(self, x):  # final transform of the top layer's states
    return x

  def memory_layers(self) -> int:  # layers of the stored cache (cross-layer sharing: fewer)
    return len(self.layers)

  # --- core -----------------------------------------------------------------------------
  def _run(self, cache: Cache, events: Events, start: jax.Array, train_rng=None):
    """Runs new events through all layers against ``cache``.

    Returns (hidden [B, m, d], new k [L,B,H,m,Dk], new v, attn [L,B,H,m,T+m], q_pos [B,m],
    queries [L,B,H,m,Dk] or None when the layers do not return them).
    """
    m = events.items.shape[1]
    q_valid = events.valid
    q_pos = jnp.where(q_valid, start[:, None] + jnp.arange(m, dtype=jnp.int32)[None], -1)
    q_ts = jnp.where(q_valid, events.ts, 0)
    x, k, v, a, queries = self._run_tokens(cache, events.items, q_pos, q_ts, q_valid,
                                           train_rng)
    return x, k, v, a, q_pos, queries

  def _run_tokens(self, cache: Cache, items, q_pos, q_ts, q_valid, train_rng=None,
                  isolated=None, last_rows: int | None = None, slot_select=None):
    """Runs tokens [B, m] at explicit positions through all layers against ``cache``.

    ``isolated`` [B, m] bool (or None) marks tokens that must not see one another (ranking
    candidates, see :func:`attention_mask`). ``last_rows`` (static int, layers whose ``step``
    takes ``rows``: HSTU, GQA, MQA, MLA, LSH): the top layer computes only the last
    ``last_rows`` tokens' outputs (the returned hidden is [B, last_rows, d], attn of the top
    layer is not stacked and is None). ``slot_select`` (or None): a callable ``(layer index, q [B, H, m, Dk]) -> [B, H,
    m, T] bool`` of the cached slots each query may read at that layer (query-aware
    sparsity, :func:`quest_pages.quest_slot_select`); the new tokens stay visible as without
    it. Returns (hidden [B, m, d], k [L,B,H,m,Dk], v, attn [L,B,H,m,T+m] or None (compressed
    reads), queries [L,B,H,m,Dk] or None).
    """
    rngs = [None] * (len(self.layers) + 1)
    if train_rng is not None:
      rngs = list(jax.random.split(train_rng, len(self.layers) + 1))
    x = self.embed(items, jnp.maximum(q_pos, 0), rngs[0])
    extra = {} if isolated is None else {"isolated": isolated}
    if slot_select is not None:
      if not isinstance(cache, Cache):
        raise ValueError("slot_select needs a materialized memory (memory.materialize())")
      for layer in self.layers:
        if "slot_select" not in inspect.signature(layer.step).parameters:
          raise ValueError(f"slot_select: {type(layer).__name__} does not support a per-query "
                           "slot selection (HSTU and SASRec layers do)")
    ks, vs, attns, qs = [], [], [], []
    for i, layer in enumerate(self.layers):
      if slot_select is not None:
        extra["slot_select"] = functools.partial(slot_select, i)
      if isinstance(cache, Cache):
        kv = (cache.k[i], cache.v[i], cache.pos[i], cache.ts[i])
      else:  # a compressed memory read in its own form (malloc_jax.reads); attn is then None
        if isolated is not None:
          raise ValueError("rank needs a materialized memory (memory.materialize()): the "
                           "compressed reads of malloc_jax.reads have no candidate block mask")
        kv = (reads.LayerView(cache, i), None, None, None)
      if last_rows is not None and i == len(self.layers) - 1:
        extra["rows"] = last_rows
      x, k, v, a, *q = layer.step(x, q_pos, q_ts, q_valid, *kv, rngs[i + 1], **extra)
      qs.extend(q)  # layers that return their queries (HSTU, SASRec)
      ks.append(k)
      vs.append(v)
      attns.append(a)
    x = self.output(x)
    if last_rows is not None:  # the top layer's rows differ in number: nothing to stack
      return x, jnp.stack(ks), jnp.stack(vs), None, None
    attn = None if attns[0] is None else jnp.stack(attns)
    queries = jnp.stack(qs) if len(qs) == len(self.layers) else None
    return x, jnp.stack(ks), jnp.stack(vs), attn, queries

  def empty_cache(self, batch: int, capacity: int = 0) -> Cache:
    h, dk, dv = self.head_dims()
    return cache_lib.empty_cache(len(self.layers), batch, h, capacity, dk, dv)

  def __call__(self, events: Events, train_rng=None) -> jax.Array:
    """Full forward pass over whole sequences (causal). Returns hidden states [B, N, d]."""
    cache = self.empty_cache(events.items.shape[0])
    x, *_ = self._run(cache, events, jnp.zeros_like(events.length), train_rng)
    return x

  def prefill(self, events: Events, window: int = 8) -> tuple[Cache, Signals]:
    """Encodes histories into a native cache of capacity N, with attention signals.

    Args:
      events: histories [B, N], right-padded; users may have length 0.
      window: W, number of each user's last queries whose attention rows are returned.

    Returns:
      (cache with k [L,B,H,N,Dk], signals with acc_attn [L,B,H,N], window_attn
      [L,B,H,W,N] and, where the layers return their queries, window_queries [L,B,H,W,Dk]).
    """
    cache = self.empty_cache(events.items.shape[0])
    return self.extend(cache, events, window)

  def extend(self, cache: Cache, events: Events, window: int = 8) -> tuple[Cache, Signals]:
    """Appends new events to a (possibly compressed) cache.

    The new events attend to the cached slots and causally to each other; their keys and
    values are written at each user's fill index. The result has capacity T + m.

    Returns:
      (extended cache, signals over its T + m slots from the new queries only).
    """
    fill = cache.fill
    _, k, v, attn, q_pos, queries = self._run(cache, events, cache.length)
    new_cache = cache_lib.append(cache, k, v, q_pos, jnp.where(q_pos >= 0, events.ts, 0))
    T = cache.capacity
    qv = events.valid  # [B, m]
    acc = jnp.sum(attn * qv[None, :, None, :, None], axis=3)  # [L,B,H,T+m]
    acc = _place(acc[..., :T], acc[..., T:], fill)
    # The last W real queries of each user: rows length-W .. length-1 of the new block.
    rows = events.length[:, None] - window + jnp.arange(window)[None]  # [B, W]
    w_valid = rows >= 0
    idx = jnp.clip(rows, 0, events.items.shape[1] - 1)
    win = jnp.take_along_axis(attn, idx[None, :, None, :, None], axis=3)  # [L,B,H,W,T+m]
    win = win * w_valid[None, :, None, :, None]
    win = _place(win[..., :T], win[..., T:], fill)
    wq = None
    if queries is not None:  # [L,B,H,W,Dk], padding rows zero
      wq = jnp.take_along_axis(queries, idx[None, :, None, :, None], axis=3)
      wq = wq * w_valid[None, :, None, :, None]
    return new_cache, Signals(acc_attn=acc, window_attn=win, window_valid=w_valid,
                              window_queries=wq)

  def encode(self, cache: Cache, events: Events) -> jax.Array:
    """Hidden states [B, m, d] of new events read against the cache (cache unchanged).

    ``cache`` may also be a compressed memory (DenseMemory, LowRankMemory, KiviMemory,
    UniformMemory, IntactKVMemory): it is then read without materializing (malloc_jax.reads).
    """
    x, *_ = self._run(cache, events, reads.memory_length(cache))
    return x

  def user_embedding(self, cache: Cache, queries: Events) -> jax.Array:
    """Normalized top state [B, d] of each user's last query event."""
    x = self.encode(cache, queries)
    last = jnp.clip(queries.length - 1, 0, queries.items.shape[1] - 1)
    h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return l2_normalize(h)

  def item_embeddings(self) -> jax.Array:
    """Normalized output item table [V + 1, d] (row 0 is padding)."""
    return l2_normalize(self.item_emb.embedding[...])

  def logits(self, h: jax.Array, candidates: jax.Array | None = None) -> jax.Array:
    """Cosine similarities / temperature of normalized states h [..., d] to items.

    candidates: None for all items ([..., V + 1], padding item at -inf), or ids [..., C].
    """
    table = self.item_embeddings()
    if candidates is None:
      s = h @ table.T / self.temperature
      return s.at[..., 0].set(-jnp.inf)
    return jnp.einsum("...d,...cd->...c", h, table[candidates]) / self.temperature

  def score(self, cache: Cache, queries: Events, candidates: jax.Array | None = None):
    """Scores items for each user's last query event read against the memory.

    Returns logits [B, V + 1] (all items) or [B, C] (given candidate ids [B, C]).
    """
    return self.logits(self.user_embedding(cache, queries), candidates)


  # --- ranking (M-FALCON) ------------------------------------------------------------------
  def rank_logits(self, h: jax.Array, candidates: jax.Array) -> jax.Array:
    """The ranking head: logits [B, C] of candidate output states h [B, C, d].

    logit = <√d · h_c / |h_c|, e_c> + w·h_c + b: the dot product of a candidate's top state,
    rescaled to norm √d, with its own (raw) input embedding e_c, which reads "does the
    memory's evidence match this item", plus a learned linear head ``rank_head`` (a global
    offset that calibrates the binary cross-entropy, and any item-independent evidence in the
    state). The rescaling matters for HSTU, whose top state has no final LayerNorm: its
    residual carries √d · e_c, so <h_c, e_c> starts as √d |e_c|^2, an item-norm term that
    swamps the memory's evidence (BENCHMARKS.md, target-aware ranking).
    """
    e = self.item_emb.embedding[...][candidates]  # [B, C, d]
    hn = l2_normalize(h) * (h.shape[-1] ** 0.5)
    return jnp.sum(hn * e, axis=-1) + self.rank_head(h)[..., 0]

  def rank(self, cache: Cache, request: Events, candidates: jax.Array,
           candidate_ts: jax.Array | None = None, *, return_attn: bool = False,
           train_rng=None, slot_select=None, return_queries: bool = False):
    """Target-aware ranking: each candidate is a query token reading memory and request.

    One pass over [request events; candidate tokens] against the memory (M-FALCON): the
    request events attend to the memory and causally to one another, as in ``encode``; each
    candidate token (its item embedding, the request's time stamp, position = the request's
    next position) attends to every memory slot, every request event and itself, never to
    the other candidates (block mask, :func:`attention_mask` with ``isolated``). A candidate's
    logit is :meth:`rank_logits` of its top-layer state, so it equals the score of a full
    forward pass over history + request + that candidate alone.

    Args:
      cache: the (materialized) memory; any fill, compressed or not.
      request: the request's events [B, m] (right-padded, users may have length 0).
      candidates: item ids [B, C].
      candidate_ts: [B] time stamp of the candidates; default the request's last event time
        (0 when the request is empty).
      return_attn: also return the candidates' attention over the memory slots.
      train_rng: dropout key (training) or None.
      slot_select: None (every query reads every memory slot), or a callable
        ``(layer, q [B, H, m + C, Dk]) -> [B, H, m + C, T] bool``: the memory slots each
        request event and candidate may read at that layer, from its own query (Quest:
        :func:`malloc_jax.compressors.quest_pages.quest_slot_select`). Request events and
        candidates stay visible as without it. HSTU and SASRec layers; others refuse it.
      return_queries: also return every token's queries [L, B, H, m + C, Dk] (request
        events first), from which the selection of each layer can be recomputed.

    Returns:
      logits [B, C]; with ``return_attn`` (logits, attn [L, B, H, C, T]) where attn is the
      candidate rows of the layers' attention (softmax probability or |SiLU| / N per slot);
      with ``return_queries`` the queries follow (after attn when both are asked).

    References: Zhai et al., "Actions Speak Louder than Words", ICML 2024 (M-FALCON);
      Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
    """
    m = request.items.shape[1]
    items, q_pos, q_ts, q_valid, isolated = rank_tokens(cache.length, request, candidates,
                                                        candidate_ts)
    extra = {}
    if slot_select is not None:
      if "slot_select" not in inspect.signature(self._run_tokens).parameters:
        raise ValueError(f"slot_select: {type(self).__name__} does not support a per-query "
                         "slot selection (HSTU and SASRec do)")
      extra["slot_select"] = slot_select
    x, _, _, attn, queries = self._run_tokens(cache, items, q_pos, q_ts, q_valid, train_rng,
                                              isolated, **extra)
    logits = self.rank_logits(x[:, m:], candidates)
    extras = ()
    if return_attn:
      extras += (attn[:, :, :, m:, :cache.capacity],)
    if return_queries:
      if queries is None:
        raise ValueError(f"return_queries: {type(self).__name__}'s layers return no queries")
      extras += (queries,)
    return (logits, *extras) if extras else logits

  @property
  def has_score_bias(self) -> bool:
    """Whether every layer adds a score bias to q . k (HSTU's relative position/time bias)."""
    return all(hasattr(layer, "bias") for layer in self.layers)

  def rank_slot_bias(self, cache: Cache, request: Events, candidates: jax.Array,
                     candidate_ts: jax.Array | None = None) -> jax.Array | None:
    """[L, B, H, m + C, T]: the additive score bias (HSTU's rab) of every token of
    ``rank(cache, request, candidates)`` on every memory slot, the ``bias`` each layer
    passes to a ``slot_select``; None when the layers add none (SASRec)."""
    if not self.has_score_bias:
      return None
    _, q_pos, q_ts, _, _ = rank_tokens(cache.length, request, candidates, candidate_ts)
    return jnp.stack([layer.bias(q_pos, q_ts, cache.pos[i], cache.ts[i])
                      for i, layer in enumerate(self.layers)])


def rank_tokens(start: jax.Array, request: Events, candidates: jax.Array,
                candidate_ts: jax.Array | None = None):
  """The tokens of a ranking request after a memory of ``start`` [B] events: (items, q_pos,
  q_ts, q_valid, isolated), each [B, m + C], request events first (positions start, start+1,
  ...), then the candidates at the request's next position and its last time stamp (or
  ``candidate_ts`` [B]), isolated from one another (see ``SequenceRecommender.rank``)."""
  B, m = request.items.shape
  C = candidates.shape[1]
  r_valid = request.valid
  r_pos = jnp.where(r_valid, start[:, None] + jnp.arange(m, dtype=jnp.int32)[None], -1)
  if candidate_ts is None:
    candidate_ts = request_time(request)
  c_pos = jnp.broadcast_to((start + request.length)[:, None], (B, C)).astype(jnp.int32)
  items = jnp.concatenate([request.items, candidates.astype(request.items.dtype)], axis=1)
  q_pos = jnp.concatenate([r_pos, c_pos], axis=1)
  q_ts = jnp.concatenate([jnp.where(r_valid, request.ts, 0),
                          jnp.broadcast_to(candidate_ts[:, None], (B, C)).astype(
                              request.ts.dtype)], axis=1)
  q_valid = jnp.concatenate([r_valid, jnp.ones((B, C), bool)], axis=1)
  isolated = jnp.concatenate([jnp.zeros((B, m), bool), jnp.ones((B, C), bool)], axis=1)
  return items, q_pos, q_ts, q_valid, isolated


def request_time(request: Events) -> jax.Array:
  """[B] time stamp of each request's last event (0 for an empty request)."""
  last = jnp.clip(request.length - 1, 0, request.items.shape[1] - 1)
  ts = jnp.take_along_axis(request.ts, last[:, None], axis=1)[:, 0]
  return jnp.where(request.length > 0, ts, 0)


def l2_normalize(x, eps=1e-6):
  """x [..., d] scaled to unit L2 norm along the last axis (eps keeps zero rows finite)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def attention_mask(q_pos, q_valid, kpos, isolated=None):
  """[B, H, m, T + m] bool: key slot holds an event at or before the (real) query's position.

  kpos [B, H, T + m] lists the T cached slots followed by the m new tokens. ``isolated``
  [B, m] bool (M-FALCON's block mask) additionally hides every isolated new token from every
  other new token, and from an isolated token every other key at or after its own position:
  a ranking candidate at position p sees the memory and the request events before p and
  itself, never another candidate, and no request event sees a candidate. When serving,
  every memory and request event precedes the candidates' position, so the position rule is
  idle; it lets training place candidates at several positions of one window
  (``train.ranking_logits``).
  """
  mask = (kpos[:, :, None, :] >= 0) & (kpos[:, :, None, :] <= q_pos[:, None, :, None]) & (
      q_valid[:, None, :, None])
  if isolated is None:
    return mask
  m = q_pos.shape[1]
  T = kpos.shape[-1] - m
  other = ~jnp.eye(m, dtype=bool)[None]  # [1, m, m]
  # An isolated key is seen by itself only (not by other isolated or by ordinary tokens).
  hide = isolated[:, None, :] & (other | ~isolated[:, :, None])  # [B, m, m]
  hide = jnp.pad(hide, ((0, 0), (0, 0), (T, 0)))  # cached slots are never hidden
  not_self = jnp.pad(other, ((0, 0), (0, 0), (T, 0)), constant_values=True)  # [1, m, T+m]
  late = (kpos[:, :, None, :] >= q_pos[:, None, :, None]) & (
      isolated[:, None, :, None] & not_self[:, None])  # [B, H, m, T+m]
  return mask & ~hide[:, None] & ~late


def select_slots(mask, q, slot_select, bias=None):
  """``mask`` [B, H, m, T + m] restricted to the cached slots ``slot_select(q)`` [B, H, m, T]
  allows (the m new tokens untouched); ``mask`` itself when ``slot_select`` is None.

  ``bias`` [B, H, m, T] (or None): the additive score bias of each query on each cached slot
  (HSTU's relative position and time bias), passed as ``slot_select(q, bias=bias)`` to a
  selection that takes it."""
  if slot_select is None:
    return mask
  m = q.shape[2]
  takes_bias = bias is not None and "bias" in inspect.signature(slot_select).parameters
  chosen = slot_select(q, bias=bias) if takes_bias else slot_select(q)
  return mask & jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, m)), constant_values=True)


def concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts):
  """Cached slots followed by the new events' keys: k [B,H,T+m,D], pos/ts [B,H,T+m]."""
  H = k.shape[1]
  B, m = q_pos.shape
  kk = jnp.concatenate([ck.astype(k.dtype), k], axis=2)
  vv = jnp.concatenate([cv.astype(v.dtype), v], axis=2)
  kpos = jnp.concatenate([cpos, jnp.broadcast_to(q_pos[:, None], (B, H, m))], axis=2)
  kts = jnp.concatenate([cts, jnp.broadcast_to(q_ts[:, None], (B, H, m))], axis=2)
  return kk, vv, kpos, kts


def dropout(x, rate: float, rng):
  if rng is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)
