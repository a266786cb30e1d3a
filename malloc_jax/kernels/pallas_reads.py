"""Pallas kernels for reads of per-row scaled memories: uniform int8 and low rank.

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
from malloc_jax.compressors.quantization import UniformMemory


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
