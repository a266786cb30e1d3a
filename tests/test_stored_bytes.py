"""stored_bytes / buffer_bytes of every memory against closed forms written here in plain
Python (from the users' lengths and the methods' parameters only), the KIVI paper's
accounting, and KIVI against native for every history length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.cache import Cache, Signals

L, H, T, DK, DV, W = 2, 2, 20, 8, 4, 4
G, R = 4, 8  # KIVI group and residual
# n = 0, 1, n < group, n = group, n = residual, n = capacity, and others.
LENGTHS = np.array([0, 1, 3, 4, 8, 20, 13, 17, 9, 16])
B = len(LENGTHS)


def make_cache(lengths, dtype=jnp.float32, seed=0, dk=DK, dv=DV, capacity=T):
  """A contiguous cache (user b holds events 0..n_b-1) with garbage in the empty slots."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  nb = len(lengths)
  pos = np.where(np.arange(capacity)[None] < lengths[:, None], np.arange(capacity)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (L, nb, H, capacity))
  valid = pos >= 0
  k = np.where(valid[..., None], rng.normal(size=(L, nb, H, capacity, dk)), 5.0)
  v = np.where(valid[..., None], rng.normal(size=(L, nb, H, capacity, dv)), -5.0)
  acc = np.where(valid, rng.random(valid.shape), 0.0)
  win = np.where(valid[:, :, :, None], rng.random((L, nb, H, W, capacity)), 0.0)
  cache = Cache(k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype), pos=jnp.asarray(pos, jnp.int32),
                ts=jnp.asarray(np.where(valid, 7 * pos + 1, 0), jnp.int32),
                length=jnp.asarray(lengths, jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(acc, jnp.float32), window_attn=jnp.asarray(win, jnp.float32),
                window_valid=jnp.ones((nb, W), bool))
  return cache, sig


@functools.cache
def _compress(comp):
  return jax.jit(lambda cache, sig: comp.compress(cache, comp.init(cache), sig))


