"""Precision compressors: KIVI, IntactKV and uniform symmetric int8 / int4.

Each returns a registered dataclass memory whose leaves are exactly what is stored per user:
packed integer codes (``uint8``; 2-bit codes four to a byte, 4-bit codes two to a byte, packed
along the channel axis, first code in the low bits), scales and zero points in the cache's
dtype, full-precision residual / pivot buffers, and the index of the quantized cache
(``index_of(cache)``: a DenseIndex after prefill, a SparseIndex after eviction, so these chain
after token pruning). Static layout information lives in a :class:`QuantSpec` field that is
not a pytree leaf and stores no bytes. ``materialize()`` dequantizes into a float Cache with
empty slots zeroed. Quantization math runs in float32.

Asymmetric (min/max) rule, per group: scale = (max - min) / (2^bits - 1), zero point = min,
code = clip(round((x - min) / scale), 0, 2^bits - 1) with scale and min first rounded to the
storage dtype, x̂ = code * scale + min (so |x - x̂| <= scale / 2 in float32). A constant group
has scale 0 and code 0. Symmetric absmax rule (uniform): scale = max|x| / (2^(bits-1) - 1),
code = clip(round(x / scale), -qmax, qmax), x̂ = code * scale.

Non-finite inputs: a group with a NaN or infinite member gets a NaN scale (and, asymmetric,
a NaN minimum), so every dequantized member is NaN and the serving guards (finite user
embeddings / scores) flag that user exactly as they flag a NaN in a native memory.

Stored bytes (``stored_bytes()`` of each memory, the KIVI paper's accounting): codes packed
contiguously per user and tensor, ceil(bits * count / 8) bytes for ``count`` codes; two
storage-dtype numbers (scale, minimum) per real quantization group (one, the scale, for
the symmetric rule); full-precision events only where the method keeps them; the index of
the user's real events (:func:`~malloc_jax.compressors.base.index_stored_bytes`). The
memories' leaves hold the static buffer of a serving batch (``buffer_bytes``).
"""

from __future__ import annotations

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
  packed_bytes,
  row_counts,
)
from malloc_jax.compressors.eviction import (
  check_choice,
  check_int,
  mark_slots,
  require_signals,
  slot_ranks,
  take_slots,
  top_slots,
)

# ----------------------------------------------------------------------------------------
# Static layout and packing.


class QuantSpec:
  """Static, hashable layout of a quantized memory (bits, group sizes, head dims, ...).

  Stored once in the code that reads the memory, not per user: it is aux data of the pytree
  (never a leaf), so byte counters skip it.
  """

  def __init__(self, **items):
    object.__setattr__(self, "_items", tuple(sorted(items.items())))

  def __getattr__(self, name):
    for key, value in object.__getattribute__(self, "_items"):
      if key == name:
        return value
    raise AttributeError(name)

  def __setattr__(self, name, value):
    raise AttributeError("QuantSpec is immutable")

  def __eq__(self, other):
    return isinstance(other, QuantSpec) and self._items == other._items

  def __hash__(self):
    return hash(self._items)

  def __repr__(self):
    return "QuantSpec(" + ", ".join(f"{k}={v!r}" for k, v in self._items) + ")"


