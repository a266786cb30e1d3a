"""Token pruning and merging (H2O, SnapKV, StreamingLLM, random, merge_evicted).

Every selection is checked against a float64 NumPy implementation of the published rule
written here, on random caches (uneven lengths, padding with tempting garbage, heads keeping
different events) and on fixed inputs with ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax.cache import Cache, Signals, append
from malloc_jax.compressors.eviction import hash32

L, B, H, T, D, W = 2, 3, 2, 12, 8, 4  # the tiny HSTU below has the same shapes
SETTINGS = settings(max_examples=12, deadline=None)
SEEDS = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------
# Random caches.


def make_cache(seed: int, sparse: bool = False, capacity: int = T):
  """A random cache [L, B, H, capacity] with integer-valued signals (exact sums, many ties).

  Empty slots hold large garbage keys, values and signals, so keeping one instead of a real
  event is visible. Sparse caches hold, per head, a sorted random subset of a longer history.
  Eviction ignores the ``contiguous`` flag, so every cache here says False (one compile).
  """
  rng = np.random.default_rng(seed)
  n = rng.integers(0, capacity + 1, size=B)
  n[rng.integers(B)] = capacity  # at least one full user
  pos = np.full((L, B, H, capacity), -1, np.int64)
  length = n.copy()
  for b in range(B):
    if sparse and n[b] > 0:
      length[b] = n[b] + rng.integers(0, capacity)
      for l in range(L):
        for h in range(H):
          pos[l, b, h, :n[b]] = np.sort(rng.choice(length[b], n[b], replace=False))
    else:
      pos[:, b, :, :n[b]] = np.arange(n[b])
  ev_ts = np.sort(rng.integers(0, 10**6, size=(B, 4 * capacity)), axis=1)
  ts = np.where(pos >= 0, np.take_along_axis(ev_ts[None, :, None, :].repeat(L, 0).repeat(H, 2),
                                              np.maximum(pos, 0), axis=-1), 0)
  valid = pos >= 0
  k = np.where(valid[..., None], rng.normal(size=(L, B, H, capacity, D)), 50.0)
  v = np.where(valid[..., None], rng.normal(size=(L, B, H, capacity, D)), -50.0)
  acc = np.where(valid, rng.integers(0, 6, size=valid.shape), 1000.0)
  win = np.where(valid[:, :, :, None, :], rng.integers(0, 4, size=(L, B, H, W, capacity)), 1000.0)
  cache = Cache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(ts, jnp.int32),
                length=jnp.asarray(length, jnp.int32), contiguous=False)
  sig = Signals(acc_attn=jnp.asarray(acc, jnp.float32), window_attn=jnp.asarray(win, jnp.float32),
                window_valid=jnp.ones((B, W), bool))
  return cache, sig


@functools.cache
def _jitted(name, items):
  comp = C.make_compressor(name, **dict(items))
  return comp, jax.jit(comp.compress)


def run(name, cache, sig, **params):
  comp, f = _jitted(name, tuple(sorted(params.items())))
  return f(cache, comp.init(cache), sig)


# ----------------------------------------------------------------------------------------
# NumPy references of the published rules (one row = one layer, user, head).


def _events(pos):
  return sorted(int(p) for p in pos if p >= 0)


def ref_h2o(pos, acc, heavy, recent):
  ev = _events(pos)
  n = len(ev)
  if n <= heavy + recent:
    return set(ev)
  a = {int(p): float(x) for p, x in zip(pos, acc, strict=True) if p >= 0}
  keep = set(ev[n - recent:]) if recent else set()
  rest = sorted(ev[:n - recent], key=lambda p: (-a[p], p))
  return keep | set(rest[:heavy])


def ref_snapkv(pos, win, budget, window, kernel, pool):
  ev = _events(pos)
  n = len(ev)
  if n <= budget:
    return set(ev)
  slot = {int(p): i for i, p in enumerate(pos) if p >= 0}
  prefix = ev[:n - window]
  votes = np.array([np.float64(win[-window:, slot[p]]).sum() for p in prefix])
  r = kernel // 2
  pooled = []
  for i in range(len(prefix)):
    seg = votes[max(0, i - r):i + r + 1]
    pooled.append(seg.sum() / kernel if pool == "avg" else seg.max())
  top = sorted(range(len(prefix)), key=lambda i: (-pooled[i], prefix[i]))[:budget - window]
  return {prefix[i] for i in top} | set(ev[n - window:])


def ref_streaming(pos, sinks, recent):
  ev = _events(pos)
  if len(ev) <= sinks + recent:
    return set(ev)
  return set(ev[:sinks]) | (set(ev[len(ev) - recent:]) if recent else set())


def _np_hash32(x):
  x = np.asarray(x, np.uint64) & 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x7FEB352D) & 0xFFFFFFFF
  x ^= x >> 15
  x = (x * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def ref_fingerprint(cache):
  """[B] uint64: the documented per-user fingerprint, in NumPy."""
  pos = np.asarray(cache.pos)[0, :, 0].astype(np.int64)  # [B, T]
  ts = np.asarray(cache.ts)[0, :, 0].astype(np.int64) & 0xFFFFFFFF
  k0 = np.asarray(cache.k, np.float32)[0, :, 0, :, 0]
  kbits = np.where(np.isnan(k0), 0x7FC00000, k0.view(np.uint32)).astype(np.uint64)
  event = _np_hash32(_np_hash32(pos & 0xFFFFFFFF) ^ ts.astype(np.uint64) ^ _np_hash32(kbits))
  total = np.where(pos >= 0, event, 0).sum(axis=-1) & 0xFFFFFFFF
  length = np.asarray(cache.length).astype(np.uint64)
  return _np_hash32((total + _np_hash32(length)) & 0xFFFFFFFF)


def ref_random_scores(seed, shape, call=0, fingerprint=None):
  """Scores [L, B, H, T]: hash32(key ^ hash32(hash32(i) ^ f_b)), i the slot within the user."""
  Ls, Bs, Hs, Ts = shape
  key = _np_hash32(seed)
  for _ in range(call):
    key = _np_hash32(key + 0x9E3779B9)
  i = np.arange(Ls * Hs * Ts, dtype=np.uint64).reshape(Ls, 1, Hs, Ts)
  f = np.asarray(fingerprint, np.uint64)[None, :, None, None]
  return (_np_hash32(key ^ _np_hash32(_np_hash32(i) ^ f)) >> 8).astype(np.float64)


def ref_merge(pos, k, v, acc, heavy, recent):
  """{kept position: (k, v)} under the documented merge_evicted rule, in float64."""
  kept = sorted(ref_h2o(pos, acc, heavy, recent))
  slot = {int(p): i for i, p in enumerate(pos) if p >= 0}
  k, v, acc = np.float64(k), np.float64(v), np.float64(acc)
  unit = lambda x: x / max(np.linalg.norm(x), 1e-12)
  groups = {p: [p] for p in kept}
  for e in _events(pos):
    if e in groups:
      continue
    sims = [unit(k[slot[e]]) @ unit(k[slot[s]]) for s in kept]
    groups[kept[int(np.argmax(sims))]].append(e)
  out = {}
  for s, members in groups.items():
    w = np.array([acc[slot[m]] for m in members])
    if len(members) == 1 or w.sum() == 0:
      out[s] = (k[slot[s]], v[slot[s]])
    else:
      out[s] = tuple(sum(w[i] * x[slot[m]] for i, m in enumerate(members)) / w.sum()
                     for x in (k, v))
  return out


# ----------------------------------------------------------------------------------------
# Shared checks.


def check_memory(memory, cache, budget, expected=None, exact_kv=True):
  """Invariants of a pruned memory; ``expected(l, b, h) -> set`` of positions if given."""
  assert isinstance(memory.index, C.SparseIndex)
  mp, mts = np.asarray(memory.index.pos), np.asarray(memory.index.ts)
  mk, mv = np.asarray(memory.k), np.asarray(memory.v)
  assert mp.shape == (L, B, H, budget) and mk.shape == (L, B, H, budget, D)
  np.testing.assert_array_equal(memory.index.length, cache.length)
  cp, cts = np.asarray(cache.pos), np.asarray(cache.ts)
  ck, cv = np.asarray(cache.k), np.asarray(cache.v)
  for l in range(L):
    for b in range(B):
      for h in range(H):
        real = {int(p): i for i, p in enumerate(cp[l, b, h]) if p >= 0}
        count = min(len(real), budget)
        row = mp[l, b, h]
        assert np.all(row[:count] >= 0) and np.all(row[count:] == -1), row
        assert np.all(np.diff(row[:count]) > 0), "kept slots sorted by position"
        assert set(row[:count].tolist()) <= set(real)
        src = [real[int(p)] for p in row[:count]]
        np.testing.assert_array_equal(mts[l, b, h, :count], cts[l, b, h, src])
        assert np.all(mts[l, b, h, count:] == 0) and np.all(mk[l, b, h, count:] == 0)
        if exact_kv:
          np.testing.assert_array_equal(mk[l, b, h, :count], ck[l, b, h, src])
          np.testing.assert_array_equal(mv[l, b, h, :count], cv[l, b, h, src])
        if expected is not None:
          assert set(row[:count].tolist()) == expected(l, b, h), (l, b, h)


def nbytes_closed_form(budget):
  return L * B * H * budget * (2 * D * 4 + 2 * 4) + B * 4


# ----------------------------------------------------------------------------------------
# Property tests against the references.


@pytest.mark.parametrize("heavy,recent", [(3, 2), (0, 4), (8, 4)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_h2o_matches_reference(heavy, recent, seed, sparse):
  cache, sig = make_cache(seed, sparse)
  memory, state = run("h2o", cache, sig, heavy=heavy, recent=recent)
  acc, pos = np.asarray(sig.acc_attn), np.asarray(cache.pos)
  check_memory(memory, cache, heavy + recent,
               lambda l, b, h: ref_h2o(pos[l, b, h], acc[l, b, h], heavy, recent))
  assert C.nbytes(memory) == nbytes_closed_form(heavy + recent)
  assert C.nbytes(memory) == sum(x.nbytes for x in jax.tree.leaves(memory))
  # The state holds the kept events' accumulated attention.
  state_acc = np.asarray(state.acc)
  for l, b, h in np.ndindex(L, B, H):
    slot = {int(p): i for i, p in enumerate(pos[l, b, h]) if p >= 0}
    for j, p in enumerate(np.asarray(memory.index.pos)[l, b, h]):
      want = acc[l, b, h, slot[int(p)]] if p >= 0 else 0.0
      assert state_acc[l, b, h, j] == want


@pytest.mark.parametrize("budget,window,kernel,pool", [(7, 2, 5, "avg"), (12, 4, 7, "max")])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_snapkv_matches_reference(budget, window, kernel, pool, seed, sparse):
  cache, sig = make_cache(seed, sparse)
  memory, _ = run("snapkv", cache, sig, budget=budget, window=window, kernel=kernel, pool=pool)
  win, pos = np.asarray(sig.window_attn), np.asarray(cache.pos)
  check_memory(memory, cache, budget, lambda l, b, h: ref_snapkv(
      pos[l, b, h], win[l, b, h], budget, window, kernel, pool))


@pytest.mark.parametrize("sinks,recent", [(3, 4), (2, 0), (4, 8)])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_streaming_matches_reference(sinks, recent, seed, sparse):
  cache, sig = make_cache(seed, sparse)
  memory, _ = run("streaming", cache, None, sinks=sinks, recent=recent)
  pos = np.asarray(cache.pos)
  check_memory(memory, cache, sinks + recent,
               lambda l, b, h: ref_streaming(pos[l, b, h], sinks, recent))


@pytest.mark.parametrize("budget", [5, 12])
@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_random_matches_reference(budget, seed, sparse):
  cache, _ = make_cache(seed, sparse)
  comp, f = _jitted("random", (("budget", budget), ("seed", 7)))
  state = comp.init(cache)
  pos = np.asarray(cache.pos)
  cap = max(T, budget)
  pos_padded = np.pad(pos, [(0, 0)] * 3 + [(0, cap - T)], constant_values=-1)
  for call in range(2):
    memory, state = f(cache, state, None)
    score = ref_random_scores(7, (L, B, H, cap), call, ref_fingerprint(cache))

    def expected(l, b, h):
      ev = sorted((-score[l, b, h, i], int(p)) for i, p in enumerate(pos_padded[l, b, h])
                  if p >= 0)
      return {p for _, p in ev[:budget]}

    check_memory(memory, cache, budget, expected)
  again, _ = f(cache, comp.init(cache), None)  # deterministic given the seed
  first, _ = f(cache, comp.init(cache), None)
  np.testing.assert_array_equal(again.index.pos, first.index.pos)


def test_random_is_uniform_over_real_events():
  """256 users of 10 real events (+ 2 padding slots), budget 5: each event kept w.p. 1/2
  (over users: each user gets its own draw)."""
  rows, n = 256, 10
  pos = jnp.where(jnp.arange(T) < n, jnp.arange(T), -1).astype(jnp.int32)
  pos = jnp.broadcast_to(pos, (1, rows, 1, T))
  k = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.float32)[None, :, None, None, None],
                       (1, rows, 1, T, 2))  # users differ only in their keys
  cache = Cache(k=k, v=jnp.ones((1, rows, 1, T, 2)), pos=pos,
                ts=jnp.maximum(pos, 0), length=jnp.full((rows,), n, jnp.int32), contiguous=False)
  comp = C.random(budget=5, seed=0)
  memory, _ = jax.jit(comp.compress)(cache, comp.init(cache), None)
  kept = np.asarray(memory.index.pos)[0, :, 0]  # [rows, 5]
  assert np.all(kept >= 0) and np.all(kept < n)
  counts = np.bincount(kept.ravel(), minlength=n)
  assert np.all(np.abs(counts - rows / 2) < 6 * np.sqrt(rows / 4)), counts  # 6 sigma


def test_random_draws_differ_between_users_and_not_with_batch_place():
  """Two users of one batch get different draws; a user's draw does not depend on its place
  in the batch or on the other users; the same seed reproduces it, another seed changes it."""
  users = 4
  rng = np.random.default_rng(3)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L, users, H, T))
  cache = Cache(k=jnp.asarray(rng.normal(size=(L, users, H, T, D)), jnp.float32),
                v=jnp.asarray(rng.normal(size=(L, users, H, T, D)), jnp.float32), pos=pos,
                ts=pos * 10, length=jnp.full((users,), T, jnp.int32))
  f = jax.jit(lambda c, seed: C.random(budget=3, seed=0).compress(
      c, C.RandomState(hash32(seed)), None)[0])
  kept = lambda c, seed=0: np.asarray(f(c, jnp.uint32(seed)).index.pos)
  base = kept(cache)  # [L, users, H, 3]
  for a in range(users):
    for b in range(a + 1, users):
      assert not np.array_equal(base[:, a], base[:, b]), (a, b)
  perm = np.roll(np.arange(users), 1)
  moved = jax.tree.map(lambda x: x[:, perm] if x.ndim >= 4 else x[perm], cache)
  np.testing.assert_array_equal(kept(moved)[:, np.argsort(perm)], base)
  np.testing.assert_array_equal(kept(cache), base)
  assert not np.array_equal(kept(cache, 12345), base)


@SETTINGS
@given(seed=SEEDS, sparse=st.booleans())
def test_merge_evicted_matches_reference(seed, sparse):
  heavy, recent = 3, 2
  cache, sig = make_cache(seed, sparse)
  memory, state = run("merge_evicted", cache, sig, heavy=heavy, recent=recent)
  pos, acc = np.asarray(cache.pos), np.asarray(sig.acc_attn)
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  mk, mv = np.asarray(memory.k), np.asarray(memory.v)
  check_memory(memory, cache, heavy + recent,
               lambda l, b, h: ref_h2o(pos[l, b, h], acc[l, b, h], heavy, recent),
               exact_kv=False)
  for l, b, h in np.ndindex(L, B, H):
    ref = ref_merge(pos[l, b, h], k[l, b, h], v[l, b, h], acc[l, b, h], heavy, recent)
    for j, p in enumerate(np.asarray(memory.index.pos)[l, b, h]):
      if p < 0:
        continue
      np.testing.assert_allclose(mk[l, b, h, j], ref[int(p)][0], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(mv[l, b, h, j], ref[int(p)][1], rtol=1e-5, atol=1e-6)
  # Mass is conserved: the state holds all the real events' attention.
  np.testing.assert_allclose(np.sum(state.acc, -1), np.sum(np.where(pos >= 0, acc, 0), -1),
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Fixed inputs: ties go to the smaller position.


def _one_row(acc_row, win_rows=None):
  """A 1 x 1 x 1 contiguous cache of 10 events with the given signals."""
  n = len(acc_row)
  pos = jnp.arange(n, dtype=jnp.int32)[None, None, None]
  k = jnp.arange(n * D, dtype=jnp.float32).reshape(1, 1, 1, n, D)
  win = jnp.zeros((1, 1, 1, W, n)) if win_rows is None else jnp.asarray(win_rows)[None, None, None]
  cache = Cache(k=k, v=-k, pos=pos, ts=pos * 10, length=jnp.array([n], jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(acc_row, jnp.float32)[None, None, None],
                window_attn=win.astype(jnp.float32), window_valid=jnp.ones((1, W), bool))
  return cache, sig


def test_h2o_ties_go_to_smaller_position():
  acc = [1, 3, 3, 0, 3, 2, 3, 1, 9, 9]
  cache, sig = _one_row(acc)
  comp = C.h2o(heavy=3, recent=2)
  memory, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
  # recent: 8, 9; heavy among 0..7 by (-acc, pos): 1, 2, 4 (acc 3; 6 loses the tie).
  np.testing.assert_array_equal(memory.index.pos[0, 0, 0], [1, 2, 4, 8, 9])
  assert ref_h2o(np.arange(10), np.array(acc), 3, 2) == {1, 2, 4, 8, 9}
  np.testing.assert_array_equal(memory.index.ts[0, 0, 0], [10, 20, 40, 80, 90])


def test_snapkv_fixed_votes_and_pooling():
  win = np.zeros((W, 10))
  win[-2:, 0] = 5.0  # votes for event 0 from the last two queries
  win[-2:, 6] = 5.0  # and event 6
  win[0, 3] = 100.0  # a query outside the 2-query window: ignored
  cache, sig = _one_row([0] * 10, win)
  for pool in ("avg", "max"):
    comp = C.snapkv(budget=4, window=2, kernel=3, pool=pool)
    memory, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
    want = ref_snapkv(np.arange(10), win, 4, 2, 3, pool)
    assert set(np.asarray(memory.index.pos[0, 0, 0]).tolist()) == want
  # avg pooling counts the padding: pooled(0) = (0 + 10 + 0) / 3, pooled(6) = 10 / 3; neighbours
  # 1, 5, 7 get 10 / 3 as well; ties -> {0, 1} win (window = 8, 9).
  assert ref_snapkv(np.arange(10), win, 4, 2, 3, "avg") == {0, 1, 8, 9}
  assert set(np.asarray(memory.index.pos[0, 0, 0]).tolist()) == {0, 1, 8, 9}


def test_snapkv_avg_pool_counts_padding():
  x = jnp.asarray([[3.0, 0.0, 0.0, 0.0, 6.0]])
  from malloc_jax.compressors.eviction import pool1d
  np.testing.assert_allclose(pool1d(x, 3, "avg"), [[1.0, 1.0, 0.0, 2.0, 2.0]])
  np.testing.assert_allclose(pool1d(x, 5, "max"), [[3.0, 3.0, 6.0, 6.0, 6.0]])


def test_h2o_accumulates_over_requests():
  heavy, recent, m = 3, 2, 4
  cache, sig = make_cache(11)
  comp, f = _jitted("h2o", (("heavy", heavy), ("recent", recent)))
  memory, state = f(cache, comp.init(cache), sig)
  rng = np.random.default_rng(0)
  dense = memory.materialize()
  new_pos = (np.asarray(cache.length)[:, None] + np.arange(m)[None]).astype(np.int32)
  dense2 = append(dense, jnp.asarray(rng.normal(size=(L, B, H, m, D)), jnp.float32),
                  jnp.asarray(rng.normal(size=(L, B, H, m, D)), jnp.float32),
                  jnp.asarray(new_pos), jnp.asarray(new_pos * 3))
  acc2 = jnp.asarray(rng.integers(0, 6, size=dense2.pos.shape), jnp.float32)
  sig2 = Signals(acc_attn=acc2, window_attn=jnp.zeros(dense2.pos.shape[:3] + (W, 9)),
                 window_valid=jnp.ones((B, W), bool))
  memory2, _ = f(dense2, state, sig2)
  total = np.asarray(acc2).copy()
  total[..., :heavy + recent] += np.asarray(state.acc)
  pos2 = np.asarray(dense2.pos)
  check_memory(memory2, dense2, heavy + recent,
               lambda l, b, h: ref_h2o(pos2[l, b, h], total[l, b, h], heavy, recent))


# ----------------------------------------------------------------------------------------
# Errors, jit and vmap.


def test_signal_errors():
  cache, sig = make_cache(0)
  for comp in (C.h2o(2, 2), C.snapkv(4, window=2), C.merge_evicted(2, 2)):
    with pytest.raises(ValueError, match="signals"):
      comp.compress(cache, comp.init(cache), None)
  comp = C.snapkv(8, window=6)
  with pytest.raises(ValueError, match="window=6"):
    comp.compress(cache, comp.init(cache), sig)  # signals have W = 4 rows


# Same parameters as the property tests above, so the single-cache runs reuse their compiles.
PRUNERS = [("h2o", dict(heavy=3, recent=2)),
           ("snapkv", dict(budget=7, window=2, kernel=5, pool="avg")),
           ("streaming", dict(sinks=3, recent=4)), ("random", dict(budget=5, seed=7)),
           ("merge_evicted", dict(heavy=3, recent=2))]


@pytest.mark.parametrize("name,params", PRUNERS, ids=[p[0] for p in PRUNERS])
def test_vmap_over_stacked_caches(name, params):
  caches, sigs = zip(*(make_cache(s, sparse=True) for s in (1, 2)), strict=True)
  stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  cache, sig = stack(*caches), stack(*sigs)
  comp = C.make_compressor(name, **params)
  memory, _ = jax.jit(jax.vmap(comp.compress))(cache, jax.vmap(comp.init)(cache), sig)
  for i in range(2):
    one, _ = run(name, caches[i], sigs[i], **params)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[i], memory)),
                    strict=True):
      np.testing.assert_array_equal(a, b)


def test_short_cache_is_padded_to_budget():
  cache, sig = make_cache(5, capacity=6)
  memory, _ = run("h2o", cache, sig, heavy=8, recent=2)
  assert memory.k.shape[3] == 10
  pos = np.asarray(cache.pos)
  for l, b, h in np.ndindex(L, B, H):
    got = np.asarray(memory.index.pos)[l, b, h]
    np.testing.assert_array_equal(got[:6], pos[l, b, h])
    assert np.all(got[6:] == -1)


# ----------------------------------------------------------------------------------------
# A real tiny model: a budget >= the history reproduces the native scores.


@pytest.fixture(scope="module")
def tiny_model():
  from malloc_jax import models
  from malloc_jax.models import Events, make_model
  m = make_model("hstu", 50, dim=16, heads=2, max_len=32, dropout=0.0)
  rng = np.random.default_rng(0)
  N = 12
  lengths = np.array([12, 7, 2])
  items = np.zeros((3, N), np.int32)
  ts = np.zeros((3, N), np.int32)
  for b, n in enumerate(lengths):
    items[b, :n] = rng.integers(1, 51, n)
    ts[b, :n] = np.sort(rng.integers(0, 10**5, n))
  events = Events(items=jnp.asarray(items), ts=jnp.asarray(ts), length=jnp.asarray(lengths))
  queries = Events(items=jnp.asarray([[3, 9], [4, 0], [5, 0]], jnp.int32),
                   ts=jnp.full((3, 2), 2 * 10**5, jnp.int32),
                   length=jnp.asarray([2, 1, 1], jnp.int32))
  cache, sig = jax.jit(models.prefill, static_argnums=2)(m, events, 4)
  score = jax.jit(models.score)
  return m, cache, sig, queries, score


FULL = [("h2o", dict(heavy=8, recent=4)), ("snapkv", dict(budget=12, window=4, kernel=7, pool="max")),
        ("streaming", dict(sinks=4, recent=8)), ("random", dict(budget=12, seed=7))]
SMALL = [("h2o", dict(heavy=3, recent=2)),
         ("snapkv", dict(budget=7, window=2, kernel=5, pool="avg")),
         ("merge_evicted", dict(heavy=3, recent=2))]


def test_full_budget_reproduces_native_scores(tiny_model):
  """budget = history capacity: the memory holds the very same slots, so scores are identical."""
  m, cache, sig, queries, score = tiny_model
  want = np.asarray(score(m, cache, queries))
  for name, params in FULL:
    # Eviction ignores the flag; clearing it lets the property tests' compiles be reused.
    memory, _ = run(name, cache.replace(contiguous=False), sig, **params)
    np.testing.assert_array_equal(memory.index.pos, cache.pos)
    got = np.asarray(score(m, memory.materialize(), queries))
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_small_budget_scores_under_jit(tiny_model):
  m, cache, sig, queries, score = tiny_model
  for name, params in SMALL:
    memory, _ = run(name, cache.replace(contiguous=False), sig, **params)
    out = np.asarray(score(m, memory.materialize(), queries))
    assert out.shape == (3, 51) and np.all(np.isfinite(out[:, 1:]))
