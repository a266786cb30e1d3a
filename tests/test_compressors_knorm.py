"""K-norm eviction against a float64 NumPy version of Devoto et al.'s rule."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.cache import Cache
from tests.test_compressors_eviction import (
  SEEDS,
  SETTINGS,
  B,
  D,
  H,
  L,
  T,
  check_memory,
  make_cache,
  nbytes_closed_form,
  run,
)


def ref_knorm(pos, k, budget, recent):
  """Kept positions of one row: the recent newest, then the smallest float64 key norms."""
  ev = sorted(int(p) for p in pos if p >= 0)
  if len(ev) <= budget:
    return set(ev)
  slot = {int(p): i for i, p in enumerate(pos) if p >= 0}
  norm = {p: float(np.sqrt(np.sum(np.float64(k[slot[p]]) ** 2))) for p in ev}
  keep = set(ev[len(ev) - recent:]) if recent else set()
  rest = sorted(ev[:len(ev) - recent], key=lambda p: (norm[p], p))
  return keep | set(rest[:budget - recent])


@pytest.mark.parametrize("budget,recent", [(5, 0), (6, 2), (12, 4)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_knorm_matches_reference(budget, recent, seed, sparse):
  cache, _ = make_cache(seed, sparse)
  memory, _ = run("knorm", cache, None, budget=budget, recent=recent)
  pos, k = np.asarray(cache.pos), np.asarray(cache.k)
  check_memory(memory, cache, budget,
               lambda l, b, h: ref_knorm(pos[l, b, h], k[l, b, h], budget, recent))
  assert C.nbytes(memory) == nbytes_closed_form(budget)


def _row_cache(keys, n):
  """One layer, user, head; keys [T, D] with n real events at slots 0..n-1."""
  T_, D_ = keys.shape
  pos = np.where(np.arange(T_) < n, np.arange(T_), -1)
  shape = (1, 1, 1, T_)
  return Cache(k=jnp.asarray(keys, jnp.float32)[None, None, None],
               v=jnp.asarray(keys, jnp.float32)[None, None, None],
               pos=jnp.asarray(pos, jnp.int32).reshape(shape),
               ts=jnp.asarray(np.maximum(pos, 0) * 10, jnp.int32).reshape(shape),
               length=jnp.asarray([n], jnp.int32), contiguous=True)


def test_knorm_ties_nan_and_padding():
  # norms: 3, 1, 3, nan, 1, 2, (empty: 0 but must never be kept)
  keys = np.array([[3, 0], [1, 0], [0, 3], [np.nan, 0], [0, 1], [2, 0], [0, 0], [0, 0]],
                  np.float64)
  comp = C.knorm(budget=4)
  memory, _ = comp.compress(_row_cache(keys, 6), comp.init(None))
  # Smallest norms 1, 1 (positions 1, 4), then 2 (5), then the tie at 3 goes to position 0.
  np.testing.assert_array_equal(np.asarray(memory.index.pos)[0, 0, 0], [0, 1, 4, 5])
  comp = C.knorm(budget=6)  # all six real events, NaN included; no empty slot
  memory, _ = comp.compress(_row_cache(keys, 6), comp.init(None))
  np.testing.assert_array_equal(np.asarray(memory.index.pos)[0, 0, 0], [0, 1, 2, 3, 4, 5])
  comp = C.knorm(budget=5)  # the NaN key goes first
  memory, _ = comp.compress(_row_cache(keys, 6), comp.init(None))
  np.testing.assert_array_equal(np.asarray(memory.index.pos)[0, 0, 0], [0, 1, 2, 4, 5])


def test_knorm_pads_a_short_cache_and_validates():
  cache, _ = make_cache(3, capacity=4)
  memory, _ = run("knorm", cache, None, budget=6)
  assert memory.k.shape == (L, B, H, 6, D)
  kept = np.sort(np.asarray(memory.index.pos), axis=-1)[..., 2:]  # every real event, in order
  np.testing.assert_array_equal(kept, np.sort(np.asarray(cache.pos), axis=-1))
  with pytest.raises(ValueError, match="recent=3 must be <= budget=2"):
    C.knorm(budget=2, recent=3)
  with pytest.raises(ValueError, match="budget"):
    C.knorm(budget=0)


def test_knorm_is_registered_and_budgeted():
  spec = C.get_spec("knorm")
  assert spec.granularity == "token" and not spec.needs_signals and spec.tuned == "budget"
  shape = C.cache_spec(L, H, T, D)
  native = C.memory_bytes("native", shape)
  params = C.params_for_ratio("knorm", shape, 4.0)
  assert C.memory_bytes("knorm", shape, **params) <= native / 4
  bigger = dict(params, budget=params["budget"] + 1)
  assert C.memory_bytes("knorm", shape, **bigger) > native / 4
  # Closed form: native L H T (2 D) 4 + T 4 + 4 bytes; knorm L H b (2 D 4 + 2 4) + 4.
  native_closed = L * H * T * 2 * D * 4 + T * 4 + 4
  assert native == native_closed
  assert params["budget"] == max(b for b in range(1, T + 1)
                                 if L * H * b * (2 * D * 4 + 8) + 4 <= native_closed / 4)
