"""DuoAttention-style head split: retrieval heads keep the full memory, streaming heads keep
attention sinks + a recent window.

Xiao et al. find that only a fraction of heads ("retrieval heads") need the whole context;
the others ("streaming heads") attend to the first tokens and the recent ones. The paper
learns one gate per head by optimising a distillation loss with an L1 penalty on synthetic
passkey data and thresholds the gates. This is the **post-hoc** version: the gate of a head
is the share of attention its last W queries put on events outside the sinks and the recent
window, averaged over calibration users (no optimisation, no gradient); the ``retrieval``
fraction of all (layer, head) pairs with the largest share become retrieval heads. This module
is the whole method: calibration (the spec's hook, which needs calibration *signals*), the
factory, the memory and the spec.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache, Signals
from malloc_jax.compressors.base import Compressor, init_empty
from malloc_jax.compressors.eviction import check_int, streaming
from malloc_jax.compressors.spec import CacheShape, MethodSpec


@struct.dataclass
class DuoMemory:
  """Stored per user, for the Nr retrieval and Ns streaming (layer, head) rows:

    k_ret [Nr, B, T, Dk], v_ret [Nr, B, T, Dv], pos_ret, ts_ret [Nr, B, T]   full rows
    k_str [Ns, B, C, Dk], v_str [Ns, B, C, Dv], pos_str, ts_str [Ns, B, C]   C = sinks + recent
    length [B]

  ``heads`` (static) is the [L][H] retrieval mask.
  """

  k_ret: jax.Array
  v_ret: jax.Array
  pos_ret: jax.Array
  ts_ret: jax.Array
  k_str: jax.Array
  v_str: jax.Array
  pos_str: jax.Array
  ts_str: jax.Array
  length: jax.Array
  heads: tuple = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  @property
  def index(self):
    """The memory itself: it holds ``length`` [B] (what ``base.batch_size`` reads)."""
    return self

  def materialize(self) -> Cache:
    rows = [(l, h) for l, r in enumerate(self.heads) for h in range(len(r))]
    L, H = len(self.heads), len(self.heads[0])
    T = max(self.k_ret.shape[2], self.k_str.shape[2])
    pad = lambda x, v: jnp.pad(x, [(0, 0), (0, T - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                               constant_values=v)
    out = {"k": [], "v": [], "pos": [], "ts": []}
    ir = is_ = 0
    for l, h in rows:
      if self.heads[l][h]:
        src, i = (self.k_ret, self.v_ret, self.pos_ret, self.ts_ret), ir
        ir += 1
      else:
        src, i = (self.k_str, self.v_str, self.pos_str, self.ts_str), is_
        is_ += 1
      for name, x, fill in zip(("k", "v", "pos", "ts"), src, (0, 0, -1, 0), strict=True):
        out[name].append(pad(x[i], fill))
    stack = lambda xs: jnp.stack(xs).reshape((L, H) + xs[0].shape).swapaxes(1, 2)
    return Cache(k=stack(out["k"]), v=stack(out["v"]), pos=stack(out["pos"]),
                 ts=stack(out["ts"]), length=self.length, contiguous=False)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64 bytes of each user's real events in a variable-length store.

    Every stored slot carries its key, value, position and time stamp (streaming rows keep
    non-contiguous positions; each row has its own slots). With n_r the real events (pos >= 0)
    of the user's (layer, head) row r, retrieval and streaming rows alike (n_r = min(n, T)
    for a retrieval row of a contiguous cache, min(n, sinks + recent) for a streaming row)::

      sum_r n_r (Dk s_k + Dv s_v + s_pos + s_ts) + s_len
    """
    def part(k, v, pos, ts):  # rows [R, B, C]: [B] bytes of their real slots
      n = (np.asarray(pos) >= 0).sum(axis=(0, 2), dtype=np.int64)  # [B]
      per = (k.shape[-1] * k.dtype.itemsize + v.shape[-1] * v.dtype.itemsize
             + pos.dtype.itemsize + ts.dtype.itemsize)
      return n * per
    return (part(self.k_ret, self.v_ret, self.pos_ret, self.ts_ret)
            + part(self.k_str, self.v_str, self.pos_str, self.ts_str)
            + self.length.dtype.itemsize)


def retrieval_scores(items, sinks: int, recent: int) -> np.ndarray:
  """[L, H] mean share of attention outside the sinks and the recent window (float64).

  Args:
    items: iterable of (Cache, Signals) of calibration users (``prefill`` outputs). For each
      user with n > sinks + recent events and each real window query, the share is
      sum(attention to events with sinks <= pos < n - recent) / sum(attention to real events).
  """
  total, count = None, 0
  for item in items:
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Signals)):
      raise ValueError("duoattention calibrates on attention signals: give calibration items "
                       "as (cache, signals) pairs (evaluate.calibration_caches(..., "
                       "signals=True)); got a bare cache")
    cache, sig = item
    pos = np.asarray(cache.pos)  # [L, B, H, T]
    n = np.asarray(cache.length)[None, :, None, None]
    attn = np.abs(np.asarray(sig.window_attn, np.float64))  # [L, B, H, W, T]
    real = (pos >= 0)[:, :, :, None, :]
    outside = ((pos >= sinks) & (pos < n - recent))[:, :, :, None, :]
    mass = np.where(real, attn, 0).sum(-1)
    share = np.where(outside & real, attn, 0).sum(-1) / np.where(mass > 0, mass, 1)
    rows = np.asarray(sig.window_valid)[None, :, None, :] & (
        np.asarray(cache.length) > sinks + recent)[None, :, None, None]  # [1, B, 1, W]
    s = np.where(rows, share, 0).sum(axis=(1, 3))  # [L, H]
    total = s if total is None else total + s
    count += int(rows.sum())
  if total is None or count == 0:
    raise ValueError(f"duoattention: no calibration user has more than sinks + recent = "
                     f"{sinks + recent} events")
  return total / count


