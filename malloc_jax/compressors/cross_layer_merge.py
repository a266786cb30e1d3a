"""MiniCache: merge the states of adjacent layers into one direction per event (depth axis).

Liu et al. observe that from the middle of the network on, adjacent layers' key / value
states of the same token point in nearly the same direction. MiniCache stores, for each pair
of adjacent layers (l, l+1) and each event, one shared unit direction (the SLERP of the two
layers' directions) plus each layer's magnitude, and restores x̂^l = ||x^l|| e. Events whose
two states are the most dissimilar (largest angular distance) are *retained*: both layers'
exact states are stored with their slot index. This module is the whole method: factory,
memory with its exact ``stored_bytes()``, and spec.

Rule, per pair (l, l+1), user, head and kind (keys and values separately), in float32:

  a = x^l / ||x^l||, b = x^{l+1} / ||x^{l+1}||, Ω = arccos(clip(a . b, -1, 1));
  e = sin((1 - t) Ω) / sin Ω a + sin(t Ω) / sin Ω b   (sin Ω < 1e-6: normalize((1-t) a + t b);
      a zero state takes the other's direction);
  d = Ω / π (angular distance); the floor(retain n) events of largest d (ties to the smaller
  slot; n = the row's real events) are retained exactly, the others restored as
  x̂^l = ||x^l|| e, x̂^{l+1} = ||x^{l+1}|| e.

Layers ``start``, ``start + 1`` form the first pair, then ``start + 2``, ``start + 3``, ...;
layers before ``start`` and a last unpaired layer are stored as they are. The paper merges
from the middle layer on (``start = L // 2``); the 2-layer recommenders here only have the
pair (0, 1), so the default is ``start = 0``.

Bytes: a merged pair stores one direction instead of two states, so MiniCache alone stays
below 2x fewer bytes (magnitudes and retained events cost extra; e.g. 1.9x for D = 50 and
retain = 0, 1.75x at retain = 0.05 when every layer is paired). Further reductions come from
combining it with token eviction first, ``chain(snapkv(...) or tova(...), minicache())``
(kept events x ~1.9); quantizing the merged directions, as the paper combines MiniCache with
4-bit KIVI, is not offered here (``chain(minicache, kivi)`` would re-quantize the dense
restored layers and store only KIVI's memory).

Differences from the paper: retention keeps a fixed fraction of the row's events, not those
above a distance threshold set by gamma; t is one constant (the paper's default 0.6), and
magnitudes are stored in the cache dtype.
"""

from __future__ import annotations

import fractions
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
)
from malloc_jax.compressors.codebook_quant import index_dtype, largest_magnitudes
from malloc_jax.compressors.eviction import check_int
from malloc_jax.compressors.quantization import QuantSpec
from malloc_jax.compressors.spec import MethodSpec


