"""KVQuant-style quantization (Hooper et al. 2024) against float64 NumPy references: outlier
sets, codes, reconstructions, stored bytes, bit packing and the k-means codebooks."""

from __future__ import annotations

import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.compressors import codebook_quant as Q
from tests.test_compressors_eviction import SEEDS, SETTINGS, B, D, H, L, T, make_cache
from tests.test_method_tova import check_vmap

TIE = 1e-5  # |z - midpoint| below this: either neighbouring code is accepted (float32 vs 64)


def ref_vector(x, count, codebook):
  """One vector (float64): (outlier indices, min, half-range, codes, x̂, near-tie flags)."""
  x = np.float64(x)
  out = sorted(range(len(x)), key=lambda i: (-abs(x[i]), i))[:count]
  inl = np.array([i for i in range(len(x)) if i not in out], int)
  cb = np.float64(codebook)
  codes = np.zeros(len(x), int)
  near = np.zeros(len(x), bool)
  if inl.size == 0:
    return set(out), 0.0, 0.0, codes, x.copy(), near
  mn = np.float64(np.float32(x[inl].min()))
  s = np.float64(np.float32((x[inl].max() - x[inl].min()) / 2))
  xh = x.copy()
  if s > 0:
    z = (x[inl] - mn) / s - 1
    codes[inl] = np.argmin(np.abs(z[:, None] - cb[None, :]), axis=1)  # first = smaller entry
    mid = (cb[1:] + cb[:-1]) / 2
    near[inl] = np.min(np.abs(z[:, None] - mid[None, :]), axis=1) < TIE
  xh[inl] = mn + (cb[codes[inl]] + 1) * s
  return set(out), mn, s, codes, xh, near


def check_row(got, ref, cb, tol):
  """Materialized x̂ equals the reference's, or its neighbouring code at a near-tie."""
  out, mn, s, codes, xh, near = ref
  for i in range(len(xh)):
    if abs(got[i] - xh[i]) <= tol * (1 + abs(xh[i])):
      continue
    alts = [mn + (cb[c] + 1) * s for c in (codes[i] - 1, codes[i] + 1) if 0 <= c < len(cb)]
    assert near[i] and any(abs(got[i] - a) <= tol * (1 + abs(a)) for a in alts), (i, got, xh)


def make_codebooks(seed, bits):
  """Sorted random codebooks in [-1, 1] (the factory takes any; fitting is tested below)."""
  rng = np.random.default_rng(seed)
  f = lambda: np.sort(rng.uniform(-1, 1, size=(L, 1 << bits)), axis=-1)
  return Q.KVQuantCodebooks(k=jnp.asarray(f(), jnp.float32), v=jnp.asarray(f(), jnp.float32))


@functools.partial(jax.jit, static_argnames="outliers")
def _compress(cb, cache, outliers):
  """kvquant's compress with the codebooks a traced argument: one compile per (bits,
  outliers), not one per drawn codebook (closed over, they would be baked into the program)."""
  comp = C.kvquant(cb, outliers=outliers)
  return comp.compress(cache, comp.init(cache), None)[0]


