"""KVQuant-style quantization: non-uniform codebooks fitted on calibration users, per-channel
keys, per-token values, dense-and-sparse outliers.

Hooper et al. quantize keys per channel and values per token, replace the uniform grid by a
non-uniform datatype fitted offline (k-means on calibration activations), and keep the
largest-magnitude ~1% of each vector in full precision in a sparse side store
("dense-and-sparse"), which lets the remaining values use a much tighter range. This module is
the whole method: codebook fitting (the spec's calibration hook), the factory, the memory with
its exact ``stored_bytes()``, and the spec.

Rule, per vector x (keys: one channel of one (layer, user, head) row over its real events;
values: one real event's channels), in float32:

1. outliers: the ``floor(outliers * len(x))`` entries of largest |x| (ties to the smaller
   index) are stored exactly (cache dtype) with their index in x;
2. the other entries (inliers) are normalized by their own min m and half-range
   s = (max - m) / 2, both rounded to the storage dtype first: z = (x - m) / s - 1 in [-1, 1];
3. each z is coded as its nearest codebook entry (sorted codebook c of 2^bits entries; a tie
   takes the smaller entry), x̂ = m + (c[code] + 1) s. A constant vector (s = 0) has code 0
   and x̂ = m.

Codebooks: one for keys and one for values per layer (shared by its heads and all users),
fitted by 1-D k-means (``scipy.cluster.vq.kmeans2``) on the normalized inliers z of
calibration users' caches. Differences from the paper: the k-means is unweighted (KVQuant
weights it by a Fisher-information sensitivity, which needs gradients of the training loss);
key scaling is computed per user online rather than calibrated offline; there is no RoPE, so
"pre-RoPE" key quantization does not apply; outlier counts are per vector (the paper uses
per-vector thresholds that remove about 1% overall).
"""

from __future__ import annotations

import fractions
import functools
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
from malloc_jax.compressors.eviction import check_int
from malloc_jax.compressors.quantization import QuantSpec
from malloc_jax.compressors.spec import CacheShape, MethodSpec


@struct.dataclass
class KVQuantCodebooks:
  """Non-uniform datatypes shared by all users: k [L, 2^bits], v [L, 2^bits], sorted, in
  the normalized range [-1, 1]."""

  k: jax.Array
  v: jax.Array

  @property
  def bits(self) -> int:
    return int(np.log2(self.k.shape[-1]))


