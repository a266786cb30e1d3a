"""ThinK (Xu et al. 2024) against a float64 NumPy version of its channel selection."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from tests.helpers import jitted_compress
from tests.test_compressors_eviction import SEEDS, SETTINGS, B, D, H, L, T, W, make_cache
from tests.test_method_tova import check_vmap


def ref_think(q, qvalid, k, kvalid, channels):
  """Kept channels of one row: top ||Q_i|| ||K_i|| (float64), ties to the smaller channel."""
  qn = np.linalg.norm(np.float64(q[qvalid]), axis=0) if qvalid.any() else np.zeros(D)
  kn = np.linalg.norm(np.float64(k[kvalid]), axis=0) if kvalid.any() else np.zeros(D)
  score = qn * kn
  return sorted(sorted(range(D), key=lambda i: (-score[i], i))[:channels])


@pytest.mark.parametrize("channels", [1, 3, 8])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans(), short=st.integers(0, W))
def test_think_matches_reference(channels, seed, sparse, short):
  cache, sig = make_cache(seed, sparse)
  wv = np.ones((B, W), bool)
  wv[0, :short] = False  # user 0 has fewer real window queries (right-aligned)
  q = np.asarray(sig.window_queries).copy()
  q[:, 0, :, :short] = 1e3  # padding rows hold garbage that must not count
  sig = sig.replace(window_valid=jnp.asarray(wv), window_queries=jnp.asarray(q))
  comp, compress = jitted_compress("think", (("channels", channels),))
  memory, _ = compress(cache, comp.init(cache), sig)
  dense = memory.materialize()
  ck, cv, cp = np.asarray(cache.k), np.asarray(cache.v), np.asarray(cache.pos)
  gk, gv = np.asarray(dense.k), np.asarray(dense.v)
  kept = np.asarray(memory.channels)
  for l, b, h in np.ndindex(L, B, H):
    valid = cp[l, b, h] >= 0
    want = ref_think(q[l, b, h], wv[b], ck[l, b, h], valid, channels)
    assert kept[l, b, h].tolist() == want, (l, b, h)
    mask = np.zeros(D, bool)
    mask[want] = True
    np.testing.assert_array_equal(gk[l, b, h][valid][:, mask], ck[l, b, h][valid][:, mask])
    assert np.all(gk[l, b, h][:, ~mask] == 0) and np.all(gk[l, b, h][~valid] == 0)
    np.testing.assert_array_equal(gv[l, b, h][valid], cv[l, b, h][valid])
  np.testing.assert_array_equal(np.asarray(dense.pos), cp)
  # Kept key channels, their uint8 indices, full values, the sparse index (pos + ts), length.
  per_user = L * H * (T * channels * 4 + channels + T * D * 4 + T * 8) + 4
  assert C.nbytes(memory) == B * per_user


def test_think_vmap_validation_and_spec():
  caches, sigs = zip(*(make_cache(s) for s in (1, 2)), strict=True)
  check_vmap("think", {"channels": 5}, list(caches), list(sigs))
  with pytest.raises(ValueError, match="channels"):
    C.think(channels=0)
  with pytest.raises(ValueError, match="window_queries"):
    C.think(channels=2).compress(caches[0], None, sigs[0].replace(window_queries=None))
  with pytest.raises(ValueError, match="exceeds the key dimension"):
    C.think(channels=D + 1).compress(caches[0], None, sigs[0])
  spec = C.get_spec("think")
  assert spec.needs_signals and spec.tuned is None
  shape = C.cache_spec(L, H, 64, 16)
  assert C.resolve_params("think", {"channels": "auto"}, shape) == {"channels": 10}
  # Values are untouched: even one channel stays below 2x (closed form, DenseIndex).
  native = C.memory_bytes("native", shape)
  one = C.memory_bytes("think", shape, channels=1)
  assert one == L * H * (64 * 4 + 1 + 64 * 16 * 4) + 64 * 4 + 4 and native / one < 2


@pytest.mark.parametrize("contiguous", [True, False])
def test_think_stored_bytes_closed_form(contiguous):
  """Users of 0, 5 and T (capacity) events: L H n (c s_k + D s_v) + [n > 0] L H c i + index,
  with float32 keys and values, uint8 channel indices, int32 positions, time stamps, length."""
  lengths = np.array([0, 5, T])
  cache, sig = make_cache(7)
  pos = np.where(np.arange(T)[None] < lengths[:, None], np.arange(T)[None], -1)  # [B, T]
  pos = np.broadcast_to(pos[None, :, None], (L, B, H, T))
  cache = cache.replace(pos=jnp.asarray(pos, jnp.int32), length=jnp.asarray(lengths, jnp.int32),
                        contiguous=contiguous)
  for c in (1, 3, D):
    comp = C.think(channels=c)
    memory, _ = comp.compress(cache, comp.init(cache), sig)
    index = lengths * 4 + 4 if contiguous else L * H * lengths * 8 + 4
    want = L * H * lengths * (c * 4 + D * 4) + (lengths > 0) * L * H * c + index
    np.testing.assert_array_equal(C.stored_bytes(memory), want)
    assert C.stored_bytes(memory).dtype == np.int64