@pytest.mark.parametrize("bits,outliers", [(2, 0.25), (3, 0.1), (1, 0.0), (4, 0.5)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_kvquant_matches_reference(bits, outliers, seed, sparse):
  cache, _ = make_cache(seed, sparse)
  cb = make_codebooks(seed, bits)
  memory = _compress(cb, cache, outliers=outliers)
  dense = memory.materialize()
  got_k, got_v = np.asarray(dense.k, np.float64), np.asarray(dense.v, np.float64)
  kcodes = np.asarray(Q.unpack_bits(memory.k_codes, bits, D))  # [L, B, H, T, D]
  vcodes = np.asarray(Q.unpack_bits(memory.v_codes, bits, D))
  frac = fractions.Fraction(str(outliers))
  ck, cv, cp = np.asarray(cache.k), np.asarray(cache.v), np.asarray(cache.pos)
  cbk, cbv = np.float64(np.asarray(cb.k)), np.float64(np.asarray(cb.v))
  stored = np.zeros(B, np.int64)
  nk_out, nv_out = (frac * T).__floor__(), (frac * D).__floor__()
  idx_size = 1  # uint8 indices: T, D <= 256
  for l, b, h in np.ndindex(L, B, H):
    n = int((cp[l, b, h] >= 0).sum())  # occupied slots are a prefix
    count = (frac * n).__floor__()
    for c in range(D):
      ref = ref_vector(ck[l, b, h, :n, c], count, cbk[l])
      check_row(got_k[l, b, h, :n, c], ref, cbk[l], 1e-5)
      for i in ref[0]:  # outliers exact
        assert got_k[l, b, h, i, c] == ck[l, b, h, i, c]
      ok = ~ref[5]
      np.testing.assert_array_equal(kcodes[l, b, h, :n, c][ok], ref[3][ok])
    for t in range(n):
      ref = ref_vector(cv[l, b, h, t], nv_out, cbv[l])
      check_row(got_v[l, b, h, t], ref, cbv[l], 1e-5)
      for i in ref[0]:
        assert got_v[l, b, h, t, i] == cv[l, b, h, t, i]
      ok = ~ref[5]
      np.testing.assert_array_equal(vcodes[l, b, h, t][ok], ref[3][ok])
    assert np.all(got_k[l, b, h, n:] == 0) and np.all(got_v[l, b, h, n:] == 0)
    packed = -(-D * bits // 8)
    stored[b] += (n * 2 * packed + (n > 0) * 2 * D * 4 + n * 2 * 4
                  + count * D * (4 + idx_size) + n * nv_out * (4 + idx_size))
  np.testing.assert_array_equal(np.asarray(dense.pos), cp)
  # SparseIndex: pos + ts int32 per kept slot and head, + the length.
  n_rows = (cp >= 0).sum(axis=(0, 2, 3))
  np.testing.assert_array_equal(memory.stored_bytes(), stored + n_rows * 8 + 4)
  # The static buffer: every slot and outlier capacity, per user.
  buffer = L * H * (T * 2 * packed + 2 * D * 4 + T * 2 * 4 + nk_out * D * 5 + T * nv_out * 5)
  assert C.nbytes(memory) == B * (buffer + T * H * L * 8) + B * 4
  assert C.shared_nbytes(memory) == 2 * L * (1 << bits) * 4


def test_kvquant_fixed_vector_by_hand():
  # One value token [D = 8] with a 1-bit codebook (-0.5, 0.5), outliers 1/8 -> 1 per token.
  cache, _ = make_cache(0)
  v = np.zeros((L, B, H, T, D), np.float32)
  v[0, 0, 0, 0] = [0, 1, 2, 3, 4, 5, 6, -40]  # -40 is the outlier; inliers min 0, s = 3
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (L, B, H, T))  # every slot real
  cache = cache.replace(v=jnp.asarray(v), pos=jnp.asarray(pos))
  cb = Q.KVQuantCodebooks(k=jnp.asarray([[-0.5, 0.5]] * L), v=jnp.asarray([[-0.5, 0.5]] * L))
  memory, _ = C.kvquant(cb, outliers=0.125).compress(cache, None, None)
  # z = x / 3 - 1 -> codes 0 for x <= 3 (z <= 0: the tie at 0 takes the smaller entry), else
  # 1; x̂ = 0 + (c + 1) * 3 = 1.5 or 4.5.
  got = np.asarray(memory.materialize().v[0, 0, 0, 0])
  np.testing.assert_array_equal(got, [1.5, 1.5, 1.5, 1.5, 4.5, 4.5, 4.5, -40])
  assert int(memory.v_out_idx[0, 0, 0, 0, 0]) == 7 and float(memory.v_out[0, 0, 0, 0, 0]) == -40


def test_pack_bits_matches_numpy():
  rng = np.random.default_rng(0)
  for bits in (1, 2, 3, 5, 8):
    codes = rng.integers(0, 1 << bits, size=(3, 7))
    planes = ((codes[..., None] >> np.arange(bits)) & 1).reshape(3, -1)
    want = np.packbits(planes.astype(np.uint8), axis=-1, bitorder="little")
    got = np.asarray(Q.pack_bits(jnp.asarray(codes), bits))
    np.testing.assert_array_equal(got, want)
    assert got.shape[-1] == -(-7 * bits // 8)
    np.testing.assert_array_equal(np.asarray(Q.unpack_bits(jnp.asarray(got), bits, 7)), codes)


def exact_kmeans_1d(x, k):
  """Optimal 1-D k-means SSE by dynamic programming over sorted x (float64)."""
  x = np.sort(np.float64(x))
  n = len(x)
  s1, s2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
  i = np.arange(n + 1)

  def cost(a, b):  # SSE of x[a:b], arrays a < b
    m = b - a
    return s2[b] - s2[a] - (s1[b] - s1[a]) ** 2 / np.maximum(m, 1)

  best = np.where(i > 0, cost(np.zeros_like(i), i), 0.0)
  for _ in range(k - 1):
    new = best.copy()
    for b in range(1, n + 1):
      a = np.arange(1, b)
      if a.size:
        new[b] = min(best[b], np.min(best[a] + cost(a, np.full_like(a, b))))
    best = new
  return best[n]


def test_kmeans_codebook_against_references():
  rng = np.random.default_rng(1)
  # Well-separated clusters: the codebook is each cluster's mean.
  centers = np.array([-0.9, -0.3, 0.2, 0.8])
  z = np.concatenate([c + rng.uniform(-1e-3, 1e-3, size=50) for c in centers])
  cb = Q.kmeans_codebook(z, 2)
  np.testing.assert_allclose(cb, [z[i * 50:(i + 1) * 50].mean() for i in range(4)], atol=1e-12)
  # Generic data: a Lloyd fixed point (each entry the mean of the points nearest it) whose
  # squared error is within 1% of the exact optimum.
  z = np.clip(rng.normal(0, 0.4, size=300), -1, 1)
  cb = Q.kmeans_codebook(z, 2)
  assign = np.argmin(np.abs(z[:, None] - cb[None]), axis=1)
  np.testing.assert_allclose(cb, [z[assign == j].mean() for j in range(4)], atol=1e-6)
  sse = np.sum((z - cb[assign]) ** 2)
  assert sse <= 1.01 * exact_kmeans_1d(z, 4)
  with pytest.raises(ValueError, match="distinct"):
    Q.kmeans_codebook(np.array([0.0, 0.5, 0.5]), 2)


def test_calibration_inliers_and_hook():
  caches = [make_cache(s, sparse=True)[0] for s in (5, 6)]
  keys, values = Q.normalized_inliers(caches, outliers=0.25)
  frac = fractions.Fraction(1, 4)
  for l in range(L):
    want = {"k": [], "v": []}
    for cache in caches:
      ck, cv, cp = np.asarray(cache.k), np.asarray(cache.v), np.asarray(cache.pos)
      for b, h in np.ndindex(B, H):
        n = int((cp[l, b, h] >= 0).sum())
        vectors = [("k", ck[l, b, h, :n, c], (frac * n).__floor__()) for c in range(D)]
        vectors += [("v", cv[l, b, h, t], (frac * D).__floor__()) for t in range(n)]
        for kind, x, count in vectors:
          out, mn, s, _, _, _ = ref_vector(x, count, np.zeros(2))
          if s > 0:  # constant vectors are not coded
            inl = [i for i in range(len(x)) if i not in out]
            want[kind].extend((np.float64(x[inl]) - mn) / s - 1)
    np.testing.assert_allclose(np.sort(keys[l]), np.sort(want["k"]), atol=1e-6)
    np.testing.assert_allclose(np.sort(values[l]), np.sort(want["v"]), atol=1e-6)
  # The hook: config {bits, outliers} -> fitted codebooks (sorted, in [-1, 1]) and abstract
  # ones of the same shape without data.
  shape = C.CacheShape.of(caches[0])
  fitted = C.get_spec("kvquant").calibrate({"bits": 3, "outliers": 0.25}, shape,
                                           lambda: iter(caches))
  for cb in (fitted["codebooks"].k, fitted["codebooks"].v):
    cb = np.asarray(cb)
    assert cb.shape == (L, 8) and np.all(np.diff(cb) > 0) and np.all(np.abs(cb) <= 1)
  np.testing.assert_allclose(np.asarray(fitted["codebooks"].k[0]),
                             np.sort(Q.kmeans_codebook(keys[0], 3)), atol=1e-6)
  abstract = C.get_spec("kvquant").calibrate({"bits": 3}, shape, None)
  assert abstract["codebooks"].k.shape == (L, 8) and abstract["outliers"] == 0.01


def test_kvquant_vmap_validation_bytes_and_spec():
  caches = [make_cache(s)[0] for s in (1, 2)]
  cb = make_codebooks(0, 2)
  check_vmap("kvquant", {"codebooks": cb, "outliers": 0.2}, caches, None)
  with pytest.raises(ValueError, match="outliers"):
    C.kvquant(cb, outliers=1.0)
  with pytest.raises(ValueError, match="codebooks"):
    C.kvquant(Q.KVQuantCodebooks(k=jnp.zeros((L, 3)), v=jnp.zeros((L, 3))))
  with pytest.raises(ValueError, match="bits=9"):
    C.check_params("kvquant", {"bits": 9}, C.CacheShape.of(caches[0]))
  spec = C.get_spec("kvquant")
  assert spec.tuned == "bits" and spec.granularity == "precision" and not spec.needs_signals
  # The byte search's abstract memory is the real one.
  memory, _ = C.kvquant(cb, outliers=0.2).compress(caches[0], None, None)
  assert C.memory_bytes("kvquant", caches[0], bits=2, outliers=0.2) == C.bytes_per_user(memory)
  shape = C.cache_spec(L, H, 256, 16)
  native = C.memory_bytes("native", shape)
  for r, params in C.ratio_table("kvquant", shape, ratios=(2, 4, 8)).items():
    assert params is not None and C.memory_bytes("kvquant", shape, **params) <= native / r