@struct.dataclass
class MiniCacheMemory:
  """Stored per user (U unmerged layers, P merged pairs, R = floor(retain T) retained slots):

    k_keep, v_keep [U, B, H, T, D]          unmerged layers as they are
    k_dir, v_dir [P, B, H, T, D]            merged unit directions
    k_mag, v_mag [P, 2, B, H, T]            each layer's magnitude
    k_ret, v_ret [P, 2, B, H, R, D]         retained events' exact states (both layers)
    k_ret_idx, v_ret_idx [P, B, H, R]       their slots (uint8 / uint16)

  Retained entry j of a row with n events is used iff j < floor(retain n). ``layout`` is
  static: the merged pairs' first layers, the unmerged layers, the retention rate.
  """

  index: Any
  k_keep: jax.Array
  v_keep: jax.Array
  k_dir: jax.Array
  v_dir: jax.Array
  k_mag: jax.Array
  v_mag: jax.Array
  k_ret: jax.Array
  v_ret: jax.Array
  k_ret_idx: jax.Array
  v_ret_idx: jax.Array
  layout: QuantSpec = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    lay = self.layout
    L = len(lay.pairs) * 2 + len(lay.unmerged)
    shell = cache_from(self.index, jnp.zeros((L,) + self.k_dir.shape[1:]),
                       jnp.zeros((L,) + self.v_dir.shape[1:]))
    valid = shell.pos >= 0  # [L, B, H, T]
    out = []
    for keep, dirs, mag, ret, idx in ((self.k_keep, self.k_dir, self.k_mag, self.k_ret,
                                       self.k_ret_idx),
                                      (self.v_keep, self.v_dir, self.v_mag, self.v_ret,
                                       self.v_ret_idx)):
      layers = [None] * L
      for u, l in enumerate(lay.unmerged):
        layers[l] = keep[u].astype(jnp.float32)
      for p, l in enumerate(lay.pairs):
        n = jnp.sum(valid[l], axis=-1, dtype=jnp.int32)  # [B, H]
        count = _count(n, lay.num, lay.den)
        for side in (0, 1):
          x = mag[p, side].astype(jnp.float32)[..., None] * dirs[p].astype(jnp.float32)
          layers[l + side] = _put_rows(x, ret[p, side], idx[p], count)
      x = jnp.stack(layers)  # [L, B, H, T, D]
      out.append(jnp.where(valid[..., None], x, 0).astype(dirs.dtype))
    return shell.replace(k=out[0], v=out[1])

  def row_events(self) -> np.ndarray:
    """[L, B, H] int64: real events each (layer, user, head) row holds (host NumPy)."""
    pos = np.asarray(self.materialize_pos())
    return (pos >= 0).sum(axis=-1, dtype=np.int64)

  def materialize_pos(self) -> jax.Array:
    """[L, B, H, T] positions of the slots (-1 empty)."""
    lay = self.layout
    L = len(lay.pairs) * 2 + len(lay.unmerged)
    x = self.k_dir
    T = x.shape[3]
    if isinstance(self.index, DenseIndex):
      slot = np.arange(T)[None, :]
      pos = np.where(slot < np.asarray(self.index.length)[:, None], slot, -1)
      return np.broadcast_to(pos[None, :, None, :], (L, x.shape[1], x.shape[2], T))
    return self.index.pos

  def stored_bytes(self) -> np.ndarray:
    """[B] int64 bytes of the user's real events in a variable-length store. With n the
    events of a row, r_n = floor(retain n), s the storage dtype's size and i the slot
    index's, per head and kind (keys, values):

      unmerged layer: n D s;  merged pair: n D s + 2 n s + r_n (2 D s + i)

    (the pair's row count n is its first layer's), plus the index (DenseIndex: n s_ts +
    s_len; SparseIndex: sum_r n_r (s_pos + s_ts) + s_len).
    """
    lay = self.layout
    n = self.row_events()  # [L, B, H]
    total = np.zeros(n.shape[1], np.int64)
    for keep, dirs, mag, ret, idx in ((self.k_keep, self.k_dir, self.k_mag, self.k_ret,
                                       self.k_ret_idx),
                                      (self.v_keep, self.v_dir, self.v_mag, self.v_ret,
                                       self.v_ret_idx)):
      for l in lay.unmerged:
        total += (n[l] * keep.shape[-1] * keep.dtype.itemsize).sum(axis=-1)
      for l in lay.pairs:
        r = (n[l] * lay.num) // lay.den
        D, s = dirs.shape[-1], dirs.dtype.itemsize
        total += (n[l] * D * s + 2 * n[l] * mag.dtype.itemsize
                  + r * (2 * D * ret.dtype.itemsize + idx.dtype.itemsize)).sum(axis=-1)
    s_len = self.index.length.dtype.itemsize
    if isinstance(self.index, DenseIndex):
      return total + n[0, :, 0] * self.index.ts.dtype.itemsize + s_len
    return total + n.sum(axis=(0, 2)) * (self.index.pos.dtype.itemsize
                                          + self.index.ts.dtype.itemsize) + s_len


def _count(n: jax.Array, num: int, den: int) -> jax.Array:
  return (n.astype(jnp.int32) * num) // den


def _put_rows(x, rows, idx, count):
  """x [..., T, D] with x[idx[..., j]] = rows[..., j, :] for j < count [...]."""
  slot = jnp.arange(x.shape[-2])
  for j in range(rows.shape[-2]):
    hit = (slot == idx[..., j:j + 1].astype(jnp.int32)) & (j < count)[..., None]  # [..., T]
    x = jnp.where(hit[..., None], rows[..., j:j + 1, :].astype(jnp.float32), x)
  return x


def slerp_directions(x0: jax.Array, x1: jax.Array, t: float):
  """Norms [...], the merged unit direction [..., D] and the angular distance [...] in [0, 1]
  of two states x0, x1 [..., D] (see the module docstring; float32)."""
  x0, x1 = x0.astype(jnp.float32), x1.astype(jnp.float32)
  n0 = jnp.linalg.norm(x0, axis=-1)
  n1 = jnp.linalg.norm(x1, axis=-1)
  a = x0 / jnp.where(n0 > 0, n0, 1.0)[..., None]
  b = x1 / jnp.where(n1 > 0, n1, 1.0)[..., None]
  omega = jnp.arccos(jnp.clip(jnp.sum(a * b, axis=-1), -1.0, 1.0))
  sin = jnp.sin(omega)
  safe = jnp.where(sin > 1e-6, sin, 1.0)[..., None]
  slerp = (jnp.sin((1 - t) * omega)[..., None] * a + jnp.sin(t * omega)[..., None] * b) / safe
  lerp = (1 - t) * a + t * b
  ln = jnp.linalg.norm(lerp, axis=-1, keepdims=True)
  lerp = lerp / jnp.where(ln > 0, ln, 1.0)
  e = jnp.where((sin > 1e-6)[..., None], slerp, lerp)
  e = jnp.where((n0 == 0)[..., None], b, jnp.where((n1 == 0)[..., None], a, e))
  return n0, n1, e, omega / jnp.pi