def packed_size(size: int, bits: int) -> int:
  """Number of bytes that hold ``size`` codes of ``bits`` bits."""
  per = 8 // bits
  return -(-size // per)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned codes [..., D] (< 2^bits) into uint8 [..., ceil(D * bits / 8)].

  Code j of a byte sits at bits j*bits .. (j+1)*bits - 1 (first code in the low bits); a
  ragged last byte is padded with zero codes. ``codes`` may be integers or floats holding
  integers 0 .. 2^bits - 1 (as :func:`minmax_codes` returns them): float codes are shifted
  into place by an exact multiplication by 2^(j*bits), in the loop that computes them.
  """
  per = 8 // bits
  D = codes.shape[-1]
  n = packed_size(D, bits)
  if n * per != D:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, n * per - D)])
  j = jnp.arange(n * per) % per  # [n * per] slot of each code in its byte
  if jnp.issubdtype(codes.dtype, jnp.floating):
    # y = code * 2^(j*bits) is an integer in [0, 255]; y + 2^23 holds it in the low mantissa
    # bits, so its low byte is y: a cheaper exact conversion than float -> uint8.
    y = codes.astype(jnp.float32) * (2.0 ** (bits * j)).astype(jnp.float32) + 2.0 ** 23
    c = jax.lax.bitcast_convert_type(y, jnp.uint32).astype(jnp.uint8)
  else:
    c = codes.astype(jnp.uint8) << (j * bits).astype(jnp.uint8)
  if per == 1:
    return c
  # Each byte is the OR of a window of `per` shifted codes. A reduce-window keeps the code
  # producer a separate, vectorized loop (a strided reduction fused into it is scalarized).
  window = (1,) * (codes.ndim - 1) + (per,)
  return jax.lax.reduce_window(c, jnp.uint8(0), jax.lax.bitwise_or, window, window, "VALID")


def unpack_codes(packed: jax.Array, bits: int, size: int) -> jax.Array:
  """Inverse of :func:`pack_codes`: uint8 [..., ceil(size * bits / 8)] -> uint8 [..., size]."""
  per = 8 // bits
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  c = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return c.reshape(packed.shape[:-1] + (-1,))[..., :size]


def _min_max(x, axis):
  return jnp.min(x, axis=axis, keepdims=True), jnp.max(x, axis=axis, keepdims=True)


def _masked_min_max(x: jax.Array, mask: jax.Array, axis: int):
  """(min, max, some) over ``axis`` of the members of x that ``mask`` (same rank) selects.

  ``some`` marks groups with at least one member; min and max are 0 in the others. When
  every group is wholly in or out of the mask (a mask constant along ``axis``, as per-token
  groups, or KIVI's whole key blocks) the plain reductions of x are exact and read x
  directly; only otherwise (a runtime branch) is a masked copy of x reduced.
  """
  size = mask.shape[axis]
  count = jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32)

  def whole(x, mask):
    del mask
    return _min_max(x, axis)

  def partial(x, mask):
    return (jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, keepdims=True),
            jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True))

  if size == 1:
    mn, mx = whole(x, mask)
  else:
    every_whole = jnp.all((count == 0) | (count == size))
    mn, mx = jax.lax.cond(every_whole, whole, partial, x, mask)
  some = count > 0
  return jnp.where(some, mn, 0.0), jnp.where(some, mx, 0.0), some


def minmax_codes(x: jax.Array, mask: jax.Array, axis: int, bits: int, dtype):
  """Asymmetric quantization of groups along ``axis`` (only ``mask``-ed members count).

  Args:
    x: float values; mask: bool, broadcastable to x; axis: the group-member axis.
    bits: code width; dtype: storage dtype of scale and minimum.

  Returns:
    (codes as float32 integers 0 .. 2^bits - 1 like x, 0 where masked out; scale and min of
     dtype with ``axis`` kept as 1). Float codes let :func:`pack_codes` pack them in the
     same loop that computes them.
  """
  x = x.astype(jnp.float32)
  mask = jnp.asarray(mask, jnp.bool_)
  mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)  # same rank as x
  levels = (1 << bits) - 1
  mn, mx, _ = _masked_min_max(x, mask, axis % x.ndim)
  # A non-finite member poisons its group (min/max reductions need not propagate NaN).
  bad = jnp.any(mask & ~jnp.isfinite(x), axis=axis % x.ndim, keepdims=True)
  scale = jnp.where(bad, jnp.nan, (mx - mn) / levels).astype(dtype)
  mn = jnp.where(bad, jnp.nan, mn).astype(dtype)
  s32, m32 = scale.astype(jnp.float32), mn.astype(jnp.float32)
  q = jnp.round((x - m32) / jnp.where(s32 > 0, s32, 1.0))
  # clip(q, 0, levels) with NaN -> 0 (what the uint8 conversion of a NaN code gives), so
  # the float codes are always exact integers in [0, levels].
  q = jnp.where(q > 0, jnp.where(q < levels, q, levels), 0.0)
  q = jnp.where(mask & (s32 > 0), q, 0.0)
  return q, scale, mn


def minmax_quantize(x: jax.Array, mask: jax.Array, axis: int, bits: int, dtype):
  """:func:`minmax_codes` with uint8 codes: (codes uint8 like x, scale, min)."""
  q, scale, mn = minmax_codes(x, mask, axis, bits, dtype)
  return q.astype(jnp.uint8), scale, mn


def minmax_dequantize(codes: jax.Array, scale: jax.Array, mn: jax.Array) -> jax.Array:
  """x̂ = code * scale + min in float32 (scale, min broadcast against codes)."""
  return codes.astype(jnp.float32) * scale.astype(jnp.float32) + mn.astype(jnp.float32)


def _per_token_quantize(x, mask, group, bits, dtype):
  """x [L, B, H, T, D] in groups of ``group`` channels -> (packed, scale, min [.., T, D/g])."""
  D = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (D // group, group))  # [L, B, H, T, D/g, g]
  codes, scale, mn = minmax_codes(xg, mask[..., None, None], -1, bits, dtype)
  return pack_codes(codes.reshape(x.shape), bits), scale[..., 0], mn[..., 0]


def _per_token_dequantize(packed, scale, mn, bits, D):
  """Inverse of :func:`_per_token_quantize`: float32 [L, B, H, T, D]."""
  group = D // scale.shape[-1]
  codes = unpack_codes(packed, bits, D)
  codes = codes.reshape(codes.shape[:-1] + (D // group, group))
  x = minmax_dequantize(codes, scale[..., None], mn[..., None])
  return x.reshape(x.shape[:-2] + (D,))


def _value_group(method: str, group: int, D: int) -> int:
  g = min(group, D)
  if D % g:
    raise ValueError(f"{method}: group={group} must divide the head dimension {D} "
                     f"(or be >= it)")
  return g


def _finish(index, k, v, dtype) -> Cache:
  """Cache from an index and float32 k, v; empty slots zeroed; cast to ``dtype``."""
  cache = cache_from(index, k, v)
  empty = (cache.pos < 0)[..., None]
  return cache.replace(k=jnp.where(empty, 0, k).astype(dtype),
                       v=jnp.where(empty, 0, v).astype(dtype))


# ----------------------------------------------------------------------------------------
# KIVI.


@struct.dataclass
class KiviMemory:
  """KIVI storage. T = cache capacity, Tp = T rounded up to a multiple of G, R' = min(R, T).

  k_codes [L, B, H, Tp, ceil(Dk*bits/8)] uint8  packed key codes of every slot
  k_scale, k_min [L, B, H, Tp/G, Dk]            per channel, per group of G slots (cache dtype)
  k_res [L, B, H, R', Dk]                       exact keys of the residual: slot q + j at j,
                                                j < n - q (n = events in the row, q its
                                                quantized prefix), zeros elsewhere
  v_codes [L, B, H, T, ceil(Dv*bits/8)] uint8   packed value codes of every slot
  v_scale, v_min [L, B, H, T, Dv/Gv]            per slot, per group of Gv = min(G, Dv) channels
  v_res [L, B, H, R', Dv]                       exact newest min(n, R) values: slot
                                                n - min(n, R) + j at j
  Codes of residual and empty slots are zero. Residual validity follows from the index (n).
  """

  index: object
  k_codes: jax.Array
  k_scale: jax.Array
  k_min: jax.Array
  k_res: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_min: jax.Array
  v_res: jax.Array
  spec: QuantSpec = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    s = self.spec
    L, _, H = self.k_codes.shape[:3]
    pos, _ = self.index.expand(L, H)
    n, q_k, q_v = _kivi_split(pos, s.residual, s.key_residual)
    T = s.capacity
    codes = unpack_codes(self.k_codes, s.bits, s.dk)  # [L, B, H, Tp, Dk]
    codes = codes.reshape(codes.shape[:3] + (-1, s.group, s.dk))
    k = minmax_dequantize(codes, self.k_scale[..., None, :], self.k_min[..., None, :])
    k = k.reshape(k.shape[:3] + (-1, s.dk))[..., :T, :]  # [L, B, H, T, Dk]
    v = _per_token_dequantize(self.v_codes, self.v_scale, self.v_min, s.bits, s.dv)
    slot = jnp.arange(T, dtype=jnp.int32)
    k = _overlay(k, self.k_res, slot - q_k[..., None], n - q_k)
    v = _overlay(v, self.v_res, slot - q_v[..., None], n - q_v)
    return _finish(self.index, k, v, self.k_res.dtype)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64, the KIVI paper's accounting. Per (layer, head) row with n events, q_k
    quantized keys and q_v quantized values (:func:`kivi`'s split), s = storage itemsize,
    Gv = value group; sums over the user's rows::

      ceil(bits * Dk * sum q_k / 8)                  key codes
      + 2 * s * Dk * sum ceil(q_k / G)              key scale + min per channel and group
      + s * Dk * sum (n - q_k)                      key residual
      + ceil(bits * Dv * sum q_v / 8)                value codes
      + 2 * s * (Dv / Gv) * sum q_v                 value scale + min per event and group
      + s * Dv * sum (n - q_v)                      value residual
      + index_stored_bytes
    """
    s = self.spec
    L, _, H = self.k_codes.shape[:3]
    n = row_counts(self.index, L, H)  # [L, B, H]
    tail = np.minimum(n, s.residual)
    q_k = n - (n % s.residual if s.key_residual == "block" else tail)
    q_v = n - tail
    gk = -(-q_k // s.group)  # real key groups
    isz = self.k_res.dtype.itemsize
    per_v = self.v_scale.shape[-1]  # Dv / Gv
    sum_ = lambda x: x.sum(axis=(0, 2))
    return (packed_bytes(sum_(q_k) * s.dk, s.bits) + 2 * isz * s.dk * sum_(gk)
            + isz * s.dk * sum_(n - q_k)
            + packed_bytes(sum_(q_v) * s.dv, s.bits) + 2 * isz * per_v * sum_(q_v)
            + isz * s.dv * sum_(n - q_v) + index_stored_bytes(self.index, n))


def _kivi_split(pos, residual, key_residual):
  """(n, q_k, q_v) [L, B, H]: events per row and the sizes of the quantized key/value prefixes."""
  n = jnp.sum(pos >= 0, axis=-1, dtype=jnp.int32)
  tail = jnp.minimum(n, residual)
  q_k = n - (n % residual if key_residual == "block" else tail)
  return n, q_k, n - tail


def _overlay(x, res, rel, count):
  """Replaces slots with 0 <= rel < count (rel [L,B,H,T]) of x by res[rel] (res [L,B,H,R',D])."""
  use = (rel >= 0) & (rel < count[..., None])
  r = take_slots(res.astype(jnp.float32), jnp.clip(rel, 0, res.shape[-2] - 1))
  return jnp.where(use[..., None], r, x)


def _residual(x, start, count, size):
  """Slots start + j, j < count, of x [L,B,H,T,D] into a zero-padded buffer [L,B,H,size,D]."""
  j = jnp.arange(size, dtype=jnp.int32)
  src = jnp.clip(start[..., None] + j, 0, x.shape[-2] - 1)
  return jnp.where((j < count[..., None])[..., None], take_slots(x, src), 0)


def kivi(bits: int = 2, group: int = 32, residual: int = 128,
         key_residual: str = "block") -> Compressor:
  """KIVI: keys quantized per channel, values per token, with a full-precision residual.

  For a row holding n events (slots 0 .. n-1):
  - keys: per channel, in groups of ``group`` consecutive slots along time. With
    ``key_residual="block"`` (KIVI's rule) the newest n mod R keys stay exact and the first
    n - n mod R are quantized (a block is quantized when it fills, so at n = R every key is
    quantized). ``key_residual="sliding"`` (a different method, offered as an option) keeps
    the newest min(n, R) keys exact instead.
  - values: per slot, in groups of min(group, Dv) channels; the newest min(n, R) stay exact.
  Asymmetric min/max codes (see module docstring), scale and min in the cache's dtype.

  Args:
    bits: 2 or 4. group: G, group size (>= 1). residual: R (>= 1; a multiple of G for the
      "block" rule). key_residual: "block" or "sliding".

  Returns:
    A Compressor; memory: :class:`KiviMemory`; state: EmptyState; no signals needed.

  References: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    ICML 2024.
  """
  bits = check_choice("kivi", "bits", bits, (2, 4))
  group = check_int("kivi", "group", group, 1)
  residual = check_int("kivi", "residual", residual, 1)
  check_choice("kivi", "key_residual", key_residual, ("block", "sliding"))
  if key_residual == "block" and residual % group:
    raise ValueError(f"kivi: residual={residual} must be a multiple of group={group} "
                     f"(a key block is quantized when it fills)")

  def init(cache):
    del cache
    return EmptyState()

  def compress(cache, state, signals=None):
    del signals
    L, B, H, T, dk = cache.k.shape
    dv = cache.v.shape[-1]
    gv = _value_group("kivi", group, dv)
    dtype = cache.k.dtype
    n, q_k, q_v = _kivi_split(cache.pos, residual, key_residual)  # [L, B, H]
    valid = cache.pos >= 0
    slot = jnp.arange(T, dtype=jnp.int32)
    # Keys: groups of G slots along time, per channel.
    Tp = -(-T // group) * group
    kx = jnp.pad(cache.k.astype(jnp.float32), [(0, 0)] * 3 + [(0, Tp - T), (0, 0)])
    kmask = jnp.pad(valid & (slot < q_k[..., None]), [(0, 0)] * 3 + [(0, Tp - T)])
    kx = kx.reshape(L, B, H, Tp // group, group, dk)
    kmask = kmask.reshape(L, B, H, Tp // group, group, 1)
    codes, k_scale, k_min = minmax_codes(kx, kmask, -2, bits, dtype)
    k_codes = pack_codes(codes.reshape(L, B, H, Tp, dk), bits)
    # Values: per slot, groups of gv channels.
    v_codes, v_scale, v_min = _per_token_quantize(cache.v, valid & (slot < q_v[..., None]), gv,
                                                  bits, dtype)
    size = min(residual, T)
    memory = KiviMemory(
        index=index_of(cache), k_codes=k_codes, k_scale=k_scale[..., 0, :],
        k_min=k_min[..., 0, :], k_res=_residual(cache.k, q_k, n - q_k, size).astype(dtype),
        v_codes=v_codes, v_scale=v_scale, v_min=v_min,
        v_res=_residual(cache.v, q_v, n - q_v, size).astype(dtype),
        spec=QuantSpec(bits=bits, group=group, residual=residual, key_residual=key_residual,
                       capacity=T, dk=dk, dv=dv))
    return memory, state

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# IntactKV.


@struct.dataclass
class IntactKVMemory:
  """IntactKV storage: every slot quantized per token, plus P pivot events kept exact.

  k_codes [L, B, H, T, ceil(Dk*bits/8)] uint8; k_scale, k_min [L, B, H, T, Dk/Gk] (cache dtype)
  v_codes, v_scale, v_min likewise for values
  pivot_slot [L, B, H, P] int32   slot of each pivot (-1: none); pivots' codes are zero
  pivot_k [L, B, H, P, Dk], pivot_v [L, B, H, P, Dv]   exact pivot keys and values
  """

  index: object
  k_codes: jax.Array
  k_scale: jax.Array
  k_min: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_min: jax.Array
  pivot_slot: jax.Array
  pivot_k: jax.Array
  pivot_v: jax.Array
  spec: QuantSpec = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    s = self.spec
    k = _per_token_dequantize(self.k_codes, self.k_scale, self.k_min, s.bits, s.dk)
    v = _per_token_dequantize(self.v_codes, self.v_scale, self.v_min, s.bits, s.dv)
    T = k.shape[-2]
    hit = jax.nn.one_hot(self.pivot_slot, T, dtype=jnp.float32)  # [L, B, H, P, T]; -1 -> 0
    is_pivot = jnp.sum(hit, axis=-2)[..., None] > 0  # [L, B, H, T, 1]
    k = jnp.where(is_pivot, jnp.einsum("lbhpt,lbhpd->lbhtd", hit,
                                       self.pivot_k.astype(jnp.float32)), k)
    v = jnp.where(is_pivot, jnp.einsum("lbhpt,lbhpd->lbhtd", hit,
                                       self.pivot_v.astype(jnp.float32)), v)
    return _finish(self.index, k, v, self.pivot_k.dtype)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64. Per (layer, head) row with n events of which p = min(P, n) are pivots
    (``pivot_slot >= 0``), s = storage itemsize, Gk, Gv the channel groups; sums over rows::

      ceil(bits * Dk * sum (n - p) / 8) + 2 * s * (Dk / Gk) * sum (n - p)     keys
      + ceil(bits * Dv * sum (n - p) / 8) + 2 * s * (Dv / Gv) * sum (n - p)   values
      + sum p * (s * (Dk + Dv) + s_slot)       exact pivots and their int32 slot
      + index_stored_bytes
    """
    s = self.spec
    L, _, H = self.k_codes.shape[:3]
    n = row_counts(self.index, L, H)  # [L, B, H]
    p = (np.asarray(self.pivot_slot) >= 0).sum(axis=-1, dtype=np.int64)
    q = (n - p).sum(axis=(0, 2))
    isz = self.pivot_k.dtype.itemsize
    return (packed_bytes(q * s.dk, s.bits) + 2 * isz * self.k_scale.shape[-1] * q
            + packed_bytes(q * s.dv, s.bits) + 2 * isz * self.v_scale.shape[-1] * q
            + p.sum(axis=(0, 2)) * (isz * (s.dk + s.dv) + self.pivot_slot.dtype.itemsize)
            + index_stored_bytes(self.index, n))


def intactkv(bits: int = 4, pivots: int = 4, sinks: int = 1, group: int | None = None
             ) -> Compressor:
  """IntactKV: quantizes the memory but keeps P pivot events in full precision.

  Pivots, per layer, user and head: the first ``sinks`` events (attention sinks) plus the
  ``pivots - sinks`` events with the largest accumulated attention (``signals.acc_attn``)
  among the rest, ties to the smaller position. Every other event is quantized per token with
  asymmetric min/max round-to-nearest in groups of ``group`` channels (default: the whole
  head).

  Args:
    bits: 2, 4 or 8. pivots: P, exact events per head (>= 0). sinks: how many of them are the
      first events (0 <= sinks <= pivots). group: channels per quantization group (None: all).

  Returns:
    A Compressor; memory: :class:`IntactKVMemory`; state: EmptyState. Needs signals when
    pivots > sinks.

  References: Liu et al., "IntactKV: Improving Large Language Model Quantization by Keeping
    Pivot Tokens Intact", Findings of ACL 2024.
  """
  bits = check_choice("intactkv", "bits", bits, (2, 4, 8))
  pivots = check_int("intactkv", "pivots", pivots, 0)
  sinks = check_int("intactkv", "sinks", sinks, 0)
  if sinks > pivots:
    raise ValueError(f"intactkv: sinks={sinks} must be <= pivots={pivots}")
  if group is not None:
    group = check_int("intactkv", "group", group, 1)

  def init(cache):
    del cache
    return EmptyState()

  def compress(cache, state, signals=None):
    L, B, H, T, dk = cache.k.shape
    dv = cache.v.shape[-1]
    gk = _value_group("intactkv", group or dk, dk)
    gv = _value_group("intactkv", group or dv, dv)
    dtype = cache.k.dtype
    valid, oldest, _ = slot_ranks(cache)
    if pivots > sinks:
      signals = require_signals("intactkv", signals)
      if signals.acc_attn.shape[-1] != T:
        raise ValueError(f"intactkv: signals.acc_attn covers {signals.acc_attn.shape[-1]} "
                         f"slots but the cache has capacity {T}")
      score = signals.acc_attn.astype(jnp.float32)
    else:
      score = jnp.zeros(valid.shape, jnp.float32)
    P = min(pivots, T)
    tier = jnp.where(valid & (oldest < sinks), 2, jnp.where(valid, 1, 0))
    sel, picked = top_slots(tier, score, cache.pos, P)  # [L, B, H, P]
    is_pivot = mark_slots(sel, picked, T)
    mask = valid & ~is_pivot  # [L, B, H, T]
    k_codes, k_scale, k_min = _per_token_quantize(cache.k, mask, gk, bits, dtype)
    v_codes, v_scale, v_min = _per_token_quantize(cache.v, mask, gv, bits, dtype)
    m = picked[..., None]
    memory = IntactKVMemory(
        index=index_of(cache), k_codes=k_codes, k_scale=k_scale, k_min=k_min, v_codes=v_codes,
        v_scale=v_scale, v_min=v_min, pivot_slot=jnp.where(picked, sel, -1).astype(jnp.int32),
        pivot_k=jnp.where(m, take_slots(cache.k, sel), 0).astype(dtype),
        pivot_v=jnp.where(m, take_slots(cache.v, sel), 0).astype(dtype),
        spec=QuantSpec(bits=bits, dk=dk, dv=dv))
    return memory, state

  return Compressor(init, compress)


# ----------------------------------------------------------------------------------------
# Uniform symmetric absmax.


def absmax_quantize(x: jax.Array, mask: jax.Array, bits: int, dtype):
  """Symmetric per-row quantization of x [..., D] -> (int codes [..., D], scale [...] of dtype)."""
  qmax = (1 << (bits - 1)) - 1
  x = x.astype(jnp.float32)
  scale = (jnp.max(jnp.abs(x), axis=-1) / qmax)
  # A non-finite member poisons the row's scale (max reductions need not propagate NaN).
  scale = jnp.where(jnp.all(jnp.isfinite(x), axis=-1), scale, jnp.nan)
  scale = jnp.where(mask, scale, 0.0).astype(dtype)
  s32 = scale.astype(jnp.float32)[..., None]
  q = jnp.clip(jnp.round(x / jnp.where(s32 > 0, s32, 1.0)), -qmax, qmax)
  return jnp.where(s32 > 0, q, 0).astype(jnp.int8), scale


def _store_signed(q, bits):
  """int8 codes -> stored form: int8 for 8 bits, two's-complement nibbles packed for 4."""
  if bits == 8:
    return q
  return pack_codes(q.astype(jnp.uint8) & jnp.uint8(0xF), 4)


def _load_signed(stored, bits, D):
  if bits == 8:
    return stored.astype(jnp.float32)
  u = unpack_codes(stored, 4, D).astype(jnp.int32)
  return jnp.where(u >= 8, u - 16, u).astype(jnp.float32)


@struct.dataclass
class UniformMemory:
  """Symmetric absmax storage per slot and head.

  k_codes [L, B, H, T, Dk] int8 (8 bits) or [L, B, H, T, ceil(Dk/2)] uint8 (4 bits, two
  two's-complement nibbles per byte); k_scale [L, B, H, T] (cache dtype); v likewise.
  """

  index: object
  k_codes: jax.Array
  k_scale: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  spec: QuantSpec = struct.field(pytree_node=False)
  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self) -> Cache:
    s = self.spec
    k = _load_signed(self.k_codes, s.bits, s.dk) * self.k_scale.astype(jnp.float32)[..., None]
    v = _load_signed(self.v_codes, s.bits, s.dv) * self.v_scale.astype(jnp.float32)[..., None]
    return _finish(self.index, k, v, self.k_scale.dtype)

  def stored_bytes(self) -> np.ndarray:
    """[B] int64. With N = sum over the user's (layer, head) rows of their events and s the
    scale itemsize::

      ceil(bits * Dk * N / 8) + ceil(bits * Dv * N / 8) + 2 * s * N + index_stored_bytes
    """
    s = self.spec
    L, _, H = self.k_scale.shape[:3]
    n = row_counts(self.index, L, H)
    N = n.sum(axis=(0, 2))
    return (packed_bytes(N * s.dk, s.bits) + packed_bytes(N * s.dv, s.bits)
            + 2 * self.k_scale.dtype.itemsize * N + index_stored_bytes(self.index, n))


def uniform(bits: int = 8) -> Compressor:
  """Uniform symmetric quantization: absmax scale per slot and head, int8 or packed int4.

  scale = max_d |x_d| / (2^(bits-1) - 1) per event, head and tensor (K and V separately);
  code = clip(round(x / scale), -qmax, qmax).

  Args:
    bits: 8 or 4.

  Returns:
    A Compressor; memory: :class:`UniformMemory`; state: EmptyState; no signals needed.

  References: round-to-nearest absmax quantization as in Dettmers et al., "LLM.int8()",
    NeurIPS 2022; per-token KV int8/int4 baselines of Liu et al., KIVI (ICML 2024).
  """
  bits = check_choice("uniform", "bits", bits, (4, 8))

  def init(cache):
    del cache
    return EmptyState()

  def compress(cache, state, signals=None):
    del signals
    dtype = cache.k.dtype
    valid = cache.pos >= 0
    kq, k_scale = absmax_quantize(cache.k, valid, bits, dtype)
    vq, v_scale = absmax_quantize(cache.v, valid, bits, dtype)
    memory = UniformMemory(index=index_of(cache), k_codes=_store_signed(kq, bits),
                           k_scale=k_scale, v_codes=_store_signed(vq, bits), v_scale=v_scale,
                           spec=QuantSpec(bits=bits, dk=cache.k.shape[-1],
                                          dv=cache.v.shape[-1]))
    return memory, state

  return Compressor(init, compress)
