"""Ada-KV (Feng et al. 2024): a layer budget spent on the top SnapKV votes across heads,
against a float64 NumPy version of the rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from malloc_jax import compressors as C
from tests.test_compressors_eviction import (
  SEEDS,
  SETTINGS,
  B,
  D,
  H,
  L,
  T,
  make_cache,
  run,
)
from tests.test_method_tova import check_vmap


def pooled_votes(pos, win, window, kernel, pool):
  """{position: pooled vote} of one head's events before the window (float64)."""
  ev = sorted(int(p) for p in pos if p >= 0)
  slot = {int(p): i for i, p in enumerate(pos) if p >= 0}
  prefix = ev[:max(0, len(ev) - window)]
  votes = np.array([np.float64(win[-window:, slot[p]]).sum() for p in prefix])
  r, out = kernel // 2, {}
  for i, p in enumerate(prefix):
    seg = votes[max(0, i - r):i + r + 1]
    out[p] = seg.sum() / kernel if pool == "avg" else seg.max()
  return out, ev[len(prefix):], slot


def ref_adakv(pos, win, budget, window, kernel, pool, floor):
  """Kept positions of each head of one layer and user."""
  a = budget - window
  guard = int(floor * a)
  heads = [pooled_votes(pos[h], win[h], window, kernel, pool) for h in range(H)]
  kept = [set(w) for _, w, _ in heads]
  rest = []
  for h, (votes, _, slot) in enumerate(heads):
    order = sorted(votes, key=lambda p: (-votes[p], p))
    kept[h] |= set(order[:guard])
    rest += [(-votes[p], h, slot[p], p) for p in order[guard:]]
  left = H * a - sum(min(guard, len(v)) for v, _, _ in heads)
  for _, h, _, p in sorted(rest)[:left]:
    kept[h].add(p)
  return kept


@pytest.mark.parametrize("budget,window,kernel,pool,floor", [
    (5, 2, 5, "avg", 0.2), (7, 3, 3, "max", 0.0), (6, 2, 1, "avg", 1.0), (4, 4, 5, "avg", 0.2),
    (9, 2, 5, "avg", 0.5)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_adakv_matches_reference(budget, window, kernel, pool, floor, seed, sparse):
  cache, sig = make_cache(seed, sparse)
  memory, _ = run("adakv", cache, sig, budget=budget, window=window, kernel=kernel, pool=pool,
                  floor=floor)
  cap = min(H * (budget - window) + window, T)
  cp, ck, win = np.asarray(cache.pos), np.asarray(cache.k), np.asarray(sig.window_attn)
  mp, mk = np.asarray(memory.index.pos), np.asarray(memory.k)
  assert mp.shape == (L, B, H, cap) and mk.shape == (L, B, H, cap, D)
  kept_events = np.zeros(B, np.int64)
  for l, b in np.ndindex(L, B):
    want = ref_adakv(cp[l, b], win[l, b], budget, window, kernel, pool, floor)
    assert sum(len(w) for w in want) <= H * budget
    for h in range(H):
      row = mp[l, b, h]
      c = len(want[h])
      assert set(row[:c].tolist()) == want[h] and np.all(row[c:] == -1), (l, b, h)
      assert np.all(np.diff(row[:c]) > 0)
      slot = {int(p): i for i, p in enumerate(cp[l, b, h]) if p >= 0}
      np.testing.assert_array_equal(mk[l, b, h, :c], ck[l, b, h, [slot[int(p)] for p in row[:c]]])
      kept_events[b] += c
  # Stored bytes of a variable-length store: the real kept events only.
  stored = (mp >= 0).sum(axis=(0, 2, 3)) * (2 * D * 4 + 8) + 4
  np.testing.assert_array_equal(stored, kept_events * (2 * D * 4 + 8) + 4)
  assert stored.max() <= L * H * budget * (2 * D * 4 + 8) + 4


def test_adakv_fixed_votes_heads_keep_different_counts():
  # One user full (12 events), window 2, kernel 1: head 0 votes are large, head 1 small.
  cache, sig = make_cache(0, sparse=False)
  win = np.zeros(sig.window_attn.shape, np.float32)
  win[:, :, 0, -2:, :10] = np.arange(10)[::-1] + 10.0  # head 0: 20..11 (two rows summed)
  win[:, :, 1, -2:, :10] = np.arange(10) * 0.5  # head 1: 0..9 * 1.0
  pos = np.broadcast_to(np.arange(T), cache.pos.shape)
  cache = cache.replace(pos=np.asarray(pos, np.int32))
  sig = sig.replace(window_attn=win)
  memory, _ = run("adakv", cache, sig, budget=5, window=2, kernel=1, floor=0.0)
  mp = np.asarray(memory.index.pos)[0, 0]
  # H * a = 6 picks, all from head 0 (votes 38..28 > head 1's <= 9): positions 0..5.
  np.testing.assert_array_equal(mp[0, :8], [0, 1, 2, 3, 4, 5, 10, 11])
  np.testing.assert_array_equal(mp[1, :2], [10, 11])
  assert np.all(mp[1, 2:] == -1)
  memory, _ = run("adakv", cache, sig, budget=5, window=2, kernel=1, floor=0.5)
  mp = np.asarray(memory.index.pos)[0, 0]  # guard 1 per head: head 1 keeps its best (9)
  np.testing.assert_array_equal(mp[0, :7], [0, 1, 2, 3, 4, 10, 11])
  np.testing.assert_array_equal(mp[1, :3], [9, 10, 11])


def test_adakv_vmap_validation_and_spec():
  caches, sigs = zip(*(make_cache(s, sparse=True) for s in (1, 2)), strict=True)
  check_vmap("adakv", {"budget": 5, "window": 2}, list(caches), list(sigs))
  for params, match in [({"budget": 2, "window": 3}, "window"), ({"budget": 9, "kernel": 2},
                        "kernel"), ({"budget": 9, "floor": 1.5}, "floor"),
                        ({"budget": 8, "pool": "min"}, "pool")]:
    with pytest.raises(ValueError, match=match):
      C.adakv(**params)
  with pytest.raises(ValueError, match="signals"):
    run("adakv", caches[0], None, budget=5, window=2)
  spec = C.get_spec("adakv")
  assert spec.needs_signals and spec.tuned == "budget"
  shape = C.cache_spec(L, H, 256, 16)
  native = C.memory_bytes("native", shape)
  for r, params in C.ratio_table("adakv", shape, ratios=(2, 4, 8, 16, 32)).items():
    assert params is not None and C.memory_bytes("adakv", shape, **params) <= native / r
