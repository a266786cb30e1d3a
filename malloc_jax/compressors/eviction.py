"""Token pruning of per-user KV memories: H2O, SnapKV, StreamingLLM and a random floor.

Every compressor here keeps, independently per layer, user and head, at most ``budget`` of the
events held in the cache and returns::

  DenseMemory(index=SparseIndex(pos, ts, length), k, v)
    k [L, B, H, budget, Dk], v [L, B, H, budget, Dv]   kept keys and values (cache dtype)
    pos, ts [L, B, H, budget] int32                    ORIGINAL positions / timestamps, -1 / 0
                                                       in empty slots
    length [B] int32                                   unchanged: the number of events seen

Kept slots are compacted to a prefix of the slot axis and sorted by original position, so the
result is again a valid Cache after ``materialize()`` (and ``extend`` can append to it). A row
whose cache holds fewer real events than the budget keeps all of them; empty or padding slots
are never kept in place of a real event. Top-k ties are broken by the smaller event position.

The memory capacity (``budget``) is static; caches smaller than the budget are padded with
empty slots first. Selection relies on the cache invariant that occupied slots are a prefix of
the slot axis sorted by position (what ``prefill``, ``append`` and every compressor leave), so
"the r newest events" of a row with n occupied slots are slots n - r .. n - 1.

Attention signals: ``signals.acc_attn`` [L, B, H, T] is the attention each cached key received,
summed over the real queries (softmax probabilities for SASRec, |SiLU(s)| / N for HSTU's
pointwise attention); ``signals.window_attn`` [L, B, H, W, T] holds the rows of each user's
last W real queries (rows of users shorter than W are zero).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.cache import Cache, Signals, pad_capacity
from malloc_jax.compressors.base import (
  Compressor,
  DenseMemory,
  SparseIndex,
  init_empty,
  row_counts,
)
from malloc_jax.compressors.spec import CacheShape, MethodSpec, budget_range

_INT32_MAX = int(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------------------
# Validation helpers (shared with merging, quantization and the registry).


def check_int(method: str, name: str, value, minimum: int = 0) -> int:
  """Returns ``value`` as an int, or raises ValueError naming ``method``'s parameter."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{method}: {name}={value!r} must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{method}: {name}={value} must be >= {minimum}")
  return int(value)


def check_choice(method: str, name: str, value, choices) -> object:
  """Returns ``value`` if it is one of ``choices``, else raises ValueError naming the parameter."""
  if isinstance(value, bool) or value not in choices:
    raise ValueError(f"{method}: {name}={value!r} is not supported; expected one of "
                     f"{list(choices)}")
  return value


def require_signals(method: str, signals: Signals | None) -> Signals:
  if signals is None:
    raise ValueError(f"{method} needs attention signals (the `signals` returned by "
                     f"model.prefill / model.extend); got signals=None. Inside chain(), put "
                     f"{method} first: later steps receive no signals.")
  return signals


def _check_signal_slots(method: str, x: jax.Array, cache: Cache, what: str) -> None:
  if x.shape[-1] != cache.capacity:
    raise ValueError(f"{method}: signals.{what} covers {x.shape[-1]} slots but the cache has "
                     f"capacity {cache.capacity}; pass the signals of this cache")


# ----------------------------------------------------------------------------------------
# Selection machinery.


def pad_slots(x: jax.Array, capacity: int, value=0) -> jax.Array:
  """Pads the slot axis (the last one) of x [..., T] to ``capacity`` with ``value``."""
  extra = capacity - x.shape[-1]
  if extra <= 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=value)


def slot_ranks(cache: Cache) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(valid, rank from the oldest, rank from the newest), each [L, B, H, T].

  Occupied slots are a prefix sorted by position, so slot t of a row holding n events is the
  t-th oldest and the (n - 1 - t)-th newest.
  """
  valid = cache.pos >= 0  # [L, B, H, T]
  n = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)  # [L, B, H, 1]
  oldest = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), valid.shape)
  return valid, oldest, n - 1 - oldest


def take_slots(x: jax.Array, sel: jax.Array) -> jax.Array:
  """Gathers slots ``sel`` [L, B, H, k] from x [L, B, H, T] or [L, B, H, T, D]."""
  if x.ndim == sel.ndim:
    return jnp.take_along_axis(x, sel, axis=-1)
  return jnp.take_along_axis(x, sel[..., None], axis=-2)


def ordered_key(score: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order is the float order of ``score`` (NaN lowest, -0 = +0)."""
  score = score.astype(jnp.float32)
  # -0.0 -> 0.0 by a comparison (XLA folds x + 0.0 away).
  b = jax.lax.bitcast_convert_type(jnp.where(score == 0, 0.0, score), jnp.uint32)
  u = jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))
  return jnp.where(jnp.isnan(score), jnp.uint32(0), u)


