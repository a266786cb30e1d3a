"""Precision compressors (KIVI, IntactKV, uniform) against float64 NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.cache import Cache, Signals

L, B, H, T, D = 2, 3, 2, 12, 8
SETTINGS = settings(max_examples=10, deadline=None)
SEEDS = st.integers(0, 2**31 - 1)


def make_cache(seed: int):
  """A random contiguous cache (events 0..n-1 per user, n uneven, padding full of garbage)."""
  rng = np.random.default_rng(seed)
  n = rng.integers(0, T + 1, size=B)
  n[rng.integers(B)] = T
  pos = np.where(np.arange(T)[None] < n[:, None], np.arange(T)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (L, B, H, T))
  valid = pos >= 0
  # Per-channel offsets and scales differ, as in real keys.
  k = rng.normal(size=(L, B, H, T, D)) * rng.uniform(0.1, 3, size=D) + rng.normal(size=D)
  v = rng.normal(size=(L, B, H, T, D))
  k = np.where(valid[..., None], k, 77.0)
  v = np.where(valid[..., None], v, -77.0)
  ts = np.where(valid, 100 * pos + 5, 0)
  acc = np.where(valid, rng.integers(0, 5, size=valid.shape), 1000.0)
  cache = Cache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(ts, jnp.int32),
                length=jnp.asarray(n, jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(acc, jnp.float32), window_attn=jnp.zeros((L, B, H, 1, T)),
                window_valid=jnp.ones((B, 1), bool))
  return cache, sig


@functools.cache
def _jitted(name, items):
  comp = C.make_compressor(name, **dict(items))

  def f(cache, sig):
    memory, _ = comp.compress(cache, comp.init(cache), sig)
    return memory, memory.materialize()

  return jax.jit(f)


def run(name, cache, sig=None, **params):
  return _jitted(name, tuple(sorted(params.items())))(cache, sig)


# ----------------------------------------------------------------------------------------
# NumPy references.


def np_pack(codes, bits):
  """Reference packing: code j of each byte at bits j*bits.., ragged tail padded with zeros."""
  per = 8 // bits
  codes = np.asarray(codes, np.uint64)
  pad = (-codes.shape[-1]) % per
  codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint64)], -1)
  codes = codes.reshape(codes.shape[:-1] + (-1, per))
  out = np.zeros(codes.shape[:-1], np.uint64)
  for j in range(per):
    out |= codes[..., j] << np.uint64(j * bits)
  return out.astype(np.uint8)


def np_unpack(packed, bits, size):
  per = 8 // bits
  p = np.asarray(packed, np.uint64)[..., None] >> (np.arange(per, dtype=np.uint64) * bits)
  return (p & np.uint64((1 << bits) - 1)).reshape(packed.shape[:-1] + (-1,))[..., :size]


def within_half_step(x_hat, x, step):
  """|x̂ - x| <= step / 2 (float32 arithmetic slack included)."""
  err = np.abs(np.float64(x_hat) - np.float64(x))
  return np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-6 * (1 + np.abs(x)))


def ref_kivi_steps(x, n, bits, group, residual, key_residual):
  """float64 (key step [T, D], key exact mask [T], value step [T, D], value exact mask [T]).

  Keys: groups of ``group`` slots per channel over the quantized prefix q_k; values: groups of
  min(group, D) channels per slot over the quantized prefix q_v. step = (max - min)/(2^b - 1).
  """
  kx, vx = np.float64(x[0]), np.float64(x[1])
  levels = 2**bits - 1
  tail = min(n, residual)
  q_k = n - (n % residual if key_residual == "block" else tail)
  q_v = n - tail
  k_step = np.zeros((T, D))
  for g0 in range(0, q_k, group):
    blk = kx[g0:min(g0 + group, q_k)]
    k_step[g0:min(g0 + group, q_k)] = (blk.max(0) - blk.min(0)) / levels
  gv = min(group, D)
  v_step = np.zeros((T, D))
  for t in range(q_v):
    for c0 in range(0, D, gv):
      seg = vx[t, c0:c0 + gv]
      v_step[t, c0:c0 + gv] = (seg.max() - seg.min()) / levels
  slot = np.arange(T)
  return k_step, (slot >= q_k) & (slot < n), v_step, (slot >= q_v) & (slot < n)


def index_bytes(cache):
  return B * T * 4 + B * 4  # DenseIndex: ts [B, T] int32 + length [B] int32


def packed(d, bits):
  return -(-d * bits // 8)


# ----------------------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("size", [6, 8])
def test_pack_round_trip_and_layout(bits, size):
  codes = np.random.default_rng(bits * size).integers(0, 2**bits, size=(3, 5, size))
  p = jax.jit(C.pack_codes, static_argnums=1)(jnp.asarray(codes, jnp.uint8), bits)
  assert p.dtype == jnp.uint8 and p.shape == (3, 5, packed(size, bits))
  np.testing.assert_array_equal(p, np_pack(codes, bits))
  back = jax.jit(C.unpack_codes, static_argnums=(1, 2))(p, bits, size)
  np.testing.assert_array_equal(back, codes)


# ----------------------------------------------------------------------------------------
# KIVI.

KIVI = [dict(bits=2, group=4, residual=8, key_residual="block"),
        dict(bits=4, group=8, residual=8, key_residual="block"),  # T = 12 padded to 16
        dict(bits=2, group=4, residual=6, key_residual="sliding")]


@pytest.mark.parametrize("params", KIVI, ids=["2bit", "4bit-padded", "sliding"])
@SETTINGS
@given(seed=SEEDS)
def test_kivi_matches_reference(params, seed):
  cache, _ = make_cache(seed)
  memory, dense = run("kivi", cache, **params)
  bits, group, residual = params["bits"], params["group"], params["residual"]
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  dk, dv = np.asarray(dense.k), np.asarray(dense.v)
  np.testing.assert_array_equal(dense.pos, cache.pos)
  np.testing.assert_array_equal(dense.ts, cache.ts)
  np.testing.assert_array_equal(dense.length, cache.length)
  Tp = -(-T // group) * group
  k_scale, k_min = np.asarray(memory.k_scale), np.asarray(memory.k_min)
  k_codes = np_unpack(np.asarray(memory.k_codes), bits, D)  # [L, B, H, Tp, D]
  for l, b, h in np.ndindex(L, B, H):
    n = int(cache.length[b])
    k_step, k_exact, v_step, v_exact = ref_kivi_steps((k[l, b, h], v[l, b, h]), n, bits,
                                                      group, residual, params["key_residual"])
    quant_k = (np.arange(T) < n) & ~k_exact
    quant_v = (np.arange(T) < n) & ~v_exact
    # Exact residual, half-step error elsewhere, zeros in empty slots.
    np.testing.assert_array_equal(dk[l, b, h][k_exact], k[l, b, h][k_exact])
    np.testing.assert_array_equal(dv[l, b, h][v_exact], v[l, b, h][v_exact])
    assert within_half_step(dk[l, b, h][quant_k], k[l, b, h][quant_k], k_step[quant_k])
    assert within_half_step(dv[l, b, h][quant_v], v[l, b, h][quant_v], v_step[quant_v])
    assert np.all(dk[l, b, h, n:] == 0) and np.all(dv[l, b, h, n:] == 0)
    # Stored per-channel scales are the reference steps; dequantization is code*scale + min.
    steps = np.zeros((Tp, D))
    steps[:T] = k_step
    np.testing.assert_allclose(k_scale[l, b, h], steps[::group], rtol=1e-5, atol=1e-7)
    rows = np.arange(T)[quant_k]
    manual = k_codes[l, b, h][rows] * k_scale[l, b, h][rows // group] + k_min[l, b, h][
        rows // group]
    np.testing.assert_allclose(dk[l, b, h][rows], manual, rtol=1e-6, atol=1e-6)
  # Bytes: the sum of stored leaves, and a closed form.
  R = min(residual, T)
  per_row = (Tp * packed(D, bits) + 2 * (Tp // group) * D * 4 + R * D * 4 +
             T * packed(D, bits) + 2 * T * (D // min(group, D)) * 4 + R * D * 4)
  assert C.nbytes(memory) == sum(x.nbytes for x in jax.tree.leaves(memory))
  assert C.nbytes(memory) == L * B * H * per_row + index_bytes(cache)
  assert memory.k_codes.dtype == jnp.uint8 and memory.k_scale.dtype == cache.k.dtype


def test_kivi_residual_rule_on_block_boundaries():
  """n = R: every key quantized, all values exact; n = R + 3: 3 exact keys, R exact values."""
  cache, _ = make_cache(3)
  cache = cache.replace(pos=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), cache.pos.shape),
                        length=jnp.full((B,), T, jnp.int32))
  for n, exact_keys, exact_vals in ((8, 0, 8), (11, 3, 8), (12, 4, 8)):
    c = cache.replace(pos=jnp.where(cache.pos < n, cache.pos, -1),
                      length=jnp.full((B,), n, jnp.int32))
    c = c.replace(k=jnp.where((c.pos >= 0)[..., None], c.k, 0))
    memory, dense = run("kivi", c, **KIVI[0])
    same_k = np.all(np.asarray(dense.k) == np.asarray(c.k), axis=-1)[..., :n]
    same_v = np.all(np.asarray(dense.v) == np.asarray(c.v), axis=-1)[..., :n]
    assert np.all(same_k[..., n - exact_keys:]) and np.all(same_v[..., n - exact_vals:])
    assert not np.any(same_k[..., :n - exact_keys].all(axis=-1))  # quantized keys moved


# ----------------------------------------------------------------------------------------
# IntactKV.

INTACT = [dict(bits=4, pivots=3, sinks=1), dict(bits=2, pivots=2, sinks=2, group=4)]


def ref_pivots(pos, acc, pivots, sinks):
  ev = sorted(int(p) for p in pos if p >= 0)
  a = {int(p): float(x) for p, x in zip(pos, acc, strict=True) if p >= 0}
  rest = sorted(ev[sinks:], key=lambda p: (-a[p], p))
  return set(ev[:sinks]) | set(rest[:pivots - min(sinks, len(ev))])


def ref_token_steps(x, bits, group):
  """Per-slot steps [T, D] of asymmetric groups of ``group`` channels."""
  x = np.float64(x)
  g = x.reshape(x.shape[0], -1, group)
  step = (g.max(-1) - g.min(-1)) / (2**bits - 1)
  return np.repeat(step, group, axis=-1)


@pytest.mark.parametrize("params", INTACT, ids=["heavy-pivots", "sinks-only"])
@SETTINGS
@given(seed=SEEDS)
def test_intactkv_matches_reference(params, seed):
  cache, sig = make_cache(seed)
  memory, dense = run("intactkv", cache, sig, **params)
  bits, P, sinks = params["bits"], params["pivots"], params["sinks"]
  g = params.get("group") or D
  k, v, acc, pos = (np.asarray(x) for x in (cache.k, cache.v, sig.acc_attn, cache.pos))
  dk, dv = np.asarray(dense.k), np.asarray(dense.v)
  slots = np.asarray(memory.pivot_slot)
  for l, b, h in np.ndindex(L, B, H):
    want = ref_pivots(pos[l, b, h], acc[l, b, h], P, sinks)
    got = {int(s) for s in slots[l, b, h] if s >= 0}
    assert got == want
    n = int(cache.length[b])
    quant = (np.arange(T) < n) & ~np.isin(np.arange(T), list(want))
    for x, xh in ((k, dk), (v, dv)):
      np.testing.assert_array_equal(xh[l, b, h, sorted(want)], x[l, b, h, sorted(want)])
      step = ref_token_steps(x[l, b, h], bits, g)
      assert within_half_step(xh[l, b, h][quant], x[l, b, h][quant], step[quant])
      assert np.all(xh[l, b, h, n:] == 0)
  per_row = 2 * (T * packed(D, bits) + 2 * T * (D // g) * 4) + P * 4 + P * 2 * D * 4
  assert C.nbytes(memory) == L * B * H * per_row + index_bytes(cache)
  assert C.nbytes(memory) == sum(x.nbytes for x in jax.tree.leaves(memory))


def test_intactkv_heavy_pivots_need_signals():
  cache, _ = make_cache(0)
  comp = C.intactkv(bits=4, pivots=3, sinks=1)
  with pytest.raises(ValueError, match="signals"):
    comp.compress(cache, comp.init(cache), None)


# ----------------------------------------------------------------------------------------
# Uniform.


@pytest.mark.parametrize("bits", [8, 4])
@SETTINGS
@given(seed=SEEDS)
def test_uniform_matches_reference(bits, seed):
  cache, _ = make_cache(seed)
  memory, dense = run("uniform", cache, bits=bits)
  qmax = 2**(bits - 1) - 1
  for x, xh, codes, scale in ((cache.k, dense.k, memory.k_codes, memory.k_scale),
                              (cache.v, dense.v, memory.v_codes, memory.v_scale)):
    x, xh, codes, scale = (np.asarray(a) for a in (x, xh, codes, scale))
    valid = np.asarray(cache.pos) >= 0
    ref_scale = np.abs(np.float64(x)).max(-1) / qmax
    np.testing.assert_allclose(scale[valid], ref_scale[valid], rtol=1e-6)
    assert within_half_step(xh[valid], x[valid], ref_scale[valid][:, None])
    assert np.all(xh[~valid] == 0)
    if bits == 8:
      assert codes.dtype == np.int8 and codes.shape[-1] == D
      q = np.float64(codes)
    else:
      assert codes.dtype == np.uint8 and codes.shape[-1] == D // 2
      u = np_unpack(codes, 4, D).astype(np.int64)
      q = np.float64(np.where(u >= 8, u - 16, u))
    assert np.all(np.abs(q) <= qmax)
    np.testing.assert_allclose(xh, q * scale[..., None], rtol=1e-6, atol=1e-7)
  per_row = T * 2 * (packed(D, bits) + 4)
  assert C.nbytes(memory) == L * B * H * per_row + index_bytes(cache)
  assert C.nbytes(memory) == sum(x.nbytes for x in jax.tree.leaves(memory))


# ----------------------------------------------------------------------------------------
# jit + vmap over stacked caches.

VMAP = [("kivi", KIVI[0]), ("intactkv", INTACT[0]), ("uniform", dict(bits=4))]


@pytest.mark.parametrize("name,params", VMAP, ids=[n for n, _ in VMAP])
def test_vmap_over_stacked_caches(name, params):
  pairs = [make_cache(s) for s in (1, 2)]
  stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  cache, sig = stack(*(p[0] for p in pairs)), stack(*(p[1] for p in pairs))
  f = _jitted(name, tuple(sorted(params.items())))
  memory, dense = jax.jit(jax.vmap(f.__wrapped__ if hasattr(f, "__wrapped__") else f))(cache,
                                                                                      sig)
  for i, (c, s) in enumerate(pairs):
    one_mem, one_dense = run(name, c, s, **params)
    got = jax.tree.map(lambda x: np.asarray(x)[i], (memory, dense))
    for a, b in zip(jax.tree.leaves((one_mem, one_dense)), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------
# Integer codes, scales and minima against a float64 NumPy implementation of the published
# rules. Tolerance: a code may differ by one only at an exact rounding tie, i.e. where the
# float64 value (x - min) / scale (or x / scale) lies within 1e-4 of k + 1/2 (float32 and
# float64 arithmetic may round such a tie either way); everywhere else codes are equal.
# Scales are (max - min) / (2^b - 1) (resp. max|x| / qmax) rounded to the storage dtype: equal
# to the float64 value rounded to float32 within 2 ulp; minima are exact.


def np_minmax(x, bits):
  """float64 KIVI rule on a group x [..., m] (members on the last axis): (codes, scale, min,
  tie mask) with scale and min rounded to float32 as stored."""
  levels = 2**bits - 1
  mn = x.min(-1, keepdims=True)
  scale = np.float32((x.max(-1, keepdims=True) - mn) / levels).astype(np.float64)
  mn = np.float32(mn).astype(np.float64)
  y = (x - mn) / np.where(scale > 0, scale, 1.0)
  codes = np.where(scale > 0, np.clip(np.round(y), 0, levels), 0)
  tie = np.abs(y - np.floor(y) - 0.5) < 1e-4
  return codes, scale, mn, tie


def check_codes(got, want, tie):
  diff = np.abs(np.asarray(got, np.int64) - np.asarray(want, np.int64))
  assert np.all(diff <= 1) and np.all(tie[diff == 1]), (got, want)


def test_kivi_codes_on_a_fixed_input():
  """One channel, G = 4 keys 0, 1, 2, 3 and 2 bits: min 0, scale 1, codes 0, 1, 2, 3; values
  [0, 1.5, 3, 4.5] per token (G = 4 channels): scale 1.5, codes 0, 1, 2, 3."""
  t = 8
  k = np.zeros((1, 1, 1, t, 4), np.float32)
  k[..., :4, 0] = [0, 1, 2, 3]
  k[..., :4, 1] = [3, 3, 3, 3]  # a constant channel: scale 0, codes 0, exact
  v = np.tile(np.array([0, 1.5, 3, 4.5], np.float32), (1, 1, 1, t, 1))
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (1, 1, 1, t))
  cache = Cache(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), ts=jnp.asarray(pos),
                length=jnp.asarray([t], jnp.int32))
  mem, _ = C.kivi(bits=2, group=4, residual=4).compress(cache, None, None)
  codes = np_unpack(np.asarray(mem.k_codes), 2, 4)[0, 0, 0]  # [T, Dk]
  np.testing.assert_array_equal(codes[:4, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(codes[:4, 1], [0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(mem.k_scale)[0, 0, 0, 0, :2], [1, 0])
  np.testing.assert_array_equal(np.asarray(mem.k_min)[0, 0, 0, 0, :2], [0, 3])
  vcodes = np_unpack(np.asarray(mem.v_codes), 2, 4)[0, 0, 0]
  np.testing.assert_array_equal(vcodes[:4], np.tile([0, 1, 2, 3], (4, 1)))  # 4 quantized
  np.testing.assert_array_equal(np.asarray(mem.v_scale)[0, 0, 0, :4, 0], 1.5)


@pytest.mark.parametrize("bits,group,residual,rule", [(2, 4, 4, "block"), (4, 3, 6, "block"),
                                                      (2, 4, 4, "sliding")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kivi_codes_scales_minima_match_numpy(bits, group, residual, rule, seed):
  cache, _ = make_cache(seed)
  d = D if D % group == 0 else 6
  if d != D:
    cache = cache.replace(k=cache.k[..., :d], v=cache.v[..., :d])
  mem, _ = run("kivi", cache, bits=bits, group=group, residual=residual, key_residual=rule)
  k, v = np.float64(cache.k), np.float64(cache.v)
  kc = np_unpack(np.asarray(mem.k_codes), bits, d)
  vc = np_unpack(np.asarray(mem.v_codes), bits, d)
  gv = min(group, d)
  for l in range(L):
    for b in range(B):
      for h in range(H):
        n = int(cache.length[b])
        tail = min(n, residual)
        q_k = n - (n % residual if rule == "block" else tail)
        q_v = n - tail
        for gi, g0 in enumerate(range(0, q_k, group)):
          blk = k[l, b, h, g0:min(g0 + group, q_k)].T  # [d, m]: channel groups along time
          codes, scale, mn, tie = np_minmax(blk, bits)
          np.testing.assert_allclose(mem.k_scale[l, b, h, gi], scale[:, 0], rtol=2.5e-7)
          np.testing.assert_array_equal(mem.k_min[l, b, h, gi], mn[:, 0])
          check_codes(kc[l, b, h, g0:g0 + blk.shape[1]].T, codes, tie)
        if q_v:
          seg = v[l, b, h, :q_v].reshape(q_v, d // gv, gv)
          codes, scale, mn, tie = np_minmax(seg, bits)
          np.testing.assert_allclose(mem.v_scale[l, b, h, :q_v], scale[..., 0], rtol=2.5e-7)
          np.testing.assert_array_equal(mem.v_min[l, b, h, :q_v], mn[..., 0])
          check_codes(vc[l, b, h, :q_v].reshape(q_v, d // gv, gv), codes, tie)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_codes_and_scales_match_numpy(bits, seed):
  cache, _ = make_cache(seed)
  mem, _ = run("uniform", cache, bits=bits)
  qmax = 2 ** (bits - 1) - 1
  for x, stored, sc in ((cache.k, mem.k_codes, mem.k_scale), (cache.v, mem.v_codes, mem.v_scale)):
    x = np.float64(x)
    valid = np.asarray(cache.pos) >= 0
    scale = np.float32(np.abs(x).max(-1) / qmax).astype(np.float64)  # [L, B, H, T]
    y = x / np.where(scale > 0, scale, 1.0)[..., None]
    want = np.clip(np.round(y), -qmax, qmax)
    tie = np.abs(np.abs(y) - np.floor(np.abs(y)) - 0.5) < 1e-4
    if bits == 8:
      got = np.asarray(stored, np.int64)
    else:
      u = np_unpack(np.asarray(stored), 4, D).astype(np.int64)
      got = np.where(u >= 8, u - 16, u)
    np.testing.assert_allclose(np.where(valid, sc, 0), np.where(valid, scale, 0), rtol=2.5e-7)
    check_codes(got[valid], want[valid], tie[valid])
  # A fixed input: absmax 2.54 at 8 bits: scale 0.02, codes 127, -64, 0, 1.
  x = jnp.asarray([[2.54, -1.28, 0.0, 0.02]], jnp.float32)
  q, s = C.quantization.absmax_quantize(x, jnp.asarray([True]), 8, jnp.float32)
  np.testing.assert_allclose(s, [0.02], rtol=1e-6)
  np.testing.assert_array_equal(q, [[127, -64, 0, 1]])


# ----------------------------------------------------------------------------------------
# Non-finite inputs survive quantization (the serving guards see them).

NAN_COMPS = [("kivi2", dict(bits=2, group=4, residual=4)), ("kivi4s", dict(
    bits=4, group=4, residual=4, key_residual="sliding")),
    ("intactkv4", dict(bits=4, pivots=2, sinks=1)), ("intactkv8g", dict(bits=8, pivots=0,
                                                                         sinks=0, group=4)),
    ("uniform8", dict(bits=8)), ("uniform4", dict(bits=4))]


@pytest.mark.parametrize("name,params", NAN_COMPS, ids=[c[0] for c in NAN_COMPS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_non_finite_event_makes_its_user_non_finite(name, params, dtype):
  """A NaN / inf key or value of one real event, wherever it falls (quantized group, residual,
  pivot), makes that user's dequantized memory non-finite and no other user's. (At these
  shapes XLA's CPU max reduction drops NaN: without the explicit check every NaN was lost.)"""
  method = name.rstrip("0123456789gs")
  rng = np.random.default_rng(0)
  t_cap, n = 40, np.array([40, 5, 33, 1])
  pos = np.where(np.arange(t_cap)[None] < n[:, None], np.arange(t_cap)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (L, 4, H, t_cap))
  cache = Cache(k=jnp.asarray(rng.normal(size=pos.shape + (D,)), jnp.float32),
                v=jnp.asarray(rng.normal(size=pos.shape + (D,)), jnp.float32),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(np.maximum(pos, 0), jnp.int32),
                length=jnp.asarray(n, jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(rng.random(pos.shape), jnp.float32),
                window_attn=jnp.zeros((L, 4, H, 1, t_cap)), window_valid=jnp.ones((4, 1), bool))
  f = _jitted(method, tuple(sorted(params.items())))
  for trial in range(12):
    b = int(rng.integers(4))
    t, c = int(rng.integers(n[b])), int(rng.integers(D))
    l, h, which = int(rng.integers(L)), int(rng.integers(H)), trial % 2
    value = [np.nan, np.inf, -np.inf][trial % 3]
    x = np.array(cache.k if which == 0 else cache.v)
    x[l, b, h, t, c] = value
    bad = cache.replace(**{"k" if which == 0 else "v": jnp.asarray(x)})
    bad = bad.replace(k=bad.k.astype(dtype), v=bad.v.astype(dtype))
    _, dense = f(bad, sig)
    ok = (np.isfinite(np.asarray(dense.k, np.float32)).all(axis=(0, 2, 3, 4))
          & np.isfinite(np.asarray(dense.v, np.float32)).all(axis=(0, 2, 3, 4)))
    np.testing.assert_array_equal(ok, np.arange(4) != b, err_msg=f"{value} at {l, b, h, t, c}")


@pytest.mark.parametrize("comp", [C.kivi(bits=2, group=4, residual=4),
                                  C.intactkv(bits=4, pivots=2, sinks=1), C.uniform(bits=4)],
                         ids=["kivi2", "intactkv4", "uniform4"])
def test_sweep_guard_flags_a_nan_key_after_quantization(comp):
  """The sweep's serving step flags exactly the user whose cache had a NaN key, after
  quantization, as it does for a native memory."""
  from malloc_jax import sweep
  from tests.helpers import random_events, random_model

  model = random_model("hstu")
  ev = random_events(4, 12, [12, 9, 12, 7])
  cache, signals, _, req = sweep._prefill_batch(model, ev.items, ev.ts, ev.length,
                                                query_len=1, window=4)
  cache = cache.replace(k=cache.k.at[1, 2, 0, 3, 5].set(jnp.nan))  # user 2, a quantized key
  memory = sweep._compress_batch(cache, signals, compressor=comp)
  target = ev.items[:, 0]
  *_, finite = sweep._score_batch(model, memory, req, target, jnp.tile(target[:, None], (1, 3)))
  np.testing.assert_array_equal(np.asarray(finite), [True, True, False, True])
