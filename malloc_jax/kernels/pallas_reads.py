"""Pallas kernels for reads of compressed memories: uniform int8, low rank, KIVI 2 / 4 bits.

One kernel serves both: each stored row t is ``k_t = kscale_t · K_t + kmin_t`` (K: int8 codes
or r-dim coordinates) and likewise for values, so a query's score is
``s_t = kscale_t (q · K_t) + kmin_t Σq + qoff`` and the output is
``Σ_t w_t vscale_t V_t + Σ_t w_t vmin_t``: the codes are multiplied in their stored form and
never dequantized into a float cache. The grid runs over (batch x head, chunks of the slot
axis); the chunk axis is the reduction (outputs stay resident and accumulate: plain sums for
HSTU's pointwise attention, online max / denominator for softmax).

The bias and mask of each (query, slot) are computed outside the kernel with jnp (HSTU's
time-bucket bias is a table gather) and passed in as [BH, m, T] inputs.

Runs on CPU with ``interpret=True`` (tests), and compiles with Mosaic GPU / Triton or Mosaic
TPU where available (not timed here: no accelerator in this session).

References: Liu et al., KIVI (ICML 2024: fused dequantize-matmul); Chang et al., Palu (2024:
  attention in the low-rank space); Dao et al., FlashAttention (NeurIPS 2022: online softmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from malloc_jax import reads
from malloc_jax.compressors.lowrank import LowRankMemory
from malloc_jax.compressors.quantization import (
    KiviMemory,
    UniformMemory,
    _kivi_split,
    minmax_dequantize,
    unpack_codes,
)


def _kernel(q_ref, qoff_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, bias_ref, mask_ref,
            acc_ref, mx_ref, den_ref, *, kind, scale, norm):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    mx_ref[...] = jnp.full(mx_ref.shape, -jnp.inf, jnp.float32)
    den_ref[...] = jnp.zeros(den_ref.shape, jnp.float32)

  q = q_ref[...]  # [m, Dk]
  kc = kc_ref[...].astype(jnp.float32)  # [c, Dk]
  s = jnp.dot(q, kc.T) * ks_ref[...] + jnp.sum(q, axis=-1, keepdims=True) * km_ref[...]
  s = s + qoff_ref[...]  # [m, c] (+ [m, 1])
  mask = mask_ref[...] > 0  # [m, c]
  vc = vc_ref[...].astype(jnp.float32)  # [c, Dv]
  if kind == "pointwise":
    s = s + bias_ref[...]
    w = jnp.where(mask, s * jax.nn.sigmoid(s), 0.0) / norm
    acc_ref[...] += jnp.dot(w * vs_ref[...], vc) + jnp.sum(w * vm_ref[...], -1, keepdims=True)
    den_ref[...] += jnp.sum(w, axis=-1, keepdims=True)
    return
  s = s * scale + bias_ref[...]
  s = jnp.where(mask, s, -jnp.inf)
  m_old = mx_ref[...]  # [m, 1]
  m_new = jnp.maximum(m_old, jnp.max(s, axis=-1, keepdims=True))
  safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.where(mask, jnp.exp(s - safe), 0.0)
  corr = jnp.where(jnp.isfinite(m_old), jnp.exp(m_old - safe), 0.0)
  acc_ref[...] = acc_ref[...] * corr + jnp.dot(p * vs_ref[...], vc) + jnp.sum(
      p * vm_ref[...], -1, keepdims=True)
  den_ref[...] = den_ref[...] * corr + jnp.sum(p, axis=-1, keepdims=True)
  mx_ref[...] = m_new


@functools.partial(jax.jit, static_argnames=("kind", "scale", "norm", "chunk", "interpret"))
def rows_read(q, qoff, kc, ks, km, vc, vs, vm, bias, mask, *, kind, scale=1.0, norm=1.0,
              chunk=128, interpret=True):
  """Partial of queries over rows stored as (codes, per-row scale and offset), in Pallas.

  Args:
    q [BH, m, Dk] float32; qoff [BH, m, 1] additive score term per query.
    kc [BH, T, Dk] codes (int8 or float); ks, km [BH, 1, T] per-row key scale and offset.
    vc [BH, T, Dv]; vs, vm [BH, 1, T]. bias [BH, m, T] float32; mask [BH, m, T] (nonzero: the
    query sees the slot). kind: "pointwise" or "softmax"; scale: softmax score scale; norm:
    pointwise normalizer. chunk: slots per grid step (must divide T).

  Returns:
    (acc [BH, m, Dv], mx [BH, m], den [BH, m]): softmax numerator, running max, denominator;
    pointwise: Σ w v, -inf, Σ w.
  """
  BH, m, dk = q.shape
  T, dv = vc.shape[1], vc.shape[2]
  if T % chunk:
    raise ValueError(f"rows_read: chunk={chunk} must divide the slot count {T}")
  row = lambda d: pl.BlockSpec((None, chunk, d), lambda i, j: (i, j, 0))
  per_row = pl.BlockSpec((None, 1, chunk), lambda i, j: (i, 0, j))
  per_q = lambda d: pl.BlockSpec((None, m, d), lambda i, j: (i, 0, 0))
  qt = pl.BlockSpec((None, m, chunk), lambda i, j: (i, 0, j))
  acc, mx, den = pl.pallas_call(
      functools.partial(_kernel, kind=kind, scale=scale, norm=norm),
      grid=(BH, T // chunk),
      in_specs=[per_q(dk), per_q(1), row(dk), per_row, per_row, row(dv), per_row, per_row, qt,
                qt],
      out_specs=[per_q(dv), per_q(1), per_q(1)],
      out_shape=[jax.ShapeDtypeStruct((BH, m, dv), jnp.float32),
                 jax.ShapeDtypeStruct((BH, m, 1), jnp.float32),
                 jax.ShapeDtypeStruct((BH, m, 1), jnp.float32)],
      interpret=interpret,
  )(q, qoff, kc, ks, km, vc, vs, vm, bias, mask.astype(jnp.float32))
  return acc, mx[..., 0], den[..., 0]


def _bias_mask(attn, view, q, q_pos, q_ts, q_valid, T):
  B, H, m, _ = q.shape
  kpos, kts = reads._index_full(view.memory.index, view.layer, H, T)
  mask = reads._mask(q_pos, q_valid, kpos)  # [B, H, m, T]
  bias = (attn.bias(q_pos, q_ts, kpos, kts) if attn.bias is not None
          else jnp.zeros((B, H, m, T), jnp.float32))
  flat = lambda x: x.reshape((B * H,) + x.shape[2:])
  return flat(bias.astype(jnp.float32)), flat(mask)


def _unflat(out, B, H):
  return tuple(x.reshape((B, H) + x.shape[1:]) for x in out)


def uniform_read(attn, view, q, q_pos, q_ts, q_valid, *, chunk=128, interpret=True):
  """reads.blocked_read of an 8-bit UniformMemory, as a Pallas kernel (codes stay int8)."""
  mem, i = view.memory, view.layer
  if not isinstance(mem, UniformMemory) or mem.spec.bits != 8:
    raise TypeError("uniform_read: needs an 8-bit UniformMemory")
  B, H, m, dk = q.shape
  T = mem.k_codes.shape[3]
  bias, mask = _bias_mask(attn, view, q, q_pos, q_ts, q_valid, T)
  flat = lambda x: x.reshape((B * H,) + x.shape[2:])
  rows = lambda x: flat(x.astype(jnp.float32))[:, None, :]  # [BH, 1, T]
  zero = jnp.zeros((B * H, 1, T), jnp.float32)
  p = rows_read(flat(q.astype(jnp.float32)), jnp.zeros((B * H, m, 1), jnp.float32),
                flat(mem.k_codes[i]), rows(mem.k_scale[i]), zero, flat(mem.v_codes[i]),
                rows(mem.v_scale[i]), zero, bias, mask, kind=attn.kind, scale=attn.scale,
                norm=attn.norm, chunk=chunk, interpret=interpret)
  acc, mx, den = _unflat(p, B, H)
  return reads.Partial(acc) if attn.kind == "pointwise" else reads.Partial(acc, mx, den)


def lowrank_read(attn, view, q, q_pos, q_ts, q_valid, *, chunk=128, interpret=True):
  """reads.lowrank_read as a Pallas kernel over the r-dim coordinates."""
  mem, i = view.memory, view.layer
  if not isinstance(mem, LowRankMemory):
    raise TypeError("lowrank_read: needs a LowRankMemory")
  b = mem.bases
  B, H, m, _ = q.shape
  T = mem.ck.shape[3]
  q = q.astype(jnp.float32)
  qk = jnp.einsum("bhmd,hdr->bhmr", q, b.k_basis[i])  # [B, H, m, r]
  qmu = jnp.einsum("bhmd,hd->bhm", q, b.k_mean[i])[..., None]  # [B, H, m, 1]
  bias, mask = _bias_mask(attn, view, q, q_pos, q_ts, q_valid, T)
  flat = lambda x: x.reshape((B * H,) + x.shape[2:])
  one = jnp.ones((B * H, 1, T), jnp.float32)
  zero = jnp.zeros((B * H, 1, T), jnp.float32)
  p = rows_read(flat(qk), flat(qmu), flat(mem.ck[i].astype(jnp.float32)), one, zero,
                flat(mem.cv[i].astype(jnp.float32)), one, zero, bias, mask, kind=attn.kind,
                scale=attn.scale, norm=attn.norm, chunk=chunk, interpret=interpret)
  acc, mx, tot = _unflat(p, B, H)  # acc in coordinates [B, H, m, r]; tot = Σ w
  acc = jnp.einsum("bhmr,hdr->bhmd", acc, b.v_basis[i]) + tot[..., None] * b.v_mean[i][:, None]
  return reads.Partial(acc) if attn.kind == "pointwise" else reads.Partial(acc, mx, tot)


# ----------------------------------------------------------------------------------------
# KIVI: 2- or 4-bit packed codes unpacked inside the kernel.


def _unpack(packed, bits: int, size: int):
  """uint8 [c, n] packed codes -> float32 [c, size] (first code of a byte in its low bits)."""
  per = 8 // bits
  c = packed.shape[0]
  x = packed.astype(jnp.int32)
  codes = [(x >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]  # per x [c, n]
  return jnp.stack(codes, axis=-1).reshape(c, -1)[:, :size].astype(jnp.float32)


def _kivi_kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, bias_ref, mask_ref,
                 acc_ref, mx_ref, den_ref, *, kind, scale, norm, bits, group, dk, dv):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    mx_ref[...] = jnp.full(mx_ref.shape, -jnp.inf, jnp.float32)
    den_ref[...] = jnp.zeros(den_ref.shape, jnp.float32)

  c = kc_ref.shape[0]
  # keys: per channel, in groups of G slots: k = code * scale[g] + min[g]   [c, Dk]
  kcodes = _unpack(kc_ref[...], bits, dk).reshape(c // group, group, dk)
  k = (kcodes * ks_ref[...].astype(jnp.float32)[:, None, :]
       + km_ref[...].astype(jnp.float32)[:, None, :]).reshape(c, dk)
  # values: per slot, in groups of Gv channels   [c, Dv]
  gv = vs_ref.shape[-1]
  vcodes = _unpack(vc_ref[...], bits, dv).reshape(c, gv, dv // gv)
  v = (vcodes * vs_ref[...].astype(jnp.float32)[..., None]
       + vm_ref[...].astype(jnp.float32)[..., None]).reshape(c, dv)
  s = jnp.dot(q_ref[...], k.T)  # [m, c]
  mask = mask_ref[...] > 0
  if kind == "pointwise":
    s = s + bias_ref[...]
    w = jnp.where(mask, s * jax.nn.sigmoid(s), 0.0) / norm
    acc_ref[...] += jnp.dot(w, v)
    return
  s = jnp.where(mask, s * scale + bias_ref[...], -jnp.inf)
  m_old = mx_ref[...]  # [m, 1]
  m_new = jnp.maximum(m_old, jnp.max(s, axis=-1, keepdims=True))
  safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.where(mask, jnp.exp(s - safe), 0.0)
  corr = jnp.where(jnp.isfinite(m_old), jnp.exp(m_old - safe), 0.0)
  acc_ref[...] = acc_ref[...] * corr + jnp.dot(p, v)
  den_ref[...] = den_ref[...] * corr + jnp.sum(p, axis=-1, keepdims=True)
  mx_ref[...] = m_new


@functools.partial(jax.jit, static_argnames=("kind", "scale", "norm", "bits", "group", "dk",
                                             "dv", "chunk", "interpret"))
def kivi_rows_read(q, kc, ks, km, vc, vs, vm, bias, mask, *, kind, bits, group, dk, dv,
                   scale=1.0, norm=1.0, chunk=128, interpret=True):
  """Partial of queries over KIVI-quantized rows, unpacking the packed codes in the kernel.

  Args:
    q [BH, m, Dk] float32. kc [BH, T, ceil(Dk·bits/8)] uint8 packed key codes; ks, km
    [BH, T/G, Dk] per-channel key scale and minimum of each group of G slots. vc [BH, T,
    ceil(Dv·bits/8)] uint8; vs, vm [BH, T, Dv/Gv] per-slot value scale and minimum per
    group of Gv channels. bias [BH, m, T] float32; mask [BH, m, T] (nonzero: the query sees
    the slot). bits: 2 or 4. chunk: slots per grid step (a multiple of G dividing T).

  Returns:
    (acc [BH, m, Dv], mx [BH, m], den [BH, m]) as :func:`rows_read` (pointwise: Σ w v, -inf,
    0).

  References: Liu et al., KIVI (ICML 2024): per-channel keys, per-token values, dequantized
    in the read.
  """
  BH, m, _ = q.shape
  T = vc.shape[1]
  if bits not in (2, 4):
    raise ValueError(f"kivi_rows_read: bits must be 2 or 4, got {bits}")
  if T % chunk or chunk % group:
    raise ValueError(f"kivi_rows_read: chunk={chunk} must divide the slot count {T} and be a "
                     f"multiple of the key group {group}")
  nk, nv, gv = kc.shape[-1], vc.shape[-1], vs.shape[-1]
  row = lambda d: pl.BlockSpec((None, chunk, d), lambda i, j: (i, j, 0))
  per_q = lambda d: pl.BlockSpec((None, m, d), lambda i, j: (i, 0, 0))
  group_rows = pl.BlockSpec((None, chunk // group, dk), lambda i, j: (i, j, 0))
  qt = pl.BlockSpec((None, m, chunk), lambda i, j: (i, 0, j))
  acc, mx, den = pl.pallas_call(
      functools.partial(_kivi_kernel, kind=kind, scale=scale, norm=norm, bits=bits,
                        group=group, dk=dk, dv=dv),
      grid=(BH, T // chunk),
      in_specs=[per_q(q.shape[-1]), row(nk), group_rows, group_rows, row(nv), row(gv),
                row(gv), qt, qt],
      out_specs=[per_q(dv), per_q(1), per_q(1)],
      out_shape=[jax.ShapeDtypeStruct((BH, m, dv), jnp.float32),
                 jax.ShapeDtypeStruct((BH, m, 1), jnp.float32),
                 jax.ShapeDtypeStruct((BH, m, 1), jnp.float32)],
      interpret=interpret,
  )(q, kc[:, :T], ks, km, vc, vs, vm, bias, mask.astype(jnp.float32))
  return acc, mx[..., 0], den[..., 0]


def _kivi_tail(mem: KiviMemory, i: int, H: int, counts):
  """Slots q_v .. n - 1 of layer i (at most R' per row: exact values) as dense k, v, index.

  A slot of the tail below q_k has a quantized key (decoded here), the others the exact
  key of the residual. Returns k [B,H,R',Dk], v [B,H,R',Dv], kpos, kts [B,H,R'] (-1: none).
  """
  s = mem.spec
  n, q_k, q_v = counts  # [B, H]
  R = mem.v_res.shape[-2]
  T = s.capacity
  t = q_v[..., None] + jnp.arange(R, dtype=jnp.int32)  # [B, H, R'] slot of each tail entry
  real = t < n[..., None]
  tc = jnp.clip(t, 0, T - 1)
  take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=-2)
  codes = unpack_codes(take(mem.k_codes[i], tc), s.bits, s.dk)  # [B, H, R', Dk]
  g = tc // s.group
  kq = minmax_dequantize(codes, take(mem.k_scale[i], g), take(mem.k_min[i], g))
  kr = take(mem.k_res[i].astype(jnp.float32), jnp.clip(t - q_k[..., None], 0, R - 1))
  k = jnp.where((t < q_k[..., None])[..., None], kq, kr)
  v = mem.v_res[i].astype(jnp.float32)
  pos, ts = reads._index_full(mem.index, i, H, T)
  kpos = jnp.where(real, jnp.take_along_axis(pos, tc, axis=-1), -1)
  kts = jnp.where(real, jnp.take_along_axis(ts, tc, axis=-1), 0)
  return k, v, kpos, kts


def kivi_read(attn, view, q, q_pos, q_ts, q_valid, *, chunk=128, interpret=True):
  """reads.blocked_read of a KiviMemory: the quantized prefix in a Pallas kernel that unpacks
  the 2- or 4-bit codes itself, the exact tail (at most R' slots per row) with jnp.

  Slots 0 .. q_v - 1 have quantized keys and values (q_v <= q_k, :func:`_kivi_split`); the
  kernel reads them, masked at q_v. Slots q_v .. n - 1 (exact values; keys exact from q_k)
  are a dense block of R' slots; the two partials combine exactly.
  """
  mem, i = view.memory, view.layer
  if not isinstance(mem, KiviMemory):
    raise TypeError("kivi_read: needs a KiviMemory")
  s = mem.spec
  B, H, m, dk = q.shape
  T = s.capacity
  if T % s.group:
    raise ValueError(f"kivi_read: KIVI capacity {T} is not a multiple of group {s.group}")
  pos, _ = reads._index_full(mem.index, i, H, T)
  counts = _kivi_split(pos, s.residual, s.key_residual)
  q = q.astype(jnp.float32)
  bias, mask = _bias_mask(attn, view, q, q_pos, q_ts, q_valid, T)
  below = jnp.arange(T, dtype=jnp.int32) < counts[2][..., None]  # [B, H, T] slot < q_v
  mask = mask & below.reshape(B * H, 1, T)
  flat = lambda x: x.reshape((B * H,) + x.shape[2:])
  p = kivi_rows_read(flat(q), flat(mem.k_codes[i]), flat(mem.k_scale[i]), flat(mem.k_min[i]),
                     flat(mem.v_codes[i]), flat(mem.v_scale[i]), flat(mem.v_min[i]), bias,
                     mask, kind=attn.kind, bits=s.bits, group=s.group, dk=s.dk, dv=s.dv,
                     scale=attn.scale, norm=attn.norm, chunk=chunk, interpret=interpret)
  acc, mx, den = _unflat(p, B, H)
  head = reads.Partial(acc) if attn.kind == "pointwise" else reads.Partial(acc, mx, den)
  k, v, kpos, kts = _kivi_tail(mem, i, H, counts)
  return reads.combine(head, reads.block_partial(attn, q, k, v, kpos, kts, q_pos, q_ts,
                                                 q_valid))