def kth_largest(key: jax.Array, member: jax.Array, need: jax.Array) -> jax.Array:
  """[...]: the ``need``-th largest uint32 ``key`` [..., T] among ``member`` slots, per row.

  A 32-step radix select (the threshold is built bit by bit from the top: a bit is kept when
  at least ``need`` members reach the prefix with it), so it costs 32 counting passes over
  the row instead of a sort. Rows with need <= 0 get 0xFFFFFFFF; need must not exceed the
  number of members.
  """

  def step(i, prefix):  # prefix [...]
    trial = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    count = jnp.sum(member & (key >= trial[..., None]), axis=-1, dtype=jnp.int32)
    return jnp.where(count >= need, trial, prefix)

  return jax.lax.fori_loop(0, 32, step, jnp.zeros(key.shape[:-1], jnp.uint32), unroll=True)


def compact(mask: jax.Array, k: int) -> jax.Array:
  """[..., k] int32: the slots where ``mask`` [..., T] is set, then the others, each in order."""
  T = mask.shape[-1]
  slot = jnp.arange(T, dtype=jnp.int32)
  before = jnp.cumsum(mask, axis=-1, dtype=jnp.int32)  # set slots in [0, t]
  count = before[..., -1:]
  dest = jnp.where(mask, before - 1, count + slot - before)  # a permutation of 0..T-1
  rows = dest.reshape(-1, T)
  out = jax.vmap(lambda d: jnp.zeros((k,), jnp.int32).at[d].set(slot, mode="drop"))(rows)
  return out.reshape(mask.shape[:-1] + (k,))


def top_slots(tier: jax.Array, score: jax.Array, pos: jax.Array,
              k: int) -> tuple[jax.Array, jax.Array]:
  """Picks k slots per row by (tier desc, score desc, position asc), then orders them by position.

  Relies on the cache invariant (occupied slots are a prefix sorted by position, the empty
  slots after them), so position order is slot order. Instead of sorting the row, the tier
  that the k-th pick falls in is found by counting, the score threshold within it by a radix
  select over order-preserving integer keys (:func:`kth_largest`), and ties at the
  threshold go to the smaller slots by a running count: the picks are exactly those of a
  stable sort by (tier, score, position).

  Args:
    tier: [L, B, H, T] int32 in {0, 1, 2}; 0 marks slots that must not be chosen over any real
      event (empty slots), higher tiers are always chosen before lower ones.
    score: [L, B, H, T] float; ranks slots within a tier (larger first; NaN last).
    pos: [L, B, H, T] int32 original positions (ties go to the smaller one).
    k: number of slots to pick (<= T).

  Returns:
    (sel [L, B, H, k] int32 slot indices sorted by position, tier-0 picks last (in slot
     order); picked [L, B, H, k] bool, the slot is a real (tier > 0) event).
  """
  del pos  # position order is slot order (see above)
  n2 = jnp.sum(tier == 2, axis=-1, dtype=jnp.int32)  # [L, B, H]
  n1 = jnp.sum(tier == 1, axis=-1, dtype=jnp.int32)
  # The tier of the k-th pick (0: fewer than k real events, all of them are picked).
  edge = jnp.where(n2 >= k, 2, jnp.where(n2 + n1 >= k, 1, 0))[..., None]  # [L, B, H, 1]
  above = tier > edge
  member = (tier == edge) & (edge > 0)
  need = k - jnp.sum(above, axis=-1, dtype=jnp.int32)  # picks left for the edge tier
  key = ordered_key(score)
  cut = kth_largest(key, member, need)[..., None]
  over = member & (key > cut)
  tie = member & (key == cut)
  left = (need - jnp.sum(over, axis=-1, dtype=jnp.int32))[..., None]
  tie_rank = jnp.cumsum(tie, axis=-1, dtype=jnp.int32) - tie  # earlier tied slots
  chosen = above | over | (tie & (tie_rank < left))  # [L, B, H, T], min(k, #real) slots
  sel = compact(chosen, k)
  picked = jnp.arange(k) < jnp.sum(chosen, axis=-1, keepdims=True, dtype=jnp.int32)
  return sel, picked


