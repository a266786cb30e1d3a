"""MiniCache (Liu et al. 2024) against a float64 NumPy version of its merge, retention and
restoration rule, with stored bytes in closed form."""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.compressors.cross_layer_merge import slerp_directions
from tests.helpers import jitted_compress
from tests.test_compressors_eviction import SEEDS, SETTINGS, B, D, H, L, T, make_cache
from tests.test_method_tova import stack_users


def ref_pair(x0, x1, n, t, retain):
  """One (pair, user, head, kind) row of n events (float64): restored (x̂0, x̂1), retained."""
  x0, x1 = np.float64(x0[:n]), np.float64(x1[:n])
  n0, n1 = np.linalg.norm(x0, axis=1), np.linalg.norm(x1, axis=1)
  a, b = x0 / n0[:, None], x1 / n1[:, None]
  omega = np.arccos(np.clip(np.sum(a * b, axis=1), -1, 1))
  sin = np.sin(omega)[:, None]
  with np.errstate(invalid="ignore", divide="ignore"):
    slerp = (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / sin
  lerp = (1 - t) * a + t * b
  e = np.where(sin > 1e-6, slerp, lerp / np.linalg.norm(lerp, axis=1, keepdims=True))
  d = omega / np.pi
  count = (fractions.Fraction(str(retain)) * n).__floor__()
  kept = sorted(range(n), key=lambda i: (-d[i], i))[:count]
  h0, h1 = n0[:, None] * e, n1[:, None] * e
  h0[kept], h1[kept] = x0[kept], x1[kept]
  return h0, h1, set(kept)


def with_layers(cache, layers):
  """The cache with its layers re-stacked in the order ``layers`` (e.g. (0, 1, 0): L = 3)."""
  pick = lambda x: x[jnp.asarray(layers)]
  return cache.replace(k=pick(cache.k), v=pick(cache.v), pos=pick(cache.pos), ts=pick(cache.ts))


@pytest.mark.parametrize("layers,start,t,retain", [
    ((0, 1), 0, 0.6, 0.25), ((0, 1), 0, 0.5, 0.0), ((1, 0, 1), 0, 0.3, 0.5),
    ((0, 1, 0), 1, 0.6, 0.1), ((0, 1, 0, 1), 0, 0.6, 1.0)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_minicache_matches_reference(layers, start, t, retain, seed, sparse):
  cache = with_layers(make_cache(seed, sparse)[0], layers)
  nl = len(layers)
  comp, compress = jitted_compress("minicache", (("start", start), ("t", t), ("retain", retain)))
  memory, _ = compress(cache, comp.init(cache), None)
  dense = memory.materialize()
  pairs = list(range(start, nl - 1, 2))
  unmerged = [l for l in range(nl) if not any(p <= l <= p + 1 for p in pairs)]
  assert memory.layout.pairs == tuple(pairs) and memory.layout.unmerged == tuple(unmerged)
  cp = np.asarray(cache.pos)
  np.testing.assert_array_equal(np.asarray(dense.pos), cp)
  stored = np.zeros(B, np.int64)
  for kind in ("k", "v"):
    x, got = np.asarray(getattr(cache, kind)), np.asarray(getattr(dense, kind), np.float64)
    idx = np.asarray(getattr(memory, f"{kind}_ret_idx"))
    for b, h in np.ndindex(B, H):
      for l in unmerged:
        n = int((cp[l, b, h] >= 0).sum())
        np.testing.assert_array_equal(got[l, b, h, :n], x[l, b, h, :n])
        stored[b] += n * D * 4
      for p, l in enumerate(pairs):
        n = int((cp[l, b, h] >= 0).sum())  # occupied slots are a prefix
        h0, h1, kept = ref_pair(x[l, b, h], x[l + 1, b, h], n, t, retain)
        np.testing.assert_allclose(got[l, b, h, :n], h0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[l + 1, b, h, :n], h1, rtol=1e-5, atol=1e-5)
        assert set(idx[p, b, h, :len(kept)].tolist()) == kept
        for i in kept:  # retained events are exact
          assert np.all(got[l, b, h, i] == x[l, b, h, i])
        stored[b] += n * D * 4 + 2 * n * 4 + len(kept) * (2 * D * 4 + 1)
    assert np.all(got[cp < 0] == 0)
  n_rows = (cp >= 0).sum(axis=(0, 2, 3))  # SparseIndex: pos + ts per slot and head, + length
  np.testing.assert_array_equal(memory.stored_bytes(), stored + n_rows * 8 + 4)


def test_minicache_by_hand_and_dense_index_bytes():
  # Orthogonal states 2 (1, 0) and 3 (0, 1), t = 0.5: e = (1, 1) / sqrt 2, distance 1/2.
  n0, n1, e, d = slerp_directions(jnp.asarray([[2.0, 0.0]]), jnp.asarray([[0.0, 3.0]]), 0.5)
  np.testing.assert_allclose(np.asarray(e), [[2**-0.5, 2**-0.5]], rtol=1e-6)
  assert float(n0[0]) == 2 and float(n1[0]) == 3 and abs(float(d[0]) - 0.5) < 1e-7
  # Equal directions: e is that direction (the sin = 0 branch); a zero state takes the other's.
  _, _, e, d = slerp_directions(jnp.asarray([[1.0, 1.0], [0.0, 0.0]]),
                                jnp.asarray([[2.0, 2.0], [0.0, 5.0]]), 0.6)
  np.testing.assert_allclose(np.asarray(e), [[2**-0.5, 2**-0.5], [0, 1]], rtol=1e-6)
  # Contiguous cache: DenseIndex, one time stamp per event. Native / MiniCache bytes.
  cache, _ = make_cache(0)
  n = np.asarray([5, 12, 0])
  pos = np.where(np.arange(T)[None] < n[:, None], np.arange(T)[None], -1)
  pos = np.broadcast_to(pos[None, :, None], (L, B, H, T)).astype(np.int32)
  cache = cache.replace(pos=jnp.asarray(pos), length=jnp.asarray(n, jnp.int32), contiguous=True)
  memory, _ = C.minicache(retain=0.2).compress(cache, None, None)
  assert isinstance(memory.index, C.DenseIndex)
  r = n // 5  # floor(0.2 n)
  closed = 2 * H * (n * D * 4 + 2 * n * 4 + r * (2 * D * 4 + 1)) + n * 4 + 4
  np.testing.assert_array_equal(memory.stored_bytes(), closed)


def test_minicache_vmap_validation_bytes_and_spec():
  caches = [make_cache(s)[0] for s in (1, 2)]
  # vmap(jit(compress)) over stacked batches equals each batch alone (float leaves to float32
  # rounding: the trigonometry fuses differently; indices exactly).
  comp = C.minicache(retain=0.25)
  batched = jax.jit(jax.vmap(lambda c: comp.compress(c, None, None)[0]))(stack_users(caches))
  for i, c in enumerate(caches):
    alone = comp.compress(c, None, None)[0]
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
      np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-5, atol=1e-6)
      if not np.issubdtype(b.dtype, np.floating):
        np.testing.assert_array_equal(np.asarray(a)[i], b)
  with pytest.raises(ValueError, match="retain"):
    C.minicache(retain=1.5)
  with pytest.raises(ValueError, match="t="):
    C.minicache(t=-0.1)
  with pytest.raises(ValueError, match="at least 3 layers"):
    C.minicache(start=1).compress(caches[0], None, None)
  spec = C.get_spec("minicache")
  assert spec.granularity == "layer" and spec.tuned is None and not spec.needs_signals
  memory, _ = C.minicache(retain=0.25).compress(caches[0], None, None)
  assert C.memory_bytes("minicache", caches[0], retain=0.25) == C.bytes_per_user(memory)
  # Alone it stays below 2x: the published small config's shape (2 layers, 1 head, 50 dims).
  shape = C.cache_spec(2, 1, 200, 50)
  native = C.memory_bytes("native", shape)
  ratio0 = native / C.memory_bytes("minicache", shape, retain=0.0)
  assert 1.85 < ratio0 < 2 and native / C.memory_bytes("minicache", shape) < ratio0
  # Eviction first, then merging: the kept events' bytes roughly halved.
  comp = C.chain(C.tova(budget=6), C.minicache(retain=0.0))
  _, sig = make_cache(1)
  mem, _ = comp.compress(caches[0], comp.init(caches[0]), sig)
  assert mem.materialize().capacity == 6
