"""Low-rank projection of keys and values onto calibrated principal directions.

References: Palu: Compressing KV-Cache with Low-Rank Projection (Chang et al., 2024);
  MALLOC low-rank row (Yu et al., arXiv 2601.20234, 2026).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache
from malloc_jax.compressors.base import (
  Compressor,
  EmptyState,
  cache_from,
  index_of,
  index_stored_bytes,
  row_counts,
)


@struct.dataclass
class LowRankBases:
  """Per layer and head PCA bases, shared by all users.

  k_mean [L, H, Dk], k_basis [L, H, Dk, r]; v_mean [L, H, Dv], v_basis [L, H, Dv, r].
  Basis columns are orthonormal, ordered by decreasing explained variance.
  """

  k_mean: jax.Array
  k_basis: jax.Array
  v_mean: jax.Array
  v_basis: jax.Array

  @property
  def rank(self) -> int:
    return self.k_basis.shape[-1]


@struct.dataclass
class LowRankMemory:
  """Stored per user: r-dim coordinates of each kept key and value, plus the index.

  ck [L, B, H, T, r], cv [L, B, H, T, r]; ``bases`` is shared (counted once, not per user).
  """

  index: object
  ck: jax.Array
  cv: jax.Array
  bases: LowRankBases
  shared_fields: ClassVar[tuple[str, ...]] = ("bases",)

  def materialize(self) -> Cache:
    b = self.bases
    # [L,B,H,T,r] x [L,H,D,r] -> [L,B,H,T,D]
    k = jnp.einsum("lbhtr,lhdr->lbhtd", self.ck, b.k_basis) + b.k_mean[:, None, :, None, :]
    v = jnp.einsum("lbhtr,lhdr->lbhtd", self.cv, b.v_basis) + b.v_mean[:, None, :, None, :]
    index = self.index
    cache = cache_from(index, k, v)
    empty = (cache.pos < 0)[..., None]
    return cache.replace(k=jnp.where(empty, 0, k), v=jnp.where(empty, 0, v))

  def stored_bytes(self) -> np.ndarray:
    """[B] int64: with n events per (layer, head) row and s the coordinates' itemsize,
    ``sum_rows n * r * 2 * s + index_stored_bytes`` (bases are shared, not counted)."""
    L, _, H, _, r = self.ck.shape
    n = row_counts(self.index, L, H)
    per = r * (self.ck.dtype.itemsize + self.cv.dtype.itemsize)
    return n.sum(axis=(0, 2)) * per + index_stored_bytes(self.index, n)


@jax.jit
def _moments(cache: Cache):
  """Masked sums over users and slots: count [L,H], sum [L,H,D], outer-product sum [L,H,D,D]."""
  w = cache.valid.astype(jnp.float32)  # [L,B,H,T]
  out = []
  for x in (cache.k, cache.v):
    x = jnp.where(w[..., None] > 0, x.astype(jnp.float32), 0.0)  # padding may hold NaN / inf
    out.append((jnp.einsum("lbht->lh", w), jnp.einsum("lbht,lbhtd->lhd", w, x),
                jnp.einsum("lbht,lbhtd,lbhte->lhde", w, x, x)))
  return out


def fit_lowrank(caches: Iterable[Cache], rank: int) -> LowRankBases:
  """Estimates top-``rank`` principal directions per layer and head from calibration caches.

  Moments are accumulated in float32 per batch and combined and decomposed in float64 NumPy.

  Args:
    caches: iterable of Caches from ``prefill`` on training histories.
    rank: number of directions kept (1 <= rank <= head dimension).

  Returns:
    LowRankBases with float32 means and bases.
  """
  acc = None
  for cache in caches:
    m = jax.tree.map(lambda x: np.asarray(x, np.float64), _moments(cache))
    acc = m if acc is None else jax.tree.map(np.add, acc, m)
  if acc is None:
    raise ValueError("fit_lowrank: no calibration caches given")
  result = []
  for count, s, ss in acc:
    d = s.shape[-1]
    if not 1 <= rank <= d:
      raise ValueError(f"lowrank rank={rank} must be in [1, head dimension {d}]")
    count = np.maximum(count, 1.0)[..., None]
    mean = s / count
    cov = ss / count[..., None] - mean[..., :, None] * mean[..., None, :]
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    basis = vecs[..., ::-1][..., :rank]
    result += [jnp.asarray(mean, jnp.float32), jnp.asarray(basis, jnp.float32)]
  return LowRankBases(*result)


def lowrank(bases: LowRankBases, dtype=None) -> Compressor:
  """Projects K and V onto ``bases`` and stores the coordinates.

  Args:
    bases: from :func:`fit_lowrank` (rank r).
    dtype: storage dtype of the coordinates (default: the cache's dtype).

  Returns:
    A Compressor whose memory is a :class:`LowRankMemory` with ck, cv [L, B, H, T, r].

  References: Chang et al., Palu (2024); PCA of KV caches as in MALLOC (arXiv 2601.20234).
  """

  def init(cache):
    del cache
    return EmptyState()

  def compress(cache, state, signals=None):
    del signals
    if cache.k.shape[-1] != bases.k_basis.shape[-2]:
      raise ValueError(f"lowrank: bases have key dim {bases.k_basis.shape[-2]}, "
                       f"cache has {cache.k.shape[-1]}")
    out_dtype = dtype or cache.k.dtype
    ck = jnp.einsum("lbhtd,lhdr->lbhtr", cache.k - bases.k_mean[:, None, :, None, :],
                    bases.k_basis)
    cv = jnp.einsum("lbhtd,lhdr->lbhtr", cache.v - bases.v_mean[:, None, :, None, :],
                    bases.v_basis)
    empty = (cache.pos < 0)[..., None]
    ck = jnp.where(empty, 0, ck).astype(out_dtype)
    cv = jnp.where(empty, 0, cv).astype(out_dtype)
    return LowRankMemory(index=index_of(cache), ck=ck, cv=cv, bases=bases), state

  return Compressor(init, compress)
