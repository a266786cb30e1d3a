"""Choosing each method's parameter so that a user's memory fits a byte budget.

Bytes are never estimated: every candidate memory (and compressor state) is built abstractly
with ``jax.eval_shape`` (shapes and dtypes only, nothing is computed) and measured with the
same closed form a real memory uses: :func:`~malloc_jax.compressors.base.stored_bytes` of a
full user (every slot of the memory holds a real event: n = capacity), the figure ratios
use; ``figure="buffer"`` gives the static buffer instead::

  spec = cache_spec(num_layers=2, heads=2, capacity=200, dk=25)
  budget_bytes("snapkv", spec, target_bytes=40_000)   # -> {"budget": 93, "window": 8}
  ratio_table("kivi", spec)                            # -> {2: {"bits": 4}, 4: ..., 8: ...}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.cache import Cache, Signals
from malloc_jax.compressors.base import (
  DenseIndex,
  DenseMemory,
  buffer_bytes,
  stored_bytes,
  user_bytes,
)
from malloc_jax.compressors.lowrank import LowRankBases, lowrank
from malloc_jax.compressors.registry import FACTORIES, make_compressor

# Which parameter each method's byte budget moves.
TUNED = {
    "native": None, "lowrank": "rank", "h2o": "budget", "merge_evicted": "budget",
    "snapkv": "budget", "streaming": "budget", "random": "budget", "kivi": "bits",
    "intactkv": "bits", "uniform": "bits",
}
_BITS = {"kivi": (2, 4), "intactkv": (2, 4, 8), "uniform": (4, 8)}


def cache_spec(num_layers: int, heads: int, capacity: int, dk: int, dv: int | None = None,
               dtype=jnp.float32, batch: int = 1, contiguous: bool = True) -> Cache:
  """An abstract Cache (``jax.ShapeDtypeStruct`` leaves) of the given shape, for byte counting."""
  dv = dk if dv is None else dv
  s = lambda *shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt)
  return Cache(k=s(num_layers, batch, heads, capacity, dk, dt=dtype),
               v=s(num_layers, batch, heads, capacity, dv, dt=dtype),
               pos=s(num_layers, batch, heads, capacity), ts=s(num_layers, batch, heads, capacity),
               length=s(batch), contiguous=contiguous)


def _abstract(cache: Cache) -> Cache:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)


def full_user(shapes, length: int):
  """Zero-stride NumPy views of an abstract memory / state in which every slot is occupied:
  integer leaves are 0 (a real position / pivot slot), ``length`` leaves are ``length``
  (the events a full user has seen: the cache's capacity), float leaves 0. No memory is
  allocated."""
  T = int(length)

  def view(path, s):
    name = getattr(path[-1], "name", None) if path else None
    value = T if name == "length" else 0
    return np.broadcast_to(np.array(value, s.dtype), s.shape)

  return jax.tree_util.tree_map_with_path(view, shapes)


def memory_bytes(method: str, cache: Cache, figure: str = "stored", **params) -> float:
  """Bytes per user of the memory ``make_compressor(method, **params)`` stores for ``cache``.

  Args:
    method: a registry name. cache: a Cache or an abstract one (see :func:`cache_spec`).
    figure: "stored" (``stored_bytes`` of a full user, n = capacity, with the per-user
      compressor state) or "buffer" (``buffer_bytes``: the static buffer, state included).
    **params: the method's parameters; for "lowrank" give ``rank=`` (abstract bases of that
      rank are used) or ``bases=``.

  Returns:
    Mean over the batch of the chosen figure, for the memory and state built with
    ``jax.eval_shape``; shared leaves (low-rank bases) are excluded.
  """
  if figure not in ("stored", "buffer"):
    raise ValueError(f"memory_bytes: figure={figure!r} must be 'stored' or 'buffer'")
  cache = _abstract(cache)
  L, B, H, T, dk = cache.k.shape
  dv = cache.v.shape[-1]
  W = max(T, int(params.get("window", 0)), 64)  # abstract: any W >= the window will do
  signals = Signals(acc_attn=jax.ShapeDtypeStruct((L, B, H, T), jnp.float32),
                    window_attn=jax.ShapeDtypeStruct((L, B, H, W, T), jnp.float32),
                    window_valid=jax.ShapeDtypeStruct((B, W), jnp.bool_))
  bases = None
  if method == "lowrank":
    params = dict(params)
    bases = params.pop("bases", None)
    rank = params.pop("rank", None)
    if bases is None:
      if rank is None:
        raise ValueError("memory_bytes: lowrank needs rank= or bases=")
      f = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
      bases = LowRankBases(f(L, H, dk), f(L, H, dk, rank), f(L, H, dv), f(L, H, dv, rank))
    bases = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bases)
    make = lambda b: lowrank(b, **params)
  else:
    comp = make_compressor(method, **params)
    make = lambda b: comp

  def build(cache, signals, bases):
    comp = make(bases)
    return comp.compress(cache, comp.init(cache), signals)

  memory, state = jax.eval_shape(build, cache, signals, bases)
  if figure == "buffer":
    return float(np.mean(buffer_bytes(full_user(memory, T), state)))
  return float(np.mean(stored_bytes(full_user(memory, T), state)))


def native_stored_bytes(cache: Cache, lengths) -> np.ndarray:
  """[len(lengths)] int64: stored bytes of the native memory of users holding ``lengths``
  events (min(length, capacity)) in caches shaped like ``cache`` (see :func:`cache_spec`):
  the reference of compression ratios for the same users."""
  lengths = np.asarray(lengths)
  L, _, H, T, dk = cache.k.shape
  dv = cache.v.shape[-1]
  B = lengths.shape[0]
  z = lambda shape, dtype: np.broadcast_to(np.zeros((), dtype), shape)
  index = DenseIndex(ts=z((B, T), cache.ts.dtype), length=lengths.astype(cache.length.dtype))
  memory = DenseMemory(index=index, k=z((L, B, H, T, dk), cache.k.dtype),
                       v=z((L, B, H, T, dv), cache.v.dtype))
  return stored_bytes(memory)


def cell_bytes(memory, compressor, reference: Cache) -> np.ndarray:
  """[3, B] float64 per user of a served batch: stored bytes (with the compressor's per-user
  state), buffer bytes, and the stored bytes of the native memory shaped like ``reference``
  (:func:`cache_spec`) for the same users (``memory.index.length`` events each)."""
  figures = user_bytes(memory, compressor)
  native = native_stored_bytes(reference, np.asarray(memory.index.length))
  return np.concatenate([figures, native[None].astype(np.float64)])


def cell_bytes_row(figures: np.ndarray) -> dict[str, float]:
  """Result-row fields from :func:`cell_bytes` of every user of a cell ([3, N]): the means of
  ``stored_bytes``, ``buffer_bytes`` and ``reference_stored_bytes``; a compression ratio is
  reference_stored_bytes / stored_bytes (a ratio of totals over the same users)."""
  stored, buffer, native = np.asarray(figures, np.float64).mean(axis=1)
  return {"stored_bytes": float(stored), "buffer_bytes": float(buffer),
          "reference_stored_bytes": float(native)}


def _candidates(method: str, cache: Cache, fixed: dict) -> list[dict]:
  """Parameter sets for ``method`` in increasing order of stored bytes."""
  T = cache.k.shape[3]
  if method in ("h2o", "merge_evicted"):
    out = []
    for b in range(1, T + 1):
      if "recent" in fixed:
        recent = fixed["recent"]
      elif "heavy" in fixed:
        recent = b - fixed["heavy"]
      else:
        recent = b // 2
      if 0 <= recent <= b:
        out.append({**fixed, "heavy": b - recent, "recent": recent})
    return out
  if method == "snapkv":
    if "window" in fixed:
      return [{**fixed, "budget": b} for b in range(fixed["window"], T + 1)]
    return [{**fixed, "budget": b, "window": min(8, b)} for b in range(1, T + 1)]
  if method == "streaming":
    out = []
    for b in range(1, T + 1):
      sinks = fixed.get("sinks", min(4, b))
      if sinks <= b:
        out.append({**fixed, "sinks": sinks, "recent": b - sinks})
    return out
  if method == "random":
    return [{**fixed, "budget": b} for b in range(1, T + 1)]
  if method in _BITS:
    return [{**fixed, "bits": b} for b in _BITS[method]]
  if method == "lowrank":
    if "bases" in fixed:
      raise ValueError("budget_bytes: lowrank chooses the rank; do not pass bases=")
    d = min(cache.k.shape[-1], cache.v.shape[-1])
    return [{**fixed, "rank": r} for r in range(1, d + 1)]
  if method == "native":
    return [dict(fixed)]
  raise ValueError(f"budget_bytes: method {method!r} is unknown; valid methods: "
                   f"{', '.join(sorted(FACTORIES))}")


def budget_bytes(method: str, cache: Cache, target_bytes: float, **fixed) -> dict[str, Any]:
  """The largest setting of ``method`` whose memory fits ``target_bytes`` per user.

  The tuned parameter (``TUNED[method]``): the total kept events for eviction and merging
  (h2o / merge_evicted split it heavy = budget - recent with recent = budget // 2 unless
  ``recent`` or ``heavy`` is fixed; streaming keeps ``sinks`` = min(4, budget) unless fixed;
  snapkv keeps ``window`` (default 8) fixed), the code width for kivi / intactkv / uniform,
  the rank for lowrank (fit bases of that rank with ``fit_lowrank``). Bytes are monotone in
  the tuned parameter, so a binary search over candidates, each measured by
  :func:`memory_bytes`, finds it.

  Args:
    method: a registry name. cache: a Cache or abstract Cache (see :func:`cache_spec`).
    target_bytes: the per-user byte budget. **fixed: parameters held fixed.

  Returns:
    Parameters for ``make_compressor(method, **params)`` (lowrank: ``{"rank": r}``).

  Raises:
    ValueError: if even the smallest setting does not fit (the message gives its bytes).
  """
  cache = _abstract(cache)
  cands = _candidates(method, cache, fixed)
  if not cands:
    raise ValueError(f"budget_bytes: no valid {method} setting for capacity "
                     f"{cache.k.shape[3]} with fixed parameters {fixed}")
  size = lambda i: memory_bytes(method, cache, **cands[i])
  if size(0) > target_bytes:
    raise ValueError(f"budget_bytes: {method} needs at least {size(0):.0f} bytes per user "
                     f"({cands[0]}); target_bytes={target_bytes:.0f} is smaller")
  lo, hi = 0, len(cands) - 1  # cands[lo] fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if size(mid) <= target_bytes:
      lo = mid
    else:
      hi = mid - 1
  return cands[lo]


def params_for_ratio(method: str, cache: Cache, ratio: float, **fixed) -> dict[str, Any]:
  """Parameters whose memory is at most the native memory's bytes / ``ratio`` per user
  (stored bytes of a full user, n = capacity, for both)."""
  if not ratio >= 1:
    raise ValueError(f"params_for_ratio: ratio={ratio} must be >= 1")
  target = memory_bytes("native", cache) / ratio
  return budget_bytes(method, cache, target, **fixed)


def ratio_table(method: str, cache: Cache, ratios=(2, 4, 8),
                **fixed) -> dict[float, dict | None]:
  """``{ratio: params}`` for reductions such as 2x / 4x / 8x (any ratios >= 1, e.g. 2..128;
  see :func:`params_for_ratio`).

  A ratio the method cannot reach ("out of reach": e.g. KIVI's full-precision residual alone
  exceeds it) maps to None.
  """
  table = {}
  for r in ratios:
    try:
      table[r] = params_for_ratio(method, cache, r, **fixed)
    except ValueError as e:
      if "needs at least" not in str(e):
        raise
      table[r] = None
  return table