def _rate(retain) -> fractions.Fraction:
  if isinstance(retain, bool) or not isinstance(retain, int | float) or not 0 <= retain <= 1:
    raise ValueError(f"minicache: retain={retain!r} must be a fraction in [0, 1]")
  return fractions.Fraction(str(retain)).limit_denominator(10**6)


def minicache(start: int = 0, t: float = 0.6, retain: float = 0.05) -> Compressor:
  """MiniCache cross-layer merging of adjacent layer pairs (see the module docstring).

  Args:
    start: first layer of the first merged pair (>= 0; layers before it are stored as they
      are; the paper uses the middle layer).
    t: SLERP interpolation weight of the second layer, in [0, 1] (paper default 0.6).
    retain: fraction of each row's events kept unmerged (largest angular distance), [0, 1].

  Returns:
    A Compressor; memory: :class:`MiniCacheMemory` (exact per-user bytes:
    ``memory.stored_bytes()``); state: EmptyState; no signals. The cache needs at least
    ``start + 2`` layers.

  References: Liu, Liu, Pan, He, Haffari, Zhuang, "MiniCache: KV Cache Compression in Depth
    Dimension for Large Language Models", NeurIPS 2024 (arXiv 2405.14366).
  """
  start = check_int("minicache", "start", start, 0)
  if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
    raise ValueError(f"minicache: t={t!r} must be in [0, 1]")
  rate = _rate(retain)
  num, den = rate.numerator, rate.denominator


  def compress(cache, state, signals=None):
    del signals
    L, T = cache.num_layers, cache.capacity
    if L < start + 2:
      raise ValueError(f"minicache: start={start} needs at least {start + 2} layers; the "
                       f"cache has {L}")
    pairs = tuple(range(start, L - 1, 2))
    unmerged = tuple(l for l in range(L) if not any(p <= l <= p + 1 for p in pairs))
    R = (T * num) // den
    valid = cache.pos >= 0  # [L, B, H, T]
    fields = {}
    for kind, x in (("k", cache.k), ("v", cache.v)):
      dtype = x.dtype
      dirs, mags, rets, idxs = [], [], [], []
      for l in pairs:
        n0, n1, e, dist = slerp_directions(x[l], x[l + 1], t)  # [B, H, T(, D)]
        n = jnp.sum(valid[l], axis=-1, dtype=jnp.int32)  # [B, H]
        _, _, idx = largest_magnitudes(dist, valid[l], _count(n, num, den), R)  # [B, H, R]
        used = (jnp.arange(R) < _count(n, num, den)[..., None])[..., None]
        take = lambda y, idx=idx, used=used: jnp.where(
            used, jnp.take_along_axis(y, idx[..., None], axis=-2), 0)
        dirs.append(jnp.where(valid[l][..., None], e, 0).astype(dtype))
        mags.append(jnp.where(valid[l], jnp.stack([n0, n1]), 0).astype(dtype))
        rets.append(jnp.stack([take(x[l]), take(x[l + 1])]).astype(dtype))
        idxs.append(idx.astype(index_dtype(T)))
      stack = lambda ys, shape, dt: jnp.stack(ys) if ys else jnp.zeros(shape, dt)
      B, H, D = x.shape[1], x.shape[2], x.shape[-1]
      fields[f"{kind}_keep"] = (x[jnp.asarray(unmerged)] if unmerged
                                else jnp.zeros((0, B, H, T, D), dtype))
      fields[f"{kind}_dir"] = stack(dirs, (0, B, H, T, D), dtype)
      fields[f"{kind}_mag"] = stack(mags, (0, 2, B, H, T), dtype)
      fields[f"{kind}_ret"] = stack(rets, (0, 2, B, H, R, D), dtype)
      fields[f"{kind}_ret_idx"] = stack(idxs, (0, B, H, R), index_dtype(T))
    layout = QuantSpec(pairs=pairs, unmerged=unmerged, num=num, den=den)
    return MiniCacheMemory(index=index_of(cache), layout=layout, **fields), state

  return Compressor(init_empty, compress)


SPECS = (MethodSpec(
    name="minicache", factory=minicache, granularity="layer", example={"retain": 0.25},
    reference="Liu et al., MiniCache, NeurIPS 2024"),)