@struct.dataclass
class KVQuantMemory:
  """Stored per user (capacity T, outlier capacities Ok = floor(outliers T), Ov = floor(
  outliers Dv)):

    k_codes [L, B, H, T, ceil(Dk bits / 8)] uint8   key codes of each event, bit-packed
    k_min, k_scale [L, B, H, Dk]                     per-channel minimum and half-range
    k_out [L, B, H, Dk, Ok]; k_out_idx (uint8/16)    key outliers per channel and their slot
    v_codes [L, B, H, T, ceil(Dv bits / 8)] uint8    value codes, bit-packed
    v_min, v_scale [L, B, H, T]                      per-token minimum and half-range
    v_out [L, B, H, T, Ov]; v_out_idx (uint8/16)     value outliers per token and channel index

  ``codebooks`` are shared (``shared_nbytes``); ``layout`` is static (bits, outlier rate).
  Key outlier j of a row with n events is used iff j < floor(outliers n).
  """

  index: Any
  k_codes: jax.Array
  k_min: jax.Array
  k_scale: jax.Array
  k_out: jax.Array
  k_out_idx: jax.Array
  v_codes: jax.Array
  v_min: jax.Array
  v_scale: jax.Array
  v_out: jax.Array
  v_out_idx: jax.Array
  codebooks: KVQuantCodebooks
  layout: QuantSpec = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ("codebooks",)

  def materialize(self) -> Cache:
    lay = self.layout
    shell = cache_from(self.index, jnp.zeros(self.k_codes.shape[:4] + (lay.dk,)),
                       jnp.zeros(self.v_codes.shape[:4] + (lay.dv,)))
    valid = shell.pos >= 0  # [L, B, H, T]
    n = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [L, B, H]
    kc = jnp.swapaxes(unpack_bits(self.k_codes, lay.bits, lay.dk), -1, -2)  # [L,B,H,Dk,T]
    k = _decode(kc, self.k_min[..., None], self.k_scale[..., None], self.codebooks.k)
    k = put_values(k, self.k_out, self.k_out_idx, _count(n, lay.num, lay.den)[..., None])
    vc = unpack_bits(self.v_codes, lay.bits, lay.dv)  # [L, B, H, T, Dv]
    v = _decode(vc, self.v_min[..., None], self.v_scale[..., None], self.codebooks.v)
    v_count = jnp.where(valid, self.v_out.shape[-1], 0)
    v = put_values(v, self.v_out, self.v_out_idx, v_count)
    k = jnp.where(valid[..., None], jnp.swapaxes(k, -1, -2), 0).astype(self.k_out.dtype)
    v = jnp.where(valid[..., None], v, 0).astype(self.v_out.dtype)
    return shell.replace(k=k, v=v)

  def row_events(self) -> np.ndarray:
    """[L, B, H] int64: real events each (layer, user, head) row holds (host NumPy)."""
    return row_counts(self.index, self.k_codes.shape[0], self.k_codes.shape[2])

  def stored_bytes(self) -> np.ndarray:
    """[B] int64 bytes of the user's real events in a variable-length store. Per row with n
    events, Ok_n = floor(outliers n) key outliers per channel, Ov per token, s the storage
    dtype's size and i_k, i_v the index dtypes' sizes:

      n (ceil(Dk bits / 8) + ceil(Dv bits / 8))       codes (bit-packed per event)
      + [n > 0] 2 Dk s + n 2 s                          key / value minimum and half-range
      + Ok_n Dk (s + i_k) + n Ov (s + i_v)              outliers with their indices

    plus the index (DenseIndex: n s_ts + s_len; SparseIndex: sum_r n_r (s_pos + s_ts) +
    s_len). The codebooks are shared by all users (``shared_nbytes``), not counted here.
    """
    lay = self.layout
    n = self.row_events()  # [L, B, H]
    s = self.k_min.dtype.itemsize
    codes = n * (self.k_codes.shape[-1] + self.v_codes.shape[-1])
    scales = (n > 0) * 2 * lay.dk * s + n * 2 * self.v_min.dtype.itemsize
    ok = (n * lay.num) // lay.den
    outl = (ok * lay.dk * (self.k_out.dtype.itemsize + self.k_out_idx.dtype.itemsize)
            + n * self.v_out.shape[-1] * (self.v_out.dtype.itemsize
                                          + self.v_out_idx.dtype.itemsize))
    s_len = self.index.length.dtype.itemsize
    if isinstance(self.index, DenseIndex):
      index = n[0, :, 0] * self.index.ts.dtype.itemsize + s_len
    else:
      index = n.sum(axis=(0, 2)) * (self.index.pos.dtype.itemsize
                                     + self.index.ts.dtype.itemsize) + s_len
    return (codes + scales + outl).sum(axis=(0, 2)) + index


# ----------------------------------------------------------------------------------------
# Codes, outliers, normalization.


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """Unsigned codes [..., D] (< 2^bits) -> uint8 [..., ceil(D bits / 8)]: bit j of code i is
  bit i * bits + j of the row (little-endian bit order), the last byte zero-padded."""
  shifts = jnp.arange(bits, dtype=jnp.uint8)
  planes = (codes.astype(jnp.uint8)[..., None] >> shifts) & jnp.uint8(1)  # [..., D, bits]
  return jnp.packbits(planes.reshape(codes.shape[:-1] + (-1,)), axis=-1, bitorder="little")


