"""Composition (chain), the registry and byte budgets of the post-hoc compressors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax import models
from malloc_jax.cache import Cache, Signals

L, B, H, T, D, W = 2, 3, 2, 12, 8, 4


def make_cache(seed: int, contiguous: bool = True):
  """A random cache with uneven per-user lengths and garbage in the padding slots."""
  rng = np.random.default_rng(seed)
  n = rng.integers(1, T + 1, size=B)
  n[0] = T
  pos = np.where(np.arange(T)[None] < n[:, None], np.arange(T)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (L, B, H, T))
  valid = pos >= 0
  k = np.where(valid[..., None], rng.normal(size=(L, B, H, T, D)), 9.0)
  v = np.where(valid[..., None], rng.normal(size=(L, B, H, T, D)), 9.0)
  acc = np.where(valid, rng.integers(0, 5, size=valid.shape), 100.0)
  win = np.where(valid[:, :, :, None], rng.integers(0, 3, size=(L, B, H, W, T)), 100.0)
  cache = Cache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(np.where(valid, pos * 3, 0),
                                                                jnp.int32),
                length=jnp.asarray(n, jnp.int32), contiguous=contiguous)
  sig = Signals(acc_attn=jnp.asarray(acc, jnp.float32), window_attn=jnp.asarray(win, jnp.float32),
                window_valid=jnp.ones((B, W), bool))
  return cache, sig


def compress_fn(comp):
  def f(cache, sig):
    memory, state = comp.compress(cache, comp.init(cache), sig)
    return memory, memory.materialize()
  return f


# ----------------------------------------------------------------------------------------
# chain.


def test_chain_snapkv_kivi_is_kivi_of_the_pruned_cache():
  cache, sig = make_cache(0)
  prune, quant = C.snapkv(budget=7, window=3), C.kivi(bits=2, group=2, residual=4)
  comp = C.chain(prune, quant)
  memory, dense = jax.jit(compress_fn(comp))(cache, sig)
  assert isinstance(memory, C.KiviMemory) and isinstance(memory.index, C.SparseIndex)

  @jax.jit
  def by_hand(cache, sig):
    pruned, _ = prune.compress(cache, prune.init(cache), sig)
    return pruned, compress_fn(quant)(pruned.materialize(), None)

  pruned, (direct, direct_dense) = by_hand(cache, sig)
  for a, b in zip(jax.tree.leaves((memory, dense)), jax.tree.leaves((direct, direct_dense)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # The pruned positions survive quantization; bytes are the last step's stored leaves.
  np.testing.assert_array_equal(dense.pos, pruned.index.pos)
  np.testing.assert_array_equal(dense.ts, pruned.index.ts)
  budget, R = 7, 4
  Tp = 8  # 7 slots rounded up to the key group of 2
  per_row = (Tp * 2 + 2 * (Tp // 2) * D * 4 + R * D * 4 + budget * 2 +
             2 * budget * (D // 2) * 4 + R * D * 4)
  index = 2 * L * B * H * budget * 4 + B * 4  # SparseIndex pos, ts [L, B, H, budget] + length
  assert C.nbytes(memory) == L * B * H * per_row + index


@pytest.mark.parametrize("steps", [
    (C.h2o(heavy=3, recent=2), C.uniform(bits=4)),
    (C.streaming(sinks=1, recent=4), C.intactkv(bits=4, pivots=2, sinks=2)),
    (C.merge_evicted(heavy=2, recent=3), C.kivi(bits=4, group=1, residual=2)),
], ids=["h2o+uniform", "streaming+intactkv", "merge+kivi"])
def test_chain_under_jit_and_vmap(steps):
  comp = C.chain(*steps)
  pairs = [make_cache(s, contiguous=False) for s in (1, 2)]
  stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  cache, sig = stack(*(p[0] for p in pairs)), stack(*(p[1] for p in pairs))
  memory, dense = jax.jit(jax.vmap(compress_fn(comp)))(cache, sig)
  assert dense.k.shape == (2, L, B, H, 5, D)
  single = jax.jit(compress_fn(comp))
  for i, (c, s) in enumerate(pairs):
    want = single(c, s)
    got = jax.tree.map(lambda x: np.asarray(x)[i], (memory, dense))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_chain_step_needing_signals_after_eviction_fails_clearly():
  cache, sig = make_cache(3)
  comp = C.chain(C.snapkv(budget=6, window=2), C.intactkv(bits=4, pivots=3, sinks=1))
  with pytest.raises(ValueError, match="intactkv needs attention signals"):
    comp.compress(cache, comp.init(cache), sig)


# ----------------------------------------------------------------------------------------
# A real tiny model.


@pytest.fixture(scope="module")
def tiny_model():
  m = models.make_model("hstu", 50, dim=16, heads=2, max_len=32, dropout=0.0)
  rng = np.random.default_rng(1)
  N, lengths = 12, np.array([12, 9, 4])
  items = np.zeros((3, N), np.int32)
  ts = np.zeros((3, N), np.int32)
  for b, n in enumerate(lengths):
    items[b, :n] = rng.integers(1, 51, n)
    ts[b, :n] = np.sort(rng.integers(0, 10**5, n))
  events = models.Events(items=jnp.asarray(items), ts=jnp.asarray(ts),
                         length=jnp.asarray(lengths))
  queries = models.Events(items=jnp.asarray([[7, 2], [8, 0], [9, 0]], jnp.int32),
                          ts=jnp.full((3, 2), 2 * 10**5, jnp.int32),
                          length=jnp.asarray([2, 1, 1], jnp.int32))
  cache, sig = jax.jit(models.prefill, static_argnums=2)(m, events, 4)
  return m, cache, sig, queries, jax.jit(models.score)


def test_lossless_chain_reproduces_native_scores(tiny_model):
  """Streaming with budget = history and KIVI with R > history keep everything exact."""
  m, cache, sig, queries, score = tiny_model
  comp = C.chain(C.streaming(sinks=4, recent=8), C.kivi(bits=2, group=4, residual=16))
  memory, dense = jax.jit(compress_fn(comp))(cache, sig)
  valid = np.asarray(cache.pos >= 0)
  np.testing.assert_array_equal(np.asarray(dense.k)[valid], np.asarray(cache.k)[valid])
  np.testing.assert_array_equal(np.asarray(dense.v)[valid], np.asarray(cache.v)[valid])
  np.testing.assert_array_equal(score(m, dense, queries), score(m, cache, queries))


def test_compressed_chain_scores_under_jit(tiny_model):
  m, cache, sig, queries, score = tiny_model
  comp = C.chain(C.snapkv(budget=6, window=4), C.kivi(bits=2, group=2, residual=4))
  run = jax.jit(lambda model, c, s, q: score(model, compress_fn(comp)(c, s)[1], q))
  out = np.asarray(run(m, cache, sig, queries))
  assert out.shape == (3, 51) and np.all(np.isfinite(out[:, 1:]))
  native = np.asarray(score(m, cache, queries))
  assert np.corrcoef(out[:, 1:].ravel(), native[:, 1:].ravel())[0, 1] > 0.5


# ----------------------------------------------------------------------------------------
# Registry.


def test_registry_builds_every_method():
  cache, sig = make_cache(4)
  bases = C.fit_lowrank([cache], rank=3)
  params = {"native": {}, "lowrank": dict(bases=bases), "h2o": dict(heavy=2, recent=2),
            "snapkv": dict(budget=5, window=2), "streaming": dict(sinks=1, recent=3),
            "random": dict(budget=4, seed=1), "merge_evicted": dict(heavy=2, recent=2),
            "kivi": dict(bits=4, group=4, residual=4), "intactkv": dict(bits=8, pivots=2),
            "uniform": dict(bits=8)}
  assert set(params) == set(C.FACTORIES)
  for name, p in params.items():
    comp = C.make_compressor(name, **p)
    assert isinstance(comp, C.Compressor)
    # Abstract evaluation: every method's memory materializes into a full-shape Cache.
    out = jax.eval_shape(lambda c, s, comp=comp: compress_fn(comp)(c, s)[1], cache, sig)
    assert out.k.shape[:3] == (L, B, H) and out.k.shape[-1] == D


@pytest.mark.parametrize("name,params,match", [
    ("h2o", dict(heavy=-1, recent=2), "heavy"),
    ("h2o", dict(heavy=0, recent=0), "heavy \\+ recent"),
    ("snapkv", dict(budget=-4), "budget"),
    ("snapkv", dict(budget=4, window=8), "window"),
    ("snapkv", dict(budget=8, kernel=4), "kernel"),
    ("snapkv", dict(budget=8, pool="min"), "pool"),
    ("streaming", dict(sinks=-1, recent=3), "sinks"),
    ("random", dict(budget=0), "budget"),
    ("random", dict(budget=2.5), "budget"),
    ("merge_evicted", dict(heavy=1, recent=-2), "recent"),
    ("kivi", dict(bits=3), "bits"),
    ("kivi", dict(bits=2, group=32, residual=48), "residual"),
    ("kivi", dict(bits=2, key_residual="window"), "key_residual"),
    ("intactkv", dict(bits=16), "bits"),
    ("intactkv", dict(pivots=2, sinks=3), "sinks"),
    ("uniform", dict(bits=2), "bits"),
    ("lowrank", {}, "bases"),
    ("h2o", dict(heavy=1, recent=1, budget=3), "unknown parameter.*budget"),
    ("streaming", dict(sinks=2), "missing parameter.*recent"),
])
def test_registry_validates_parameters(name, params, match):
  with pytest.raises(ValueError, match=match):
    C.make_compressor(name, **params)


def test_registry_unknown_method_lists_valid_ones():
  with pytest.raises(ValueError, match="'pyramidkv' is unknown.*h2o.*snapkv"):
    C.make_compressor("pyramidkv", budget=4)


def test_kivi_group_must_divide_value_dim():
  cache, _ = make_cache(0)
  comp = C.kivi(bits=2, group=3, residual=3)
  with pytest.raises(ValueError, match="group=3"):
    comp.compress(cache, comp.init(cache), None)


# ----------------------------------------------------------------------------------------
# Byte budgets.

SPEC = C.cache_spec(num_layers=2, heads=2, capacity=64, dk=16)
NATIVE = 2 * 2 * 64 * 16 * 4 * 2 + 64 * 4 + 4  # k, v float32 + DenseIndex ts [1, T] + length


def test_memory_bytes_are_the_built_memory_bytes():
  """memory_bytes (abstract, full user) equals stored_bytes of a real memory of a full user
  (user 0 holds T events), state included; figure="buffer" equals its buffer_bytes."""
  assert C.memory_bytes("native", SPEC) == NATIVE
  assert C.memory_bytes("native", SPEC, figure="buffer") == NATIVE
  cache, sig = make_cache(5)
  assert int(cache.length[0]) == T
  for name, p in [("snapkv", dict(budget=5, window=2)), ("kivi", dict(bits=2, group=4,
                                                                     residual=4)),
                  ("intactkv", dict(bits=4, pivots=2)), ("uniform", dict(bits=4)),
                  ("h2o", dict(heavy=3, recent=3)), ("merge_evicted", dict(heavy=2, recent=2)),
                  ("random", dict(budget=4)), ("native", {})]:
    comp = C.make_compressor(name, **p)
    memory, state = jax.jit(comp.compress)(cache, comp.init(cache), sig)
    assert C.memory_bytes(name, cache, **p) == C.stored_bytes(memory, state)[0], name
    assert C.memory_bytes(name, cache, figure="buffer", **p) == C.buffer_bytes(memory, state)[0]
  bases = C.fit_lowrank([cache], rank=3)
  memory, _ = C.lowrank(bases).compress(cache, None, None)
  assert C.memory_bytes("lowrank", cache, rank=3) == C.stored_bytes(memory)[0]
  assert C.memory_bytes("lowrank", cache, figure="buffer", rank=3) == C.bytes_per_user(memory)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming", "random", "merge_evicted",
                                    "kivi", "intactkv", "uniform", "lowrank"])
def test_budget_bytes_picks_the_largest_fitting_setting(method):
  target = NATIVE / 2
  fixed = dict(group=16, residual=16) if method == "kivi" else {}
  params = C.budget_bytes(method, SPEC, target, **fixed)
  got = C.memory_bytes(method, SPEC, **params)
  assert got <= target
  # One step larger would not fit.
  bigger = dict(params)
  if "budget" in params:
    bigger["budget"] += 1
  elif "heavy" in params:
    bigger["heavy"] += 1
  elif "recent" in params:
    bigger["recent"] += 1
  elif "rank" in params:
    bigger["rank"] += 1
  else:
    bigger["bits"] = {2: 4, 4: 8, 8: 16}[params["bits"]]
  if bigger.get("bits") != 16 and bigger.get("rank", 0) <= 16:
    try:
      assert C.memory_bytes(method, SPEC, **bigger) > target
    except ValueError:
      pass  # the next setting does not exist (e.g. kivi has no 8-bit)


def test_budget_bytes_closed_form_for_eviction():
  # b kept events per head: (k + v) float32 + pos, ts int32 per slot and head, + length.
  per_slot = 2 * 2 * (2 * 16 * 4 + 2 * 4)
  params = C.budget_bytes("snapkv", SPEC, 20 * per_slot + 4)
  assert params == {"budget": 20, "window": 8}
  assert C.budget_bytes("h2o", SPEC, 20 * per_slot + 3) == {"heavy": 10, "recent": 9}
  with pytest.raises(ValueError, match="needs at least"):
    C.budget_bytes("random", SPEC, per_slot)


def test_ratio_table():
  table = C.ratio_table("snapkv", SPEC)
  assert set(table) == {2, 4, 8}
  sizes = [C.memory_bytes("snapkv", SPEC, **table[r]) for r in (2, 4, 8)]
  assert all(s <= NATIVE / r for s, r in zip(sizes, (2, 4, 8), strict=True))
  assert sizes[0] > sizes[1] > sizes[2]
  assert C.params_for_ratio("uniform", SPEC, 2) == {"bits": 8}
  # KIVI stored bytes of a full user (4 rows of T = 64 events, D = 16, G = R = 16): all 64
  # keys quantized (64 mod 16 = 0): codes 64 * 16 * b / 8, scale + min for 4 groups x 16
  # channels; 48 values quantized: codes 48 * 16 * b / 8, scale + min per event (one group
  # of 16 channels); the 16 newest values exact; index: 64 time stamps + length.
  kivi_bytes = lambda bits: 4 * (64 * 16 * bits // 8 + 2 * 4 * 16 * 4 + 48 * 16 * bits // 8
                                 + 2 * 48 * 4 + 16 * 16 * 4) + 64 * 4 + 4
  for bits in (2, 4):
    assert C.memory_bytes("kivi", SPEC, bits=bits, group=16, residual=16) == kivi_bytes(bits)
  assert NATIVE / 4 < kivi_bytes(2) < kivi_bytes(4) <= NATIVE / 2
  kivi = C.ratio_table("kivi", SPEC, group=16, residual=16)
  assert kivi == {2: {"group": 16, "residual": 16, "bits": 4}, 4: None, 8: None}
  # Ratios beyond 8 are accepted; those no setting reaches are None ("out of reach").
  ratios = (2, 4, 8, 16, 32, 64, 128)
  table = C.ratio_table("snapkv", SPEC, ratios)
  assert list(table) == list(ratios)
  for r in ratios:
    if table[r] is not None:
      assert C.memory_bytes("snapkv", SPEC, **table[r]) <= NATIVE / r
  # snapkv's smallest setting (1 kept event per head + index) is 4 * (2*16*4 + 8) + 4 = 548
  # bytes: reachable at 32x (33028 / 32 = 1032), out of reach at 64x (516).
  assert table[32] == {"budget": 1, "window": 1} and table[64] is None and table[128] is None


def test_budget_is_abstract_for_large_caches():
  big = C.cache_spec(num_layers=4, heads=4, capacity=4096, dk=64, batch=1)
  params = C.budget_bytes("snapkv", big, 1 << 20)
  assert C.memory_bytes("snapkv", big, **params) <= 1 << 20
