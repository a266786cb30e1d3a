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

  # --- core -----------------------------------------------------------------------------
  def _run(self, cache: Cache, events: Events, start: jax.Array, train_rng=None):
    """Runs new events through all layers against ``cache``.

    Returns (hidden [B, m, d], new k [L,B,H,m,Dk], new v, attn [L,B,H,m,T+m], q_pos [B,m],
    queries [L,B,H,m,Dk] or None when the layers do not return them).
    """
    B, m = events.items.shape
    q_valid = events.valid
    q_pos = jnp.where(q_valid, start[:, None] + jnp.arange(m, dtype=jnp.int32)[None], -1)
    q_ts = jnp.where(q_valid, events.ts, 0)
    rngs = [None] * (len(self.layers) + 1)
    if train_rng is not None:
      rngs = list(jax.random.split(train_rng, len(self.layers) + 1))
    x = self.embed(events.items, jnp.maximum(q_pos, 0), rngs[0])
    ks, vs, attns, qs = [], [], [], []
    for i, layer in enumerate(self.layers):
      # A compressed memory is read in its own form (malloc_jax.reads); attn is then None.
      kv = ((cache.k[i], cache.v[i], cache.pos[i], cache.ts[i]) if isinstance(cache, Cache)
            else (reads.LayerView(cache, i), None, None, None))
      x, k, v, a, *q = layer.step(x, q_pos, q_ts, q_valid, *kv, rngs[i + 1])
      qs.extend(q)
      ks.append(k)
      vs.append(v)
      attns.append(a)
    x = self.output(x)
    attn = None if attns[0] is None else jnp.stack(attns)
    queries = jnp.stack(qs) if len(qs) == len(self.layers) else None
    return x, jnp.stack(ks), jnp.stack(vs), attn, q_pos, queries

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


def l2_normalize(x, eps=1e-6):
  """x [..., d] scaled to unit L2 norm along the last axis (eps keeps zero rows finite)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def attention_mask(q_pos, q_valid, kpos):
  """[B, H, m, T] bool: key slot holds an event at or before the (real) query's position."""
  return (kpos[:, :, None, :] >= 0) & (kpos[:, :, None, :] <= q_pos[:, None, :, None]) & (
      q_valid[:, None, :, None])


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