def mark_slots(sel: jax.Array, picked: jax.Array, capacity: int) -> jax.Array:
  """[L, B, H, capacity] bool: the slots ``sel`` [L, B, H, k] whose ``picked`` is set."""
  out = jnp.zeros(sel.shape[:-1] + (capacity,), jnp.bool_)
  return jnp.put_along_axis(out, sel, picked, axis=-1, inplace=False)


def kept_memory(cache: Cache, sel: jax.Array, picked: jax.Array, k=None, v=None) -> DenseMemory:
  """DenseMemory of slots ``sel`` of ``cache`` (or of the given k, v already gathered)."""
  k = take_slots(cache.k, sel) if k is None else k
  v = take_slots(cache.v, sel) if v is None else v
  m = picked[..., None]
  index = SparseIndex(pos=jnp.where(picked, take_slots(cache.pos, sel), -1),
                      ts=jnp.where(picked, take_slots(cache.ts, sel), 0), length=cache.length)
  return DenseMemory(index=index, k=jnp.where(m, k, 0).astype(cache.k.dtype),
                     v=jnp.where(m, v, 0).astype(cache.v.dtype))


def pool1d(x: jax.Array, kernel: int, mode: str) -> jax.Array:
  """1-D pooling along the last axis, stride 1, "same" padding kernel // 2 (kernel odd).

  "avg" pads with zeros that count in the divisor (PyTorch ``avg_pool1d`` default,
  count_include_pad=True); "max" pads with -inf (PyTorch ``max_pool1d``).
  """
  T, p = x.shape[-1], kernel // 2
  fill = 0.0 if mode == "avg" else -jnp.inf
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)], constant_values=fill)
  shifts = [xp[..., j:j + T] for j in range(kernel)]
  if mode == "avg":
    return sum(shifts[1:], shifts[0]) / kernel
  return jnp.max(jnp.stack(shifts, axis=-1), axis=-1)


def _pad_cache(cache: Cache, capacity: int) -> Cache:
  return pad_capacity(cache, capacity) if cache.capacity < capacity else cache


# ----------------------------------------------------------------------------------------
# H2O.


class H2OState(NamedTuple):
  """Accumulated attention of the kept slots, acc [L, B, H, budget] float32.

  ``model.extend`` leaves the kept events of a materialized memory in slots 0 .. budget-1,
  so on the next ``compress`` this is added to the new queries' ``signals.acc_attn`` there:
  scores accumulate over every request, as in H2O's decoding loop.
  """

  acc: jax.Array

  def stored_bytes(self, memory) -> np.ndarray:
    """[B] int64: one accumulated-attention number per kept event a later request ranks:
    ``s_acc * sum_rows m``, m = events each (layer, head) row of ``memory`` holds (the
    kept events; token-level steps come first in a chain, so ``memory``'s rows are them)."""
    L, _, H = self.acc.shape[:3]
    m = row_counts(memory.index, L, H)
    return m.sum(axis=(0, 2)) * np.dtype(self.acc.dtype).itemsize

  def buffer_bytes(self) -> float:
    """Static buffer of the state per user: acc [L, B, H, budget]."""
    return int(np.prod(self.acc.shape)) * np.dtype(self.acc.dtype).itemsize / self.acc.shape[1]


def h2o_select(cache: Cache, acc: jax.Array, heavy: int, recent: int):
  """H2O rule on a cache of capacity >= heavy + recent: (sel, picked) as in :func:`top_slots`."""
  valid, _, newest = slot_ranks(cache)
  forced = valid & (newest < recent)
  tier = jnp.where(forced, 2, jnp.where(valid, 1, 0))
  return top_slots(tier, acc, cache.pos, heavy + recent)


