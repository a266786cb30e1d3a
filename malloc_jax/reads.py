"""Attention reads straight from a compressed memory (no dense cache of full capacity).

A request's m query events attend to the memory's slots and to their own new keys. Both
attentions split exactly over disjoint key sets:

* HSTU's pointwise attention is a plain sum, o = Σ_t SiLU(q·k_t + rab_t) / N · v_t, so the
  memory's part and the new part add;
* SASRec's softmax combines partial (max, denominator, unnormalized numerator) triples with
  the online-softmax rule (Milakov & Gimelshein 2018; FlashAttention).

:func:`read_memory` returns the memory's :class:`Partial`, read in the form the memory stores:

* ``DenseMemory`` (native, or the kept slots after eviction: its own, already small capacity),
  chunks of its slots, nothing scattered back to the full capacity;
* ``LowRankMemory``: scores in the projected space, s = (q·B_k)·c_kᵀ + q·μ_k, and values
  o = (a·c_v)·B_vᵀ + (Σa)·μ_v, so r numbers per event are read instead of D;
* ``KiviMemory`` / ``UniformMemory`` / ``IntactKVMemory``: a ``lax.scan`` over chunks of the
  slot axis that unpacks and dequantizes one chunk at a time (plain sums for HSTU, online
  softmax for SASRec).

``memory.materialize()`` followed by the dense read stays the reference; the tests compare
every read with it. :class:`PallasRead` (or ``serving_view(..., kernel="pallas")``) is the flag
that reads KIVI, uniform-8 and low-rank memories with the Pallas kernels of
``malloc_jax.kernels`` instead.

References: Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018); Dao et
  al., "FlashAttention" (NeurIPS 2022); Liu et al., KIVI (ICML 2024, fused dequantize-matmul);
  Chang et al., Palu (2024, attention in the low-rank space); Zhai et al., HSTU (ICML 2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from malloc_jax.cache import Cache
from malloc_jax.compressors.base import DenseIndex, DenseMemory, SparseIndex
from malloc_jax.compressors.lowrank import LowRankMemory
from malloc_jax.compressors.quantization import (
    IntactKVMemory,
    KiviMemory,
    UniformMemory,
    _kivi_split,
    _load_signed,
    _per_token_dequantize,
    minmax_dequantize,
    unpack_codes,
)

DEFAULT_CHUNK = 512


class Attention(NamedTuple):
  """How a layer turns scores into weights (static; built by the layer's ``step``).

  kind: "pointwise" (HSTU: SiLU(s + bias) / norm, no softmax) or "softmax" (SASRec:
  softmax(s * scale)). bias: (q_pos [B,m], q_ts [B,m], kpos [B,H,T], kts [B,H,T]) ->
  [B, H, m, T] additive bias, or None; kpos, kts may be [B, 1, T] (a DenseIndex memory's
  one index for every head), then the bias is computed once per head from shared indices.
  """

  kind: str
  scale: float = 1.0
  norm: float = 1.0
  bias: Callable | None = None


class Partial(NamedTuple):
  """Attention of m queries over one set of keys, in a form that combines exactly.

  acc [B, H, m, Dv]: Σ_t w_t v_t (pointwise: the weights themselves; softmax: exp(s_t - mx)).
  mx, den [B, H, m]: softmax running max (-inf: no key) and denominator; None for pointwise.
  """

  acc: jax.Array
  mx: jax.Array | None = None
  den: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LayerView:
  """One layer of a memory, passed to a layer's ``step`` in place of the dense cache.

  chunk: slots per chunk of the blocked reads (None: the module's ``DEFAULT_CHUNK`` at trace
  time).
  """

  memory: Any
  layer: int
  chunk: int | None = None


def memory_length(memory) -> jax.Array:
  """[B] int32 events seen so far (the position of the next event) of a memory or Cache."""
  if isinstance(memory, Cache):
    return memory.length
  return memory.index.length


# ----------------------------------------------------------------------------------------
# Blocks and their combination.


def _mask(q_pos, q_valid, kpos):  # [B, H, m, T] as models.base.attention_mask
  return (kpos[:, :, None, :] >= 0) & (kpos[:, :, None, :] <= q_pos[:, None, :, None]) & (
      q_valid[:, None, :, None])


def weights(attn: Attention, s, q_pos, q_ts, q_valid, kpos, kts):
  """Unnormalized weights of raw scores s [B,H,m,T]: (w, mx) with mx None for pointwise."""
  mask = _mask(q_pos, q_valid, kpos)
  if attn.kind == "pointwise":
    if attn.bias is not None:
      s = s + attn.bias(q_pos, q_ts, kpos, kts)
    return jnp.where(mask, jax.nn.silu(s), 0.0) / attn.norm, None
  if attn.kind != "softmax":
    raise ValueError(f"Attention.kind must be 'pointwise' or 'softmax', got {attn.kind!r}")
  s = s * attn.scale
  if attn.bias is not None:
    s = s + attn.bias(q_pos, q_ts, kpos, kts)
  mx = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1)  # [B, H, m]
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)[..., None]), 0.0)
  return p, mx


def block_partial(attn: Attention, q, k, v, kpos, kts, q_pos, q_ts, q_valid) -> Partial:
  """Partial of queries q [B,H,m,Dk] over dense keys k [B,H,T,Dk], v [B,H,T,Dv]."""
  s = jnp.einsum("bhmd,bhtd->bhmt", q, k.astype(q.dtype))
  w, mx = weights(attn, s, q_pos, q_ts, q_valid, kpos, kts)
  acc = jnp.einsum("bhmt,bhtd->bhmd", w, v.astype(q.dtype))
  return Partial(acc) if mx is None else Partial(acc, mx, jnp.sum(w, axis=-1))


def combine(a: Partial, b: Partial) -> Partial:
  """The partial over the union of two disjoint key sets."""
  if a.mx is None:
    return Partial(a.acc + b.acc)
  mx = jnp.maximum(a.mx, b.mx)
  safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
  fa = jnp.where(jnp.isfinite(a.mx), jnp.exp(a.mx - safe), 0.0)
  fb = jnp.where(jnp.isfinite(b.mx), jnp.exp(b.mx - safe), 0.0)
  return Partial(a.acc * fa[..., None] + b.acc * fb[..., None], mx, a.den * fa + b.den * fb)


def finish(p: Partial) -> jax.Array:
  """Attention output [B, H, m, Dv] of a complete partial (softmax rows without keys: 0)."""
  if p.mx is None:
    return p.acc
  return jnp.where(p.den[..., None] > 0, p.acc / jnp.where(p.den > 0, p.den, 1.0)[..., None],
                   0.0)


# ----------------------------------------------------------------------------------------
# Index of one layer.


def _index_chunk(index, layer: int, heads: int, start, size: int, shared: bool = False):
  """pos, ts [B, H, size] of slots start .. start + size - 1 of ``layer``.

  shared: a DenseIndex (one index for every layer and head) is returned as [B, 1, size], so
  the bias indices are computed once for all heads (HSTULayer.bias).
  """
  if isinstance(index, DenseIndex):
    B = index.ts.shape[0]
    slot = start + jnp.arange(size, dtype=jnp.int32)
    pos = jnp.where(slot[None] < index.length[:, None], slot[None], -1)  # [B, size]
    ts = jax.lax.dynamic_slice_in_dim(index.ts, start, size, axis=1)
    ts = jnp.where(pos >= 0, ts, 0)
    shape = (B, 1 if shared else heads, size)
    return (jnp.broadcast_to(pos[:, None], shape), jnp.broadcast_to(ts[:, None], shape))
  if isinstance(index, SparseIndex):
    return (jax.lax.dynamic_slice_in_dim(index.pos[layer], start, size, axis=-1),
            jax.lax.dynamic_slice_in_dim(index.ts[layer], start, size, axis=-1))
  raise TypeError(f"memory.index must be a DenseIndex or SparseIndex, got {type(index).__name__}")


def _index_count(index, layer: int, heads: int, capacity: int) -> jax.Array:
  """[B, H] events held per row of ``layer`` (as ``_kivi_split`` counts them)."""
  if isinstance(index, DenseIndex):
    n = jnp.minimum(index.length, capacity).astype(jnp.int32)
    return jnp.broadcast_to(n[:, None], (n.shape[0], heads))
  return jnp.sum(index.pos[layer] >= 0, axis=-1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------
# Chunk decoders: slots start .. start + c - 1 of one layer as float32 k [B,H,c,Dk], v.


def _slice(x, start, size):  # x [B, H, T, ...] -> [B, H, size, ...]
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _kivi_chunk(mem: KiviMemory, layer: int, start, size: int, counts):
  s = mem.spec
  n, q_k, q_v = counts  # [B, H]
  codes = unpack_codes(_slice(mem.k_codes[layer], start, size), s.bits, s.dk)  # [B,H,c,Dk]
  codes = codes.reshape(codes.shape[:2] + (size // s.group, s.group, s.dk))
  g0 = start // s.group
  k_scale = _slice(mem.k_scale[layer], g0, size // s.group)[..., None, :]
  k_min = _slice(mem.k_min[layer], g0, size // s.group)[..., None, :]
  k = minmax_dequantize(codes, k_scale, k_min).reshape(codes.shape[:2] + (size, s.dk))
  v = _per_token_dequantize(_slice(mem.v_codes[layer], start, size),
                            _slice(mem.v_scale[layer], start, size),
                            _slice(mem.v_min[layer], start, size), s.bits, s.dv)
  slot = start + jnp.arange(size, dtype=jnp.int32)
  k = _overlay(k, mem.k_res[layer], slot - q_k[..., None], n - q_k)
  v = _overlay(v, mem.v_res[layer], slot - q_v[..., None], n - q_v)
  return k, v


def _overlay(x, res, rel, count):
  """Slots with 0 <= rel < count (rel [B,H,c]) of x [B,H,c,D] replaced by res [B,H,R',D][rel].

  The residual covers at most R' slots per row, so most chunks hold none of it: the gather
  runs only in chunks where some row has a residual slot (a runtime branch).
  """
  use = (rel >= 0) & (rel < count[..., None])

  def put(x):
    idx = jnp.clip(rel, 0, res.shape[-2] - 1)
    r = jnp.take_along_axis(res.astype(jnp.float32), idx[..., None], axis=-2)
    return jnp.where(use[..., None], r, x)

  return jax.lax.cond(jnp.any(use), put, lambda x: x, x)


def _uniform_chunk(mem: UniformMemory, layer: int, start, size: int, counts):
  del counts
  s = mem.spec
  k = _load_signed(_slice(mem.k_codes[layer], start, size), s.bits, s.dk)
  v = _load_signed(_slice(mem.v_codes[layer], start, size), s.bits, s.dv)
  k = k * _slice(mem.k_scale[layer], start, size).astype(jnp.float32)[..., None]
  v = v * _slice(mem.v_scale[layer], start, size).astype(jnp.float32)[..., None]
  return k, v


def _intactkv_chunk(mem: IntactKVMemory, layer: int, start, size: int, counts):
  del counts
  s = mem.spec
  k = _per_token_dequantize(_slice(mem.k_codes[layer], start, size),
                            _slice(mem.k_scale[layer], start, size),
                            _slice(mem.k_min[layer], start, size), s.bits, s.dk)
  v = _per_token_dequantize(_slice(mem.v_codes[layer], start, size),
                            _slice(mem.v_scale[layer], start, size),
                            _slice(mem.v_min[layer], start, size), s.bits, s.dv)
  slot = start + jnp.arange(size, dtype=jnp.int32)
  hit = (mem.pivot_slot[layer][..., :, None] == slot).astype(jnp.float32)  # [B, H, P, c]
  is_pivot = (jnp.sum(hit, axis=-2) > 0)[..., None]  # [B, H, c, 1]
  k = jnp.where(is_pivot, jnp.einsum("bhpt,bhpd->bhtd", hit,
                                     mem.pivot_k[layer].astype(jnp.float32)), k)
  v = jnp.where(is_pivot, jnp.einsum("bhpt,bhpd->bhtd", hit,
                                     mem.pivot_v[layer].astype(jnp.float32)), v)
  return k, v


def _dense_chunk(mem: DenseMemory, layer: int, start, size: int, counts):
  del counts
  return (_slice(mem.k[layer], start, size).astype(jnp.float32),
          _slice(mem.v[layer], start, size).astype(jnp.float32))


_CHUNK_DECODERS = {KiviMemory: _kivi_chunk, UniformMemory: _uniform_chunk,
                   IntactKVMemory: _intactkv_chunk, DenseMemory: _dense_chunk}


def _capacity(memory) -> int:
  if isinstance(memory, KiviMemory):
    return memory.spec.capacity
  if isinstance(memory, LowRankMemory):
    return memory.ck.shape[3]
  return memory.k_codes.shape[3] if hasattr(memory, "k_codes") else memory.k.shape[3]


def chunk_size(memory, capacity: int, target: int) -> int:
  """Largest c <= target dividing the capacity (a multiple of KIVI's group G)."""
  step = memory.spec.group if isinstance(memory, KiviMemory) else 1
  if capacity % step:
    return -1  # read as one padded block (see blocked_read)
  best = step
  for c in range(step, min(target, capacity) + 1, step):
    if capacity % c == 0:
      best = c
  return best


def _scan(attn: Attention, capacity: int, c: int, shape, chunk_partial) -> Partial:
  """Combines chunk_partial(start) over chunks of c slots (a lax.scan when more than one).

  shape: (B, H, m, Dv) of the accumulator.
  """
  B, H, m, _ = shape
  init = Partial(jnp.zeros(shape, jnp.float32))
  if attn.kind == "softmax":
    init = Partial(init.acc, jnp.full((B, H, m), -jnp.inf, jnp.float32),
                   jnp.zeros((B, H, m), jnp.float32))

  def body(carry, j):
    return combine(carry, chunk_partial(j * c)), None

  if capacity == c:
    return body(init, 0)[0]
  out, _ = jax.lax.scan(body, init, jnp.arange(capacity // c, dtype=jnp.int32))
  return out


def blocked_read(attn: Attention, view: LayerView, q, q_pos, q_ts, q_valid) -> Partial:
  """Partial over a quantized (or dense) memory layer, decoding one chunk at a time.

  Args:
    attn: the layer's Attention. view: LayerView of the memory.
    q: [B, H, m, Dk] queries; q_pos, q_ts [B, m] int32; q_valid [B, m] bool.

  Returns:
    The memory's Partial (float32).

  References: KIVI (Liu et al., ICML 2024) dequantize-in-the-read; online softmax of
    FlashAttention (Dao et al., NeurIPS 2022).
  """
  mem, layer = view.memory, view.layer
  decode = _CHUNK_DECODERS.get(type(mem))
  if decode is None:
    raise TypeError(f"blocked_read: no chunk decoder for {type(mem).__name__}")
  T = _capacity(mem)
  B, H, m, _ = q.shape
  if isinstance(mem, KiviMemory):
    pos_all, _ = _index_full(mem.index, layer, H, T)
    counts = _kivi_split(pos_all, mem.spec.residual, mem.spec.key_residual)
  else:
    counts = None
  c = chunk_size(mem, T, view.chunk or DEFAULT_CHUNK)
  if c < 0:  # KIVI whose capacity is not a multiple of G: keys are stored padded to Tp
    raise ValueError(f"blocked_read: KIVI capacity {T} is not a multiple of group "
                     f"{mem.spec.group}; compress to a capacity that is")
  q = q.astype(jnp.float32)

  def chunk_partial(start):
    k, v = decode(mem, layer, start, c, counts)
    kpos, kts = _index_chunk(mem.index, layer, H, start, c, shared=True)
    return block_partial(attn, q, k, v, kpos, kts, q_pos, q_ts, q_valid)

  return _scan(attn, T, c, (B, H, m, _value_dim(mem)), chunk_partial)


def _index_full(index, layer, heads, capacity):
  return _index_chunk(index, layer, heads, 0, capacity)


def _value_dim(mem) -> int:
  if isinstance(mem, DenseMemory):
    return mem.v.shape[-1]
  if isinstance(mem, LowRankMemory):
    return mem.bases.v_basis.shape[-2]
  return mem.spec.dv


def lowrank_read(attn: Attention, view: LayerView, q, q_pos, q_ts, q_valid) -> Partial:
  """Partial over a low-rank memory layer, computed in the r-dim projected space.

  Per chunk of slots: s = (q·B_k)·c_kᵀ + q·μ_k [B,H,m,c]; the scan accumulates Σ w c_v and
  Σ w in r + 1 numbers per query, and only the result is projected back:
  acc = (Σ w c_v)·B_vᵀ + (Σ w)·μ_v. Empty slots are masked, so their coordinates never count.

  References: Chang et al., "Palu: Compressing KV-Cache with Low-Rank Projection" (2024).
  """
  mem, i = view.memory, view.layer
  b = mem.bases
  B, H, m, _ = q.shape
  T, r = mem.ck.shape[3], mem.ck.shape[4]
  q = q.astype(jnp.float32)
  qk = jnp.einsum("bhmd,hdr->bhmr", q, b.k_basis[i])  # [B, H, m, r]
  qmu = jnp.einsum("bhmd,hd->bhm", q, b.k_mean[i])[..., None]  # [B, H, m, 1]
  c = chunk_size(mem, T, view.chunk or DEFAULT_CHUNK)

  def chunk_partial(start):
    ck = _slice(mem.ck[i], start, c).astype(jnp.float32)  # [B, H, c, r]
    cv = _slice(mem.cv[i], start, c).astype(jnp.float32)
    cv = jnp.concatenate([cv, jnp.ones(cv.shape[:-1] + (1,), jnp.float32)], -1)  # Σw column
    kpos, kts = _index_chunk(mem.index, i, H, start, c, shared=True)
    s = jnp.einsum("bhmr,bhtr->bhmt", qk, ck) + qmu
    w, mx = weights(attn, s, q_pos, q_ts, q_valid, kpos, kts)
    acc = jnp.einsum("bhmt,bhtr->bhmr", w, cv)  # [B, H, m, r + 1]
    return Partial(acc) if mx is None else Partial(acc, mx, jnp.sum(w, axis=-1))

  p = _scan(attn, T, c, (B, H, m, r + 1), chunk_partial)
  wc, tot = p.acc[..., :r], p.acc[..., r]
  acc = jnp.einsum("bhmr,hdr->bhmd", wc, b.v_basis[i]) + tot[..., None] * b.v_mean[i][:, None]
  return Partial(acc, p.mx, p.den)


_READS = {DenseMemory: blocked_read, LowRankMemory: lowrank_read, KiviMemory: blocked_read,
          UniformMemory: blocked_read, IntactKVMemory: blocked_read}


@struct.dataclass
class PallasRead:
  """A memory read through the Pallas kernels of ``malloc_jax.kernels`` (the flag).

  ``model.score(PallasRead(memory), queries)`` (or ``serving_view(model, memory,
  kernel="pallas")``) reads a KiviMemory (2 or 4 bits), an 8-bit UniformMemory or a
  LowRankMemory with its kernel; any other memory raises. interpret: run the kernel in
  Pallas' interpreter (None: on CPU only). chunk: slots per grid step (must divide the
  capacity; KIVI: a multiple of its group; None: :func:`chunk_size` up to 128).
  """

  memory: Any
  interpret: bool | None = struct.field(pytree_node=False, default=None)
  chunk: int | None = struct.field(pytree_node=False, default=None)

  @property
  def index(self):
    return self.memory.index

  def materialize(self) -> Cache:
    return self.memory.materialize()


def _pallas_fn(memory):
  """The kernel read of a memory, or None when no kernel reads its type."""
  from malloc_jax import kernels  # noqa: PLC0415 (kernels import this module)
  if isinstance(memory, KiviMemory) and memory.spec.bits in (2, 4):
    return kernels.kivi_read
  if isinstance(memory, UniformMemory) and memory.spec.bits == 8:
    return kernels.uniform_read
  if isinstance(memory, LowRankMemory):
    return kernels.lowrank_read
  return None


def pallas_memory_read(attn: Attention, view: LayerView, q, q_pos, q_ts, q_valid) -> Partial:
  """read_memory of a :class:`PallasRead`: the wrapped memory's Pallas kernel read."""
  wrap = view.memory
  fn = _pallas_fn(wrap.memory)
  if fn is None:
    raise TypeError(f"PallasRead: no Pallas kernel reads {type(wrap.memory).__name__}; "
                    "kernels exist for KiviMemory (2, 4 bits), UniformMemory (8 bits) and "
                    "LowRankMemory (read it without the flag instead)")
  interpret = (jax.default_backend() == "cpu") if wrap.interpret is None else wrap.interpret
  mem = wrap.memory
  chunk = wrap.chunk or chunk_size(mem, _capacity(mem), 128)
  return fn(attn, LayerView(mem, view.layer), q, q_pos, q_ts, q_valid, chunk=chunk,
            interpret=interpret)


def read_memory(attn: Attention, view: LayerView, q, q_pos, q_ts, q_valid) -> Partial:
  """The memory's Partial, read by the memory's type (see the module docstring).

  Raises:
    TypeError: a memory type without a compressed read (materialize() it instead).
  """
  if isinstance(view.memory, PallasRead):
    return pallas_memory_read(attn, view, q, q_pos, q_ts, q_valid)
  fn = _READS.get(type(view.memory))
  if fn is None:
    raise TypeError(f"no compressed read for {type(view.memory).__name__}; supported: "
                    f"{', '.join(t.__name__ for t in _READS)} (or pass memory.materialize())")
  return fn(attn, view, q, q_pos, q_ts, q_valid)


def attend_memory(attn: Attention, view: LayerView, q, k, v, q_pos, q_ts, q_valid):
  """Attention output [B, H, m, Dv] of queries over a memory layer plus their own new keys.

  The hook a layer's ``step`` calls when it is handed a LayerView instead of a dense cache.

  Args:
    attn: the layer's Attention. view: LayerView of the memory.
    q: [B, H, m, Dk]; k [B, H, m, Dk], v [B, H, m, Dv]: the new events' own keys and values
      (causal among themselves, by position). q_pos, q_ts [B, m]; q_valid [B, m].

  Returns:
    o [B, H, m, Dv] float32, equal to the dense read of the materialized memory.
  """
  B, H, m, _ = q.shape
  mem_part = read_memory(attn, view, q, q_pos, q_ts, q_valid)
  kpos, kts = q_pos[:, None], q_ts[:, None]  # [B, 1, m]: one index for every head
  new_part = block_partial(attn, q.astype(jnp.float32), k, v, kpos, kts, q_pos, q_ts, q_valid)
  return finish(combine(mem_part, new_part))


def reads_compressed(model, memory) -> bool:
  """Whether ``model`` reads ``memory`` in its stored form (see :func:`serving_view`)."""
  from malloc_jax.models import HSTU, SASRec  # noqa: PLC0415 (models import this module)
  from malloc_jax.models.hstu import HSTULayer  # noqa: PLC0415
  from malloc_jax.models.sasrec import SASRecLayer  # noqa: PLC0415
  plain = type(model) in (HSTU, SASRec) and all(
      type(layer) in (HSTULayer, SASRecLayer) for layer in model.layers)
  if isinstance(memory, PallasRead):
    return plain and _pallas_fn(memory.memory) is not None
  return plain and type(memory) in _READS


def serving_view(model, memory, kernel: str | None = None):
  """What ``model.score`` / ``model.encode`` should read: the memory itself where it can.

  The memory as it is when the model is a plain HSTU or SASRec (their layers call
  :func:`attend_memory`) and the memory's type has a compressed read; otherwise, explicitly,
  ``memory.materialize()`` (trained variants and their memories have their own layers and
  read the dense view).

  Args:
    kernel: None (the jnp reads) or "pallas": a memory with a Pallas kernel read
      (:func:`_pallas_fn`) is wrapped in :class:`PallasRead`; a plain model and a memory
      without one raise (no silent fallback).
  """
  if kernel not in (None, "pallas"):
    raise ValueError(f"serving_view: kernel must be None or 'pallas', got {kernel!r}")
  if kernel == "pallas" and reads_compressed(model, memory):
    if _pallas_fn(memory) is None:
      raise TypeError(f"serving_view(kernel='pallas'): no Pallas kernel reads "
                      f"{type(memory).__name__}")
    return PallasRead(memory)
  return memory if reads_compressed(model, memory) else memory.materialize()


def read_costs(model, memory, request, *, warmup: int = 2, iters: int = 20) -> dict:
  """Latency and activation memory of serving ``request`` [B, m] through :func:`serving_view`.

  The sweep's latency and peak-memory columns (XLA's FLOP counts stay with the dense
  reference in ``costs.serving_costs``: XLA's cost analysis counts a scanned read's loop
  body once).

  Returns:
    {"latency_p50_ms", "latency_p99_ms", "users_per_s", "serving_temp_bytes" (XLA's temp
     bytes of the compiled request), "compressed_read" (bool)}.
  """
  from malloc_jax import costs  # noqa: PLC0415 (costs imports the models)
  fn = jax.jit(lambda mdl, mem, req: mdl.score(serving_view(mdl, mem), req))
  compiled = fn.lower(model, memory, request).compile()
  times = costs.time_compiled(compiled, (model, memory, request), warmup=warmup, iters=iters)
  B = request.items.shape[0]
  return {"latency_p50_ms": float(np.percentile(times, 50) * 1e3),
          "latency_p99_ms": float(np.percentile(times, 99) * 1e3),
          "users_per_s": float(B / times.mean()),
          "serving_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
          "compressed_read": reads_compressed(model, memory)}


def is_view(x) -> bool:
  return isinstance(x, LayerView)


def read_bytes(memory) -> int:
  """Bytes a compressed read of ``memory`` touches: every leaf (per-user and shared) once."""
  return int(sum(x.nbytes for x in jax.tree.leaves(memory)))


__all__ = ["Attention", "LayerView", "PallasRead", "Partial", "attend_memory", "block_partial",
           "blocked_read", "combine", "finish", "is_view",
           "lowrank_read", "memory_length", "pallas_memory_read", "read_bytes", "read_costs",
           "read_memory", "reads_compressed", "serving_view",
           "weights"]