def split_heads(scores: np.ndarray, retrieval: float) -> tuple:
  """[L][H] bool mask: the round(retrieval L H) (layer, head) pairs of largest score are
  retrieval heads (ties to the smaller layer, then head)."""
  L, H = scores.shape
  k = int(round(retrieval * L * H))
  order = sorted(range(L * H), key=lambda i: (-scores.flat[i], i))[:k]
  mask = np.zeros(L * H, bool)
  mask[order] = True
  return tuple(tuple(bool(x) for x in row) for row in mask.reshape(L, H))


def duoattention(heads: tuple, sinks: int = 4, recent: int = 64) -> Compressor:
  """Retrieval heads keep every event; streaming heads keep the first ``sinks`` and the
  ``recent`` newest events (StreamingLLM's rule, per head).

  Args:
    heads: [L][H] nested tuple of bools, True for a retrieval head (from the calibration
      hook: :func:`retrieval_scores` then :func:`split_heads`).
    sinks, recent: the streaming heads' window.

  Returns:
    A Compressor; memory: :class:`DuoMemory` (bytes per user: Nr T (Dk + Dv) s + Ns (sinks +
    recent) (Dk + Dv) s + positions and time stamps of every stored slot + length); state:
    EmptyState; no signals at compress time.

  References: Xiao, Tang, Zuo, Guo, Yang, Tang, Fu, Han, "DuoAttention: Efficient Long-Context
    LLM Inference with Retrieval and Streaming Heads", ICLR 2025 (arXiv 2410.10819).
  """
  heads = tuple(tuple(bool(x) for x in row) for row in heads)
  stream = streaming(sinks, recent)
  flat = [(l, h, r) for l, row in enumerate(heads) for h, r in enumerate(row)]


  def compress(cache, state, signals=None):
    del signals
    if (cache.num_layers, cache.num_heads) != (len(heads), len(heads[0])):
      raise ValueError(f"duoattention: heads mask is {len(heads)} x {len(heads[0])}, the cache "
                       f"has {cache.num_layers} layers x {cache.num_heads} heads")
    small, _ = stream.compress(cache, stream.init(cache), None)
    full = cache.replace(k=jnp.where(cache.valid[..., None], cache.k, 0),
                         v=jnp.where(cache.valid[..., None], cache.v, 0),
                         ts=jnp.where(cache.valid, cache.ts, 0))
    pick = lambda x, rows: (jnp.stack([x[l, :, h] for l, h in rows]) if rows
                            else jnp.zeros((0,) + x.shape[1:2] + x.shape[3:], x.dtype))
    ret = [(l, h) for l, h, r in flat if r]
    st = [(l, h) for l, h, r in flat if not r]
    memory = DuoMemory(
        k_ret=pick(full.k, ret), v_ret=pick(full.v, ret), pos_ret=pick(full.pos, ret),
        ts_ret=pick(full.ts, ret), k_str=pick(small.k, st), v_str=pick(small.v, st),
        pos_str=pick(small.index.pos, st), ts_str=pick(small.index.ts, st),
        length=cache.length, heads=heads)
    return memory, state

  return Compressor(init_empty, compress)


def _calibrate(params: dict, shape: CacheShape, caches) -> dict:
  """Config ``{retrieval, sinks, recent}`` -> ``{heads, sinks, recent}``; without data the
  first round(retrieval L H) heads (the bytes do not depend on which)."""
  unknown = sorted(set(params) - {"retrieval", "sinks", "recent"})
  if unknown:
    raise ValueError(f"duoattention: unknown parameter(s) {', '.join(unknown)}; expected "
                     "retrieval, sinks, recent")
  retrieval = params.get("retrieval", 0.5)
  if isinstance(retrieval, bool) or not isinstance(retrieval, int | float) or not (
      0 <= retrieval <= 1):
    raise ValueError(f"duoattention: retrieval={retrieval!r} must be a fraction in [0, 1]")
  sinks = check_int("duoattention", "sinks", params.get("sinks", 4))
  recent = check_int("duoattention", "recent", params.get("recent", 64))
  if caches is None:
    scores = -np.arange(shape.num_layers * shape.heads, dtype=np.float64).reshape(
        shape.num_layers, shape.heads)
  else:
    scores = retrieval_scores(caches(), sinks, recent)
  return {"heads": split_heads(scores, retrieval), "sinks": sinks, "recent": recent}


SPECS = (MethodSpec(
    name="duoattention", factory=duoattention, granularity="head", calibrate=_calibrate,
    calibration_signals=True, limits={"sinks": "capacity", "recent": "capacity"},
    example={"retrieval": 0.5, "sinks": 1, "recent": 3},
    reference="Xiao et al., DuoAttention, ICLR 2025 (post-hoc head scores)"),)