def h2o_scores(method: str, cache: Cache, state: H2OState, signals: Signals | None,
               budget: int, accumulate: bool) -> tuple[Cache, jax.Array]:
  """Pads the cache to ``budget`` slots; returns it and the accumulated attention [L,B,H,T]."""
  signals = require_signals(method, signals)
  _check_signal_slots(method, signals.acc_attn, cache, "acc_attn")
  cache = _pad_cache(cache, budget)
  acc = pad_slots(signals.acc_attn.astype(jnp.float32), cache.capacity)  # [L, B, H, T]
  if accumulate:
    acc = acc.at[..., :budget].add(state.acc)
  return cache, jnp.where(cache.pos >= 0, acc, 0.0)


def h2o(heavy: int, recent: int, accumulate: bool = True) -> Compressor:
  """Heavy-hitter oracle: keeps the ``recent`` newest events plus the ``heavy`` heaviest.

  Per layer, user and head, the ``recent`` newest events always stay; among the rest the
  ``heavy`` events with the largest accumulated attention (``signals.acc_attn``, plus the
  accumulated attention carried in the state when ``accumulate``) are kept, ties to the
  smaller position. Evicted events never return.

  Args:
    heavy: number of heavy hitters (>= 0). recent: size of the recent window (>= 0).
    accumulate: carry the kept events' accumulated attention in the state, so re-compressing
      after ``extend`` ranks events by all the attention they ever received.

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity heavy + recent (see module
    docstring); state: :class:`H2OState`.

  References: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models", NeurIPS 2023.
  """
  heavy = check_int("h2o", "heavy", heavy)
  recent = check_int("h2o", "recent", recent)
  budget = heavy + recent
  if budget < 1:
    raise ValueError(f"h2o: heavy + recent must be >= 1; got heavy={heavy}, recent={recent}")

  def init(cache):
    return H2OState(jnp.zeros(cache.pos.shape[:3] + (budget,), jnp.float32))

  def compress(cache, state, signals=None):
    cache, acc = h2o_scores("h2o", cache, state, signals, budget, accumulate)
    sel, picked = h2o_select(cache, acc, heavy, recent)
    new_acc = jnp.where(picked, take_slots(acc, sel), 0.0)
    return kept_memory(cache, sel, picked), H2OState(new_acc)

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# SnapKV.


def snapkv_votes(signals: Signals, cache: Cache, window: int, kernel: int,
                 pool: str) -> jax.Array:
  """Pooled votes [L, B, H, T] of the last ``window`` queries for the events before the window.

  Votes outside the before-window prefix are zero before pooling, which is exactly the zero
  padding PyTorch applies at the prefix's ends; entries outside the prefix are meaningless.
  """
  win = signals.window_attn  # [L, B, H, W, T]
  W = win.shape[3]
  if W < window:
    raise ValueError(f"snapkv: window={window} needs signals with at least {window} window "
                     f"rows (model.prefill(events, window>={window})); got W={W}")
  _check_signal_slots("snapkv", win, cache, "window_attn")
  votes = jnp.sum(win[:, :, :, W - window:, :].astype(jnp.float32), axis=3)  # [L, B, H, T]
  valid, _, newest = slot_ranks(cache)
  prefix = valid & (newest >= window)  # events before the window
  votes = jnp.where(prefix, votes, 0.0 if pool == "avg" else -jnp.inf)
  return pool1d(votes, kernel, pool)


def check_snapkv_args(method: str, budget, window, kernel, pool) -> tuple[int, int, int]:
  """Validates the arguments SnapKV and its per-layer / per-head variants share; returns
  (budget, window, kernel) as ints. Errors name ``method``'s parameter."""
  budget = check_int(method, "budget", budget, 1)
  window = check_int(method, "window", window, 1)
  kernel = check_int(method, "kernel", kernel, 1)
  if kernel % 2 == 0:
    raise ValueError(f"{method}: kernel={kernel} must be odd ('same' pooling)")
  check_choice(method, "pool", pool, ("avg", "max"))
  if window > budget:
    raise ValueError(f"{method}: window={window} must be <= budget={budget}")
  return budget, window, kernel


