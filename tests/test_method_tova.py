"""TOVA (Oren et al. 2024) against a float64 NumPy version of its eviction rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from malloc_jax import compressors as C
from tests.test_compressors_eviction import (
  SEEDS,
  SETTINGS,
  B,
  H,
  L,
  T,
  check_memory,
  make_cache,
  nbytes_closed_form,
  run,
)


def stack_users(trees):
  """Stacks pytrees on a new leading axis (jax.vmap over users of stacked batches)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def check_vmap(name, params, caches, sigs):
  """vmap(jit(compress)) over stacked batches equals jit(compress) of each batch alone."""
  comp = C.make_compressor(name, **params)
  f = jax.jit(jax.vmap(lambda c, s: comp.compress(c, comp.init(c), s)[0]))
  batched = f(stack_users(caches), None if sigs is None else stack_users(sigs))
  one = jax.jit(lambda c, s: comp.compress(c, comp.init(c), s)[0])  # one batch, compiled once
  for i, (c, s) in enumerate(zip(caches, sigs or [None] * len(caches), strict=True)):
    alone = one(c, s)
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(np.asarray(a)[i], b),
                 batched, alone)


def ref_tova(pos, win, budget):
  """Kept positions of one layer and user: evict the lowest head-mean newest-query attention
  one event at a time (float64), ties evicting the larger position first."""
  slot = {int(p): i for i, p in enumerate(pos[0]) if p >= 0}
  score = {p: float(np.mean(np.float64(win[:, -1, i]))) for p, i in slot.items()}
  kept = set(slot)
  while len(kept) > budget:
    kept.remove(min(kept, key=lambda p: (score[p], -p)))
  return kept


@pytest.mark.parametrize("budget", [1, 5, 12])
@SETTINGS
@given(seed=SEEDS)
def test_tova_matches_reference(budget, seed):
  cache, sig = make_cache(seed, sparse=False)
  memory, _ = run("tova", cache, sig, budget=budget)
  pos, win = np.asarray(cache.pos), np.asarray(sig.window_attn)
  check_memory(memory, cache, budget, lambda l, b, h: ref_tova(pos[l, b], win[l, b], budget))
  kept = np.asarray(memory.index.pos)
  assert np.all(kept == kept[:, :, :1]), "every head of a layer keeps the same events"
  assert C.nbytes(memory) == nbytes_closed_form(budget)


def test_tova_fixed_scores_and_streaming_step():
  # One layer, user; two heads; 6 events. Newest-query rows per head (head mean in comments).
  cache, sig = make_cache(0, sparse=False)
  win = np.zeros((L, B, H, 4, T), np.float32)
  row = np.array([[4, 0, 2, 2, 9, 1], [0, 0, 2, 4, 1, 1]], np.float32)  # means 2,0,2,3,5,1
  win[:, :, :, -1, :6] = row[None, None]
  pos = np.where(np.arange(T) < 6, np.arange(T), -1)
  cache = cache.replace(pos=jnp.broadcast_to(jnp.asarray(pos, jnp.int32), cache.pos.shape))
  sig = sig.replace(window_attn=jnp.asarray(win))
  memory, _ = run("tova", cache, sig, budget=3)
  # 5 (pos 4), 3 (pos 3), then the tie at 2 goes to position 0 over 2.
  np.testing.assert_array_equal(np.asarray(memory.index.pos)[0, 0, 0], [0, 3, 4])


def test_tova_vmap_validation_and_spec():
  caches, sigs = zip(*(make_cache(s, sparse=False) for s in (1, 2)), strict=True)
  check_vmap("tova", {"budget": 4}, list(caches), list(sigs))
  with pytest.raises(ValueError, match="budget"):
    C.tova(budget=0)
  with pytest.raises(ValueError, match="signals"):
    run("tova", caches[0], None, budget=4)
  spec = C.get_spec("tova")
  assert spec.needs_signals and spec.tuned == "budget" and spec.granularity == "token"
  shape = C.cache_spec(L, H, 256, 16)
  table = C.ratio_table("tova", shape, ratios=(2, 4, 8, 16, 32))
  native = C.memory_bytes("native", shape)
  for r, params in table.items():
    assert params is not None and C.memory_bytes("tova", shape, **params) <= native / r