def ceil8(bits_count):
  return -(-bits_count // 8)


# ----------------------------------------------------------------------------------------
# Closed forms (plain Python, per user of n events; every (layer, head) row of a user holds
# the same number of events in these caches).

ROWS = L * H
TS, LEN, POS = 4, 4, 4  # int32 time stamp, length, position


def dense_index(n):
  return n * TS + LEN


def sparse_index(m):
  return ROWS * m * (POS + TS) + LEN


def cf_native(n, s):
  return ROWS * n * (DK + DV) * s + dense_index(n)


def cf_kept(m, s, state=0):
  """Eviction / merging: m kept events per row, a sparse index, ``state`` bytes per event."""
  return ROWS * m * (DK + DV) * s + sparse_index(m) + ROWS * m * state


def cf_kivi(n, s, bits, index, rule="block"):
  tail = min(n, R)
  q_k = n - (n % R if rule == "block" else tail)
  q_v = n - tail
  gv = min(G, DV)
  return (ceil8(bits * DK * ROWS * q_k) + 2 * s * DK * ROWS * -(-q_k // G)
          + s * DK * ROWS * (n - q_k)
          + ceil8(bits * DV * ROWS * q_v) + 2 * s * (DV // gv) * ROWS * q_v
          + s * DV * ROWS * (n - q_v) + index)


def cf_intactkv(n, s, bits, pivots, group, index):
  p = min(pivots, n)
  q = ROWS * (n - p)
  gk, gv = (group or DK), (group or DV)
  return (ceil8(bits * DK * q) + 2 * s * (DK // gk) * q + ceil8(bits * DV * q)
          + 2 * s * (DV // gv) * q + ROWS * p * ((DK + DV) * s + 4) + index)


def cf_uniform(n, s, bits, index):
  N = ROWS * n
  return ceil8(bits * DK * N) + ceil8(bits * DV * N) + 2 * s * N + index


def cf_lowrank(n, s, r):
  return ROWS * n * 2 * r * s + dense_index(n)


CASES = [
    ("native", C.native(), lambda n, s: cf_native(n, s)),
    ("h2o", C.h2o(heavy=3, recent=2), lambda n, s: cf_kept(min(5, n), s, state=4)),
    ("h2o_no_acc", C.h2o(heavy=3, recent=2, accumulate=False),
     lambda n, s: cf_kept(min(5, n), s, state=4)),
    ("merge_evicted", C.merge_evicted(heavy=4, recent=3),
     lambda n, s: cf_kept(min(7, n), s, state=4)),
    ("snapkv", C.snapkv(budget=6, window=2), lambda n, s: cf_kept(min(6, n), s)),
    ("streaming", C.streaming(sinks=2, recent=9), lambda n, s: cf_kept(min(11, n), s)),
    ("random", C.random(budget=T, seed=3), lambda n, s: cf_kept(min(T, n), s)),
    ("kivi2", C.kivi(bits=2, group=G, residual=R),
     lambda n, s: cf_kivi(n, s, 2, dense_index(n))),
    ("kivi4_sliding", C.kivi(bits=4, group=G, residual=R, key_residual="sliding"),
     lambda n, s: cf_kivi(n, s, 4, dense_index(n), "sliding")),
    ("intactkv4", C.intactkv(bits=4, pivots=3, sinks=1),
     lambda n, s: cf_intactkv(n, s, 4, 3, None, dense_index(n))),
    ("intactkv2_g2", C.intactkv(bits=2, pivots=2, sinks=2, group=2),
     lambda n, s: cf_intactkv(n, s, 2, 2, 2, dense_index(n))),
    ("uniform8", C.uniform(bits=8), lambda n, s: cf_uniform(n, s, 8, dense_index(n))),
    ("uniform4", C.uniform(bits=4), lambda n, s: cf_uniform(n, s, 4, dense_index(n))),
    # Chains: eviction first, then an encoding step on the kept events (a sparse index).
    ("snapkv+kivi2", C.chain(C.snapkv(budget=12, window=2), C.kivi(bits=2, group=G, residual=R)),
     lambda n, s: cf_kivi(min(12, n), s, 2, sparse_index(min(12, n)))),
    ("h2o+uniform4", C.chain(C.h2o(heavy=5, recent=4), C.uniform(bits=4)),
     lambda n, s: cf_uniform(min(9, n), s, 4, sparse_index(min(9, n))) + ROWS * min(9, n) * 4),
    ("streaming+intactkv8", C.chain(C.streaming(sinks=1, recent=9),
                                    C.intactkv(bits=8, pivots=1, sinks=1)),
     lambda n, s: cf_intactkv(min(10, n), s, 8, 1, None, sparse_index(min(10, n)))),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,comp,closed", CASES, ids=[c[0] for c in CASES])
def test_stored_bytes_equal_closed_form(name, comp, closed, dtype):
  s = jnp.dtype(dtype).itemsize
  for seed, lengths in enumerate([LENGTHS, np.random.default_rng(1).integers(0, T + 1, B)]):
    cache, sig = make_cache(lengths, dtype, seed)
    memory, state = _compress(comp)(cache, sig)
    got = C.stored_bytes(memory, state)
    want = np.array([closed(int(n), s) for n in lengths])
    np.testing.assert_array_equal(got, want, err_msg=f"{name} lengths {lengths}")
    # The abstract state (what result rows use) counts the same bytes.
    np.testing.assert_array_equal(C.stored_bytes(memory, C.state_shape(comp, memory)), want)
    # Buffer: every per-user leaf, empty slots included, the same for every user.
    per_user = sum(x.nbytes for x in jax.tree.leaves(memory)) / len(lengths)
    acc = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim == 4) / len(lengths)
    np.testing.assert_array_equal(C.buffer_bytes(memory, state), per_user + acc)
    np.testing.assert_array_equal(C.user_bytes(memory, comp),
                                  [want, np.full(len(lengths), per_user + acc)])


def test_lowrank_stored_bytes_equal_closed_form():
  cache, _ = make_cache(LENGTHS)
  bases = C.fit_lowrank([cache], rank=3)
  memory, _ = C.lowrank(bases).compress(cache, None, None)
  np.testing.assert_array_equal(C.stored_bytes(memory), [cf_lowrank(n, 4, 3) for n in LENGTHS])
  memory, _ = C.lowrank(bases, dtype=jnp.bfloat16).compress(cache, None, None)
  np.testing.assert_array_equal(C.stored_bytes(memory),
                                [ROWS * n * 2 * 3 * 2 + dense_index(n) for n in LENGTHS])


def test_streaming_state_is_counted():
  """H2O / merge_evicted carry acc [L, B, H, budget] to the next request: one float32 per
  kept event is in stored_bytes with the state, not without it."""
  cache, sig = make_cache(LENGTHS)
  for comp in (C.h2o(heavy=3, recent=2), C.merge_evicted(heavy=3, recent=2)):
    memory, state = _compress(comp)(cache, sig)
    with_state, without = C.stored_bytes(memory, state), C.stored_bytes(memory)
    kept = np.minimum(LENGTHS, 5)
    np.testing.assert_array_equal(with_state - without, ROWS * kept * 4)
    np.testing.assert_array_equal(
        C.buffer_bytes(memory, state) - C.buffer_bytes(memory), ROWS * 5 * 4)


def test_longformer_style_slots_before_the_events_are_counted():
  """A native memory whose rows keep per-user slots with pos = -1 before their events (as
  Longformer's global tokens) counts them: a row stores up to its last occupied slot."""
  pos = np.full((L, 2, H, 6), -1, np.int32)
  pos[:, 0, :, 2:5] = [0, 1, 2]  # 2 global slots then 3 events
  cache = Cache(k=jnp.ones((L, 2, H, 6, DK)), v=jnp.ones((L, 2, H, 6, DV)), pos=jnp.asarray(pos),
                ts=jnp.zeros((L, 2, H, 6), jnp.int32), length=jnp.asarray([3, 0], jnp.int32),
                contiguous=False)
  memory, _ = C.native().compress(cache, None, None)
  np.testing.assert_array_equal(C.stored_bytes(memory), [cf_kept(5, 4), cf_kept(0, 4)])


def test_unknown_memory_type_is_an_error():
  class Odd:
    pass
  with pytest.raises(TypeError, match="no stored_bytes"):
    C.stored_bytes(Odd())


# ----------------------------------------------------------------------------------------
# KIVI: the paper's accounting, and never larger than native.


def paper_kivi_full_user(layers, heads, t, d, group, residual, bits, s=4):
  """The KIVI paper's layout for a full user of t events (t a multiple of the residual R):
  every key quantized in groups of G slots per channel (scale + min per group and channel),
  values quantized per event in groups of G channels except the R newest kept exact; codes
  bits/8 bytes each; plus t int32 time stamps and the length."""
  assert t % residual == 0
  keys = t * d * bits / 8 + (t // group) * d * 2 * s
  values = (t - residual) * (d * bits / 8 + (d // min(group, d)) * 2 * s) + residual * d * s
  return layers * heads * (keys + values) + 4 * t + 4


@pytest.mark.parametrize("layers,heads,d", [(2, 2, 25), (2, 1, 50)], ids=["issue", "ml100k"])
def test_kivi_full_user_matches_the_paper_accounting(layers, heads, d):
  spec = C.cache_spec(layers, heads, 200, d)
  got = C.memory_bytes("kivi", spec, bits=2, group=25, residual=25)
  paper = paper_kivi_full_user(layers, heads, 200, d, 25, 25, 2)
  print(f"kivi-2 full user {layers}x{heads}x{d}: stored {got:,.0f} B, paper {paper:,.0f} B, "
        f"buffer {C.memory_bytes('kivi', spec, 'buffer', bits=2, group=25, residual=25):,.0f}"
        f" B, native {C.memory_bytes('native', spec):,.0f} B")
  assert abs(got - paper) <= 0.01 * paper
  assert got == paper == 32_179  # 5,000 + 6,400 + 4,375 + 5,600 + 10,000 + 804


@pytest.mark.parametrize("bits,group,residual,d,heads,dtype", [
    (2, 25, 25, 25, 2, jnp.float32), (2, 25, 25, 50, 1, jnp.float32),
    (4, 25, 25, 50, 1, jnp.float32), (2, 4, 8, 8, 2, jnp.bfloat16),
    (4, 4, 8, 8, 2, jnp.bfloat16), (2, 8, 16, 16, 1, jnp.float32)])
def test_kivi_never_larger_than_native(bits, group, residual, d, heads, dtype):
  """For every n = 0..T: KIVI <= native; strictly below exactly when a key group is
  quantized (n >= R with KIVI's block rule); equal below that (every event is then kept
  exactly, so nothing smaller is possible). Holds for groups of G >= 3 (a group of G events
  saves G * (s - bits/8) - 2s bytes per channel)."""
  t = 60 if d <= 16 else 200
  lengths = np.arange(t + 1)
  rng = np.random.default_rng(0)
  pos = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (2, len(lengths), heads, t))
  cache = Cache(k=jnp.asarray(rng.normal(size=pos.shape + (d,)), dtype),
                v=jnp.asarray(rng.normal(size=pos.shape + (d,)), dtype),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(np.maximum(pos, 0), jnp.int32),
                length=jnp.asarray(lengths, jnp.int32))
  kivi = C.kivi(bits=bits, group=group, residual=residual)
  memory, _ = jax.jit(kivi.compress)(cache, kivi.init(cache), None)
  native, _ = C.native().compress(cache, None, None)
  k, n = C.stored_bytes(memory), C.stored_bytes(native)
  assert np.all(k <= n)
  np.testing.assert_array_equal(k < n, lengths >= residual)