def snapkv(budget: int, window: int = 8, kernel: int = 5, pool: str = "avg") -> Compressor:
  """SnapKV: keeps the last ``window`` events plus those the window's queries vote for.

  Votes are the attention of the last ``window`` queries (the last rows of
  ``signals.window_attn``) to each event before the window, summed over those queries, then
  pooled along time (kernel ``kernel``, stride 1, "same" padding; avg pooling counts the zero
  padding in its divisor, as PyTorch's default). Per layer, user and head the top
  ``budget - window`` events before the window by pooled vote (ties to the smaller position)
  are kept, plus the ``window`` window events.

  Args:
    budget: kept events per head (>= window). window: observation window w (>= 1; the
      signals must hold W >= w rows). kernel: odd pooling size (SnapKV uses 5 or 7).
    pool: "avg" or "max".

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity ``budget``; state: EmptyState.

  References: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    NeurIPS 2024.
  """
  budget, window, kernel = check_snapkv_args("snapkv", budget, window, kernel, pool)

  def compress(cache, state, signals=None):
    signals = require_signals("snapkv", signals)
    votes = snapkv_votes(signals, cache, window, kernel, pool)
    cache = _pad_cache(cache, budget)
    votes = pad_slots(votes, cache.capacity)
    valid, _, newest = slot_ranks(cache)
    tier = jnp.where(valid & (newest < window), 2, jnp.where(valid, 1, 0))
    sel, picked = top_slots(tier, votes, cache.pos, budget)
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


# ----------------------------------------------------------------------------------------
# StreamingLLM.


def streaming(sinks: int, recent: int) -> Compressor:
  """StreamingLLM: keeps the first ``sinks`` events (attention sinks) and the ``recent`` newest.

  Args:
    sinks: number of initial events kept (>= 0). recent: recent window (>= 0).

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity sinks + recent; no signals
    needed; state: EmptyState.

  References: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    ICLR 2024.
  """
  sinks = check_int("streaming", "sinks", sinks)
  recent = check_int("streaming", "recent", recent)
  budget = sinks + recent
  if budget < 1:
    raise ValueError(f"streaming: sinks + recent must be >= 1; got sinks={sinks}, "
                     f"recent={recent}")

  def compress(cache, state, signals=None):
    del signals
    cache = _pad_cache(cache, budget)
    valid, oldest, newest = slot_ranks(cache)
    forced = valid & ((oldest < sinks) | (newest < recent))
    tier = jnp.where(forced, 2, jnp.where(valid, 1, 0))
    sel, picked = top_slots(tier, jnp.zeros(tier.shape, jnp.float32), cache.pos, budget)
    return kept_memory(cache, sel, picked), state

  return Compressor(init_empty, compress)


# ----------------------------------------------------------------------------------------
# Random floor.


class RandomState(NamedTuple):
  """uint32 key of the next ``compress`` (advanced on every call); one for all users."""

  key: jax.Array


_GOLDEN = 0x9E3779B9