def unpack_bits(packed: jax.Array, bits: int, size: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: uint8 [..., ceil(size bits / 8)] -> int32 [..., size]."""
  planes = jnp.unpackbits(packed, axis=-1, count=size * bits, bitorder="little")
  planes = planes.reshape(packed.shape[:-1] + (size, bits)).astype(jnp.int32)
  return jnp.sum(planes << jnp.arange(bits, dtype=jnp.int32), axis=-1)


def index_dtype(size: int):
  return jnp.uint8 if size <= 256 else jnp.uint16 if size <= 65536 else jnp.int32


def _count(n: jax.Array, num: int, den: int) -> jax.Array:
  """floor(num / den * n) in exact integer arithmetic."""
  return (n.astype(jnp.int32) * num) // den


def largest_magnitudes(x: jax.Array, valid: jax.Array, count: jax.Array, cap: int):
  """The ``count`` [...] largest |x| of each vector x [..., N] among ``valid`` members
  (ties to the smaller index), ``count <= cap``.

  Returns:
    (mask [..., N] bool of outliers, values [..., cap] (0 beyond count), indices [..., cap]).
  """
  N = x.shape[-1]
  if cap == 0:
    z = jnp.zeros(x.shape[:-1] + (0,), x.dtype)
    return jnp.zeros(x.shape, bool), z, z.astype(jnp.int32)
  mag = jnp.where(valid, jnp.abs(x), -1.0)
  top, idx = jax.lax.top_k(mag, cap)  # ties: the smaller index first
  used = jnp.arange(cap) < count[..., None]  # [..., cap]
  last = jnp.clip(count - 1, 0, cap - 1)[..., None]
  tv = jnp.take_along_axis(top, last, axis=-1)  # the count-th largest magnitude
  ti = jnp.take_along_axis(idx, last, axis=-1)
  slot = jnp.arange(N)
  mask = valid & (count[..., None] > 0) & ((mag > tv) | ((mag == tv) & (slot <= ti)))
  values = jnp.where(used, jnp.take_along_axis(x, idx, axis=-1), 0)
  return mask, values, jnp.where(used, idx, 0)


def _normalize(x: jax.Array, member: jax.Array, dtype):
  """Min and half-range of each vector's members (rounded to ``dtype``) and z in [-1, 1]."""
  mn = jnp.min(jnp.where(member, x, jnp.inf), axis=-1, keepdims=True)
  mx = jnp.max(jnp.where(member, x, -jnp.inf), axis=-1, keepdims=True)
  some = jnp.any(member, axis=-1, keepdims=True)
  mn, mx = jnp.where(some, mn, 0.0), jnp.where(some, mx, 0.0)
  scale = ((mx - mn) / 2).astype(dtype)
  mn = mn.astype(dtype)
  s32 = scale.astype(jnp.float32)
  z = (x - mn.astype(jnp.float32)) / jnp.where(s32 > 0, s32, 1.0) - 1.0
  return mn[..., 0], scale[..., 0], z, member & (s32 > 0)


def _nearest(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest entry of the sorted per-layer ``codebook`` [L, K] for z [L, ...]
  (a tie at a midpoint takes the smaller entry)."""
  cb = codebook.astype(jnp.float32)
  mid = (cb[:, 1:] + cb[:, :-1]) / 2  # [L, K-1]
  return jax.vmap(lambda m, x: jnp.searchsorted(m, x, side="left"))(mid, z).astype(jnp.int32)


def _decode(codes, mn, scale, codebook):
  """x̂ = min + (codebook[code] + 1) * scale, per layer (float32)."""
  c = jax.vmap(lambda cb, x: cb[x])(codebook.astype(jnp.float32), codes)
  return mn.astype(jnp.float32) + (c + 1.0) * scale.astype(jnp.float32)


def put_values(x, values, idx, count):
  """x [..., N] with x[idx[..., j]] = values[..., j] for j < count [...]."""
  slot = jnp.arange(x.shape[-1])
  for j in range(values.shape[-1]):
    hit = (slot == idx[..., j:j + 1].astype(jnp.int32)) & (j < count)[..., None]
    x = jnp.where(hit, values[..., j:j + 1].astype(jnp.float32), x)
  return x


def _vectors(cache: Cache, num: int, den: int):
  """Keys as per-channel vectors [L, B, H, Dk, T] and values as per-token vectors
  [L, B, H, T, Dv], each with (valid mask, outlier count, outlier capacity)."""
  valid = cache.pos >= 0  # [L, B, H, T]
  n = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [L, B, H]
  T, dv = cache.capacity, cache.v.shape[-1]
  k = jnp.swapaxes(cache.k.astype(jnp.float32), -1, -2)  # [L, B, H, Dk, T]
  kcount = jnp.broadcast_to(_count(n, num, den)[..., None], k.shape[:-1])
  vcap = (dv * num) // den
  vcount = jnp.where(valid, vcap, 0)
  return ((k, valid[..., None, :], kcount, (T * num) // den),
          (cache.v.astype(jnp.float32), valid[..., None], vcount, vcap))


def _fraction(outliers) -> fractions.Fraction:
  if isinstance(outliers, bool) or not isinstance(outliers, int | float) or not (
      0 <= outliers < 1):
    raise ValueError(f"kvquant: outliers={outliers!r} must be a fraction in [0, 1)")
  return fractions.Fraction(str(outliers)).limit_denominator(10**6)


# ----------------------------------------------------------------------------------------
# Calibration.


@functools.partial(jax.jit, static_argnums=(1, 2))
def _inlier_z(cache: Cache, num: int, den: int):
  """Per kind (keys, values): normalized values z and the mask of coded inliers."""
  out = []
  for x, valid, count, cap in _vectors(cache, num, den):
    mask, _, _ = largest_magnitudes(x, valid, count, cap)
    _, _, z, coded = _normalize(x, valid & ~mask, jnp.float32)
    out.append((z, coded))
  return out



def normalized_inliers(caches, outliers: float = 0.01) -> tuple[list[np.ndarray], ...]:
  """The normalized inliers z of calibration caches, per layer: (keys [L lists], values).

  z follows the module's rule (outliers removed, each vector scaled to [-1, 1]); entries of
  constant vectors are left out. Arrays are float64 NumPy, one per layer.
  """
  frac = _fraction(outliers)
  keys, values = None, None
  for cache in caches:
    (zk, mk), (zv, mv) = jax.device_get(_inlier_z(cache, frac.numerator, frac.denominator))
    L = zk.shape[0]
    if keys is None:
      keys, values = [[] for _ in range(L)], [[] for _ in range(L)]
    for l in range(L):
      keys[l].append(np.asarray(zk[l][mk[l]], np.float64))
      values[l].append(np.asarray(zv[l][mv[l]], np.float64))
  if keys is None:
    raise ValueError("kvquant: no calibration caches given")
  return ([np.concatenate(x) for x in keys], [np.concatenate(x) for x in values])


def kmeans_codebook(z: np.ndarray, bits: int, max_points: int = 200_000,
                    seed: int = 0) -> np.ndarray:
  """A 2^bits-entry codebook of 1-D data ``z`` by k-means (float64, sorted ascending).

  ``scipy.cluster.vq.kmeans2`` with k-means++ initialization (``seed``) and 100 Lloyd
  iterations on at most ``max_points`` values drawn without replacement (``seed``).

  Raises:
    ValueError: if ``z`` has fewer than 2^bits distinct values.
  """
  from scipy.cluster.vq import kmeans2

  K = 1 << bits
  z = np.asarray(z, np.float64).ravel()
  if np.unique(z).size < K:
    raise ValueError(f"kvquant: calibration gives {np.unique(z).size} distinct normalized "
                     f"values, fewer than the {K} codebook entries of bits={bits}; use more "
                     "calibration users or fewer bits")
  rng = np.random.default_rng(seed)
  if z.size > max_points:
    z = rng.choice(z, max_points, replace=False)
  centroids, _ = kmeans2(z, K, iter=100, minit="++", seed=rng, missing="warn")
  return np.sort(centroids)


def fit_kvquant(caches, bits: int, outliers: float = 0.01, max_points: int = 200_000,
                seed: int = 0) -> KVQuantCodebooks:
  """Per-layer key and value codebooks (2^bits entries) fitted on calibration caches.

  Args:
    caches: iterable of native Caches (``prefill`` of calibration users' histories).
    bits: code width (1..8). outliers: the outlier fraction the factory will use (inliers
      are what the codebook codes). max_points, seed: see :func:`kmeans_codebook`.

  Returns:
    KVQuantCodebooks with float32 k, v [L, 2^bits].
  """
  bits = check_int("kvquant", "bits", bits, 1)
  if bits > 8:
    raise ValueError(f"kvquant: bits={bits} must be in [1, 8]")
  keys, values = normalized_inliers(caches, outliers)
  fit = lambda zs: np.stack([kmeans_codebook(z, bits, max_points, seed) for z in zs])
  return KVQuantCodebooks(k=jnp.asarray(fit(keys), jnp.float32),
                          v=jnp.asarray(fit(values), jnp.float32))


# ----------------------------------------------------------------------------------------
# The compressor.


def kvquant(codebooks: KVQuantCodebooks, outliers: float = 0.01) -> Compressor:
  """KVQuant-style dense-and-sparse non-uniform quantization (see the module docstring).

  Args:
    codebooks: from :func:`fit_kvquant` (2^bits entries per layer; bits = code width).
    outliers: fraction of each vector kept exact (per key channel floor(outliers n) of the
      row's n events, per value token floor(outliers Dv) channels); 0 disables the sparse part.

  Returns:
    A Compressor; memory: :class:`KVQuantMemory` (exact per-user bytes:
    ``memory.stored_bytes()``; the codebooks are shared); state: EmptyState; no signals.

  References: Hooper, Kim, Mohammadzadeh, Mahoney, Shao, Keutzer, Gholami, "KVQuant: Towards
    10 Million Context Length LLM Inference with KV Cache Quantization", NeurIPS 2024
    (arXiv 2401.18079).
  """
  frac = _fraction(outliers)
  K = codebooks.k.shape[-1]
  if K < 2 or K & (K - 1) or K > 256 or codebooks.v.shape != codebooks.k.shape:
    raise ValueError(f"kvquant: codebooks k {codebooks.k.shape}, v {codebooks.v.shape}; "
                     "expected equal shapes [L, 2^bits] with 1 <= bits <= 8")
  bits = K.bit_length() - 1
  num, den = frac.numerator, frac.denominator


  def compress(cache, state, signals=None):
    del signals
    if cache.num_layers != codebooks.k.shape[0]:
      raise ValueError(f"kvquant: codebooks have {codebooks.k.shape[0]} layers, the cache "
                       f"{cache.num_layers}")
    dtype = cache.k.dtype
    parts = []
    for (x, valid, count, cap), cb, size in zip(
        _vectors(cache, num, den), (codebooks.k, codebooks.v), (cache.capacity,
                                                                  cache.v.shape[-1]),
        strict=True):
      mask, out_val, out_idx = largest_magnitudes(x, valid, count, cap)
      mn, scale, z, coded = _normalize(x, valid & ~mask, dtype)
      codes = jnp.where(coded, _nearest(z, cb), 0)
      parts.append((codes, mn, scale, out_val.astype(dtype), out_idx.astype(index_dtype(size))))
    (kc, kmn, ks, ko, koi), (vc, vmn, vs, vo, voi) = parts
    layout = QuantSpec(bits=bits, dk=cache.k.shape[-1], dv=cache.v.shape[-1], num=num, den=den)
    memory = KVQuantMemory(
        index=index_of(cache), k_codes=pack_bits(jnp.swapaxes(kc, -1, -2), bits), k_min=kmn,
        k_scale=ks, k_out=ko, k_out_idx=koi, v_codes=pack_bits(vc, bits), v_min=vmn,
        v_scale=vs, v_out=vo, v_out_idx=voi, codebooks=codebooks, layout=layout)
    return memory, state

  return Compressor(init_empty, compress)


# ----------------------------------------------------------------------------------------
# Registration (see malloc_jax.compressors.spec).


def _calibrate(params: dict, shape: CacheShape, caches) -> dict:
  """Config ``{bits, outliers}`` -> ``{codebooks, outliers}`` (abstract when caches is None)."""
  unknown = sorted(set(params) - {"bits", "outliers"})
  if unknown:
    raise ValueError(f"kvquant: unknown parameter(s) {', '.join(unknown)}; expected bits, "
                     "outliers")
  bits = check_int("kvquant", "bits", params.get("bits", 4), 1)
  if bits > 8:
    raise ValueError(f"kvquant: bits={bits} must be in [1, 8]")
  outliers = params.get("outliers", 0.01)
  _fraction(outliers)
  if caches is None:
    f = jax.ShapeDtypeStruct((shape.num_layers, 1 << bits), jnp.float32)
    return {"codebooks": KVQuantCodebooks(f, f), "outliers": outliers}
  return {"codebooks": fit_kvquant(caches(), bits, outliers), "outliers": outliers}


SPECS = (MethodSpec(
    name="kvquant", factory=kvquant, granularity="precision", tuned="bits",
    candidates=lambda shape, fixed: [{**fixed, "bits": b} for b in range(1, 9)],
    calibrate=_calibrate, example={"bits": 2, "outliers": 0.1},
    reference="Hooper et al., KVQuant, NeurIPS 2024"),)
