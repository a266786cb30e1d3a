"""Quest (Tang et al. 2024): page bounds, page selection, stored bytes and bytes read per
request, against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.compressors.quest_pages import (
  quest_read_bytes,
  quest_scores,
  quest_select,
  quest_view,
)
from tests.helpers import jitted_compress
from tests.test_compressors_eviction import SEEDS, SETTINGS, B, D, H, L, T, make_cache
from tests.test_method_tova import check_vmap


def half_integer_cache(seed, sparse):
  """make_cache with keys on a 0.5 grid and integer queries: float32 sums are exact, so the
  float64 reference and the kernel see the same ties."""
  cache, _ = make_cache(seed, sparse)
  cache = cache.replace(k=jnp.round(cache.k * 2) / 2)
  q = np.random.default_rng(seed).integers(-3, 4, size=(L, B, H, D)).astype(np.float32)
  return cache, q


def ref_quest(pos, k, v, q, page, pages):
  """One row: (bounds {page: (min, max)}, chosen pages, events read, bytes of the row)."""
  real = [i for i, p in enumerate(pos) if p >= 0]
  bounds = {}
  for p in sorted({i // page for i in real}):
    rows = np.float64(k[[i for i in real if i // page == p]])
    bounds[p] = (rows.min(0), rows.max(0))
  ub = {p: float(np.sum(np.maximum(np.float64(q) * lo, np.float64(q) * hi)))
        for p, (lo, hi) in bounds.items()}
  chosen = sorted(ub, key=lambda p: (-ub[p], p))[:pages]
  read = sum(1 for i in real if i // page in chosen)
  stored = len(real) * 2 * D * 4 + len(bounds) * 2 * D * 4
  return bounds, set(chosen), read, stored


@pytest.mark.parametrize("page,pages", [(4, 1), (3, 2), (5, 9), (1, 4)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_quest_matches_reference(page, pages, seed, sparse):
  cache, q = half_integer_cache(seed, sparse)
  comp, compress = jitted_compress("quest", (("page", page),))
  memory, _ = compress(cache, comp.init(cache), None)
  chosen = np.asarray(jax.jit(quest_select, static_argnums=2)(memory, q, pages))
  P = -(-T // page)
  assert memory.kmin.shape == (L, B, H, P, D) and chosen.shape == (L, B, H, P)
  cp, ck, cv = np.asarray(cache.pos), np.asarray(cache.k), np.asarray(cache.v)
  kmin, kmax = np.asarray(memory.kmin), np.asarray(memory.kmax)
  stored = np.zeros(B, np.int64)
  read = np.zeros(B, np.int64)
  for l, b, h in np.ndindex(L, B, H):
    bounds, want, n_read, row_bytes = ref_quest(cp[l, b, h], ck[l, b, h], cv[l, b, h],
                                                q[l, b, h], page, pages)
    for p, (lo, hi) in bounds.items():
      np.testing.assert_array_equal(kmin[l, b, h, p], lo)
      np.testing.assert_array_equal(kmax[l, b, h, p], hi)
    assert set(np.flatnonzero(chosen[l, b, h]).tolist()) == want, (l, b, h)
    stored[b] += row_bytes
    read[b] += n_read * 2 * D * 4 + len(bounds) * 2 * D * 4
  # Stored: every event's k, v, the bounds of every real page, and the index (sparse caches:
  # pos + ts per kept event; the length).
  n_rows = (cp >= 0).sum(axis=(0, 2, 3))
  np.testing.assert_array_equal(memory.stored_bytes(), stored + n_rows * 8 + 4)
  np.testing.assert_array_equal(quest_read_bytes(memory, chosen), read)
  # The read view holds exactly the chosen pages' events, k and v untouched.
  view = quest_view(memory, q, pages)
  slot_page = np.repeat(chosen, page, axis=-1)[..., :T]
  np.testing.assert_array_equal(np.asarray(view.pos), np.where(slot_page, cp, -1))
  np.testing.assert_array_equal(np.asarray(view.k), ck)
  np.testing.assert_array_equal(np.asarray(memory.materialize().pos), cp)


def test_quest_dense_index_bytes_and_fixed_bound():
  # Contiguous cache (DenseIndex: one time stamp per event), one page of 2 events.
  cache, _ = make_cache(0)
  n = np.asarray([5, 12, 0])
  pos = np.where(np.arange(T)[None] < n[:, None], np.arange(T)[None], -1)
  pos = np.broadcast_to(pos[None, :, None], (L, B, H, T)).astype(np.int32)
  cache = cache.replace(pos=jnp.asarray(pos), length=jnp.asarray(n, jnp.int32), contiguous=True)
  memory, _ = C.quest(page=2).compress(cache, None, None)
  assert isinstance(memory.index, C.DenseIndex)
  pages = -(-n // 2)  # ceil(n / page)
  closed = L * H * (n * 2 * D * 4 + pages * 2 * D * 4) + n * 4 + 4
  np.testing.assert_array_equal(memory.stored_bytes(), closed)
  # Upper bound of q . k over a page, by hand: q = (1, -2, 0..), keys (1, 3), (-2, 1).
  k = np.zeros((L, B, H, T, D), np.float32)
  k[0, 1, 0, 0, :2], k[0, 1, 0, 1, :2] = (1, 3), (-2, 1)
  memory, _ = C.quest(page=2).compress(cache.replace(k=jnp.asarray(k)), None, None)
  q = np.zeros((L, B, H, D), np.float32)
  q[0, 1, 0, :2] = (1, -2)
  # max(1*-2, 1*1) + max(-2*1, -2*3) = 1 + -2 = -1 (the true maximum q.k is -1: key 2).
  assert float(quest_scores(memory, q)[0, 1, 0, 0]) == -1.0


def test_quest_vmap_validation_and_spec():
  caches = [make_cache(s)[0] for s in (1, 2)]
  check_vmap("quest", {"page": 4}, caches, None)
  with pytest.raises(ValueError, match="page"):
    C.quest(page=0)
  memory, _ = C.quest(page=4).compress(caches[0], None, None)
  with pytest.raises(ValueError, match="pages"):
    quest_select(memory, np.zeros((L, B, H, D), np.float32), 0)
  spec = C.get_spec("quest")
  assert spec.tuned is None and not spec.needs_signals
