"""PyramidKV (Cai et al. 2024): the arithmetic layer schedule and SnapKV selection per layer,
against float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.compressors.pyramid import pyramid_budgets
from tests.test_compressors_eviction import (
  SEEDS,
  SETTINGS,
  B,
  D,
  H,
  L,
  make_cache,
  ref_snapkv,
  run,
)
from tests.test_method_tova import check_vmap


def ref_schedule(budget, window, num_layers, beta):
  """The paper's schedule in float64: a_top = a // beta, a_0 = 2a - a_top, linear in between;
  floors plus one for the largest fractional parts (lower layer first on ties)."""
  a = budget - window
  if num_layers == 1:
    return [budget]
  top, bottom = a // beta, 2 * a - a // beta
  x = np.array([bottom - (bottom - top) * l / (num_layers - 1) for l in range(num_layers)])
  base = np.floor(x + 1e-9).astype(int)
  frac = x - base
  for l in sorted(range(num_layers), key=lambda l: (-round(frac[l], 9), l))[:num_layers * a
                                                                             - base.sum()]:
    base[l] += 1
  return [int(v) + window for v in base]


@pytest.mark.parametrize("budget,window,layers,beta", [
    (12, 2, 4, 20), (7, 2, 2, 2), (64, 8, 4, 20), (33, 8, 3, 5), (5, 5, 4, 20), (9, 1, 1, 20),
    (100, 8, 7, 20)])
def test_schedule_is_arithmetic_and_sums_to_uniform(budget, window, layers, beta):
  got = pyramid_budgets(budget, window, layers, beta)
  assert list(got) == ref_schedule(budget, window, layers, beta)
  assert sum(got) == layers * budget and all(x >= y for x, y in zip(got, got[1:]))
  assert pyramid_budgets(12, 2, 4, 20) == (22, 15, 9, 2)  # 20, 13.33, 6.67, 0 (+ window 2)


def check_layers(memory, cache, sig, budgets, window, kernel, pool):
  cap = budgets[0]
  mp, mk, mv = (np.asarray(x) for x in (memory.index.pos, memory.k, memory.v))
  assert mp.shape == (L, B, H, cap) and mk.shape == (L, B, H, cap, D)
  cp, ck, cv = np.asarray(cache.pos), np.asarray(cache.k), np.asarray(cache.v)
  win = np.asarray(sig.window_attn)
  kept_events = np.zeros(B, np.int64)
  for l, b, h in np.ndindex(L, B, H):
    real = {int(p): i for i, p in enumerate(cp[l, b, h]) if p >= 0}
    count = min(len(real), budgets[l])
    row = mp[l, b, h]
    assert np.all(row[:count] >= 0) and np.all(row[count:] == -1)
    assert np.all(np.diff(row[:count]) > 0)
    assert set(row[:count].tolist()) == ref_snapkv(cp[l, b, h], win[l, b, h], budgets[l],
                                                   window, kernel, pool), (l, b, h)
    src = [real[int(p)] for p in row[:count]]
    np.testing.assert_array_equal(mk[l, b, h, :count], ck[l, b, h, src])
    np.testing.assert_array_equal(mv[l, b, h, :count], cv[l, b, h, src])
    assert np.all(mk[l, b, h, count:] == 0)
    kept_events[b] += count
  return kept_events


@pytest.mark.parametrize("budget,window,kernel,pool,beta", [
    (7, 2, 5, "avg", 2), (6, 4, 3, "max", 20), (12, 4, 5, "avg", 20)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_pyramidkv_matches_snapkv_per_layer(budget, window, kernel, pool, beta, seed, sparse):
  cache, sig = make_cache(seed, sparse)
  memory, _ = run("pyramidkv", cache, sig, budget=budget, window=window, kernel=kernel,
                  pool=pool, beta=beta)
  budgets = pyramid_budgets(budget, window, L, beta)
  kept = check_layers(memory, cache, sig, budgets, window, kernel, pool)
  # Stored bytes: only the real kept events (k, v float32 + pos, ts int32) + the length.
  n = (np.asarray(cache.pos) >= 0).sum(-1)  # [L, B, H]
  closed = sum(H * np.minimum(n[l, :, 0], budgets[l]) for l in range(L)) * (2 * D * 4 + 8) + 4
  mp = np.asarray(memory.index.pos)
  stored = (mp >= 0).sum(axis=(0, 2, 3)) * (2 * D * 4 + 8) + 4  # what a varlen store holds
  np.testing.assert_array_equal(stored, closed)
  np.testing.assert_array_equal(kept * (2 * D * 4 + 8) + 4, closed)
  assert closed.max() <= L * H * budget * (2 * D * 4 + 8) + 4  # <= the uniform budget's
  # The serving buffer pads every layer to the largest budget.
  assert C.nbytes(memory) == L * B * H * budgets[0] * (2 * D * 4 + 8) + B * 4


def test_pyramidkv_vmap_validation_and_spec():
  caches, sigs = zip(*(make_cache(s) for s in (1, 2)), strict=True)
  check_vmap("pyramidkv", {"budget": 7, "window": 2, "beta": 2}, list(caches), list(sigs))
  for params, match in [({"budget": 2, "window": 3}, "window"), ({"budget": 4, "kernel": 2},
                        "kernel"), ({"budget": 4, "beta": 0}, "beta"),
                        ({"budget": 8, "pool": "min"}, "pool")]:
    with pytest.raises(ValueError, match=match):
      C.pyramidkv(**params)
  with pytest.raises(ValueError, match="signals"):
    run("pyramidkv", caches[0], None, budget=7, window=2)
  spec = C.get_spec("pyramidkv")
  assert spec.needs_signals and spec.tuned == "budget"
  shape = C.cache_spec(L, H, 256, 16)
  native = C.memory_bytes("native", shape)
  for r, params in C.ratio_table("pyramidkv", shape, ratios=(2, 4, 8, 16, 32)).items():
    assert params is not None and C.memory_bytes("pyramidkv", shape, **params) <= native / r