def hash32(x: jax.Array) -> jax.Array:
  """The "lowbias32" integer hash (C. Wellons): a bijection of uint32 with good avalanche."""
  x = x.astype(jnp.uint32)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def user_fingerprint(cache: Cache) -> jax.Array:
  """[B] uint32: a hash of each user's own history (its length, and the position, time stamp
  and first key channel of every event of layer 0, head 0), independent of the user's place
  in the batch: users with different histories get different fingerprints (but for hash
  collisions), the same user gets the same one in any batch."""
  pos, ts = cache.pos[0, :, 0], cache.ts[0, :, 0]  # [B, T]
  kbits = jax.lax.bitcast_convert_type(cache.k[0, :, 0, :, 0].astype(jnp.float32), jnp.uint32)
  kbits = jnp.where(jnp.isnan(cache.k[0, :, 0, :, 0]), jnp.uint32(0x7FC00000), kbits)
  event = hash32(hash32(pos.astype(jnp.uint32)) ^ ts.astype(jnp.uint32) ^ hash32(kbits))
  total = jnp.sum(jnp.where(pos >= 0, event, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)
  return hash32(total + hash32(cache.length.astype(jnp.uint32)))


def random(budget: int, seed: int = 0) -> Compressor:
  """Keeps ``budget`` events per layer, user and head drawn uniformly among the real events.

  A floor for the attention-aware methods. Every slot (l, b, h, t) of the [L, B, H, T] cache
  gets the score hash32(key ^ hash32(hash32(i) ^ f_b)), with i = (l * H + h) * T + t the
  slot's index within the user and f_b = :func:`user_fingerprint` of user b, and the
  ``budget`` real events with the largest scores are kept (a uniformly random subset; ties
  to the smaller position). So every user gets its own draw, which does not depend on the
  user's place in the batch or on the other users. The key starts at hash32(seed) and
  advances to hash32(key + 0x9E3779B9) on every call, so results are deterministic given
  ``seed`` and the user's history, identical on every backend, and cheap to compile (a
  counter hash instead of threefry, whose CPU compile takes seconds).

  Args:
    budget: kept events per head (>= 1). seed: integer seed (>= 0).

  Returns:
    A Compressor; memory: DenseMemory(SparseIndex) with capacity ``budget``; state:
    :class:`RandomState`.

  References: the random-eviction baseline of Zhang et al., H2O (NeurIPS 2023).
  """
  budget = check_int("random", "budget", budget, 1)
  seed = check_int("random", "seed", seed, 0)

  def init(cache):
    del cache
    return RandomState(hash32(jnp.uint32(seed % (1 << 32))))

  def compress(cache, state, signals=None):
    del signals
    cache = _pad_cache(cache, budget)
    valid = cache.pos >= 0  # [L, B, H, T]
    L, B, H, T = valid.shape
    i = jnp.arange(L * H * T, dtype=jnp.uint32).reshape(L, 1, H, T)  # slot within the user
    f = user_fingerprint(cache)[None, :, None, None]  # [1, B, 1, 1]
    u = hash32(state.key ^ hash32(hash32(i) ^ f))  # [L, B, H, T]
    score = (u >> 8).astype(jnp.float32)  # 24 bits, exact in float32
    sel, picked = top_slots(valid.astype(jnp.int32), score, cache.pos, budget)
    key = hash32(state.key + jnp.uint32(_GOLDEN))
    return kept_memory(cache, sel, picked), RandomState(key)

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# Registration (see malloc_jax.compressors.spec).


def heavy_recent_candidates(shape: CacheShape, fixed: dict) -> list[dict]:
  """Budgets 1..T split heavy = budget - recent, recent = budget // 2 unless one is fixed."""
  out = []
  for b in range(1, shape.capacity + 1):
    if "recent" in fixed:
      recent = fixed["recent"]
    elif "heavy" in fixed:
      recent = b - fixed["heavy"]
    else:
      recent = b // 2
    if 0 <= recent <= b:
      out.append({**fixed, "heavy": b - recent, "recent": recent})
  return out


def window_budget_candidates(shape: CacheShape, fixed: dict) -> list[dict]:
  """Budgets of a method that keeps an observation window (SnapKV and its per-layer / per-head
  variants): ``window`` fixed, or min(8, budget)."""
  if "window" in fixed:
    return budget_range(shape, fixed, lo=fixed["window"])
  return [{**c, "window": min(8, c["budget"])} for c in budget_range(shape, fixed)]


def _streaming_candidates(shape: CacheShape, fixed: dict) -> list[dict]:
  out = []
  for b in range(1, shape.capacity + 1):
    sinks = fixed.get("sinks", min(4, b))
    if sinks <= b:
      out.append({**fixed, "sinks": sinks, "recent": b - sinks})
  return out


SPECS = (
    MethodSpec(name="h2o", factory=h2o, granularity="token", tuned="budget",
               candidates=heavy_recent_candidates, needs_signals=True,
               limits={"heavy": "capacity", "recent": "capacity"},
               example={"heavy": 2, "recent": 2},
               reference="Zhang et al., H2O: Heavy-Hitter Oracle, NeurIPS 2023"),
    MethodSpec(name="snapkv", factory=snapkv, granularity="token", tuned="budget",
               candidates=window_budget_candidates, needs_signals=True,
               limits={"budget": "capacity", "window": "capacity"},
               example={"budget": 5, "window": 2},
               reference="Li et al., SnapKV: LLM Knows What You are Looking for Before "
               "Generation, NeurIPS 2024"),
    MethodSpec(name="streaming", factory=streaming, granularity="token", tuned="budget",
               candidates=_streaming_candidates,
               limits={"sinks": "capacity", "recent": "capacity"},
               example={"sinks": 1, "recent": 3},
               reference="Xiao et al., Efficient Streaming Language Models with Attention "
               "Sinks, ICLR 2024"),
    MethodSpec(name="random", factory=random, granularity="token", tuned="budget",
               candidates=budget_range, limits={"budget": "capacity"},
               example={"budget": 4, "seed": 1},
               reference="the random-eviction baseline of Zhang et al., H2O (NeurIPS 2023)"),
)
