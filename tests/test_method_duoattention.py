"""DuoAttention-style head split (Xiao et al. 2024), post-hoc: head scores from calibration
signals and the kept events per head, against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.cache import Cache, Signals
from malloc_jax.compressors.head_split import retrieval_scores, split_heads
from tests.test_compressors_eviction import B, D, H, L, T, W, make_cache, ref_streaming
from tests.test_method_tova import check_vmap


def ref_scores(items, sinks, recent):
  total, count = np.zeros((L, H)), 0
  for cache, sig in items:
    pos, n = np.asarray(cache.pos), np.asarray(cache.length)
    win, wv = np.float64(np.asarray(sig.window_attn)), np.asarray(sig.window_valid)
    for b in range(B):
      if n[b] <= sinks + recent:
        continue
      for w in range(W):
        if not wv[b, w]:
          continue
        count += 1
        for l, h in np.ndindex(L, H):
          real = pos[l, b, h] >= 0
          a = np.abs(win[l, b, h, w])
          out = real & (pos[l, b, h] >= sinks) & (pos[l, b, h] < n[b] - recent)
          total[l, h] += a[out].sum() / a[real].sum() if a[real].sum() > 0 else 0.0
  return total / count


def test_retrieval_scores_by_hand_and_reference():
  # One layer, user; two heads; 6 events; sinks 1, recent 2: "outside" is positions 1..3.
  pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (1, 1, 2, 6))
  cache = Cache(k=jnp.zeros((1, 1, 2, 6, 2)), v=jnp.zeros((1, 1, 2, 6, 2)), pos=pos,
                ts=pos, length=jnp.asarray([6], jnp.int32))
  win = jnp.asarray([[[[[1, 1, 1, 1, 1, 1]], [[4, 0, 0, 1, 1, 2]]]]], jnp.float32)
  sig = Signals(acc_attn=jnp.zeros((1, 1, 2, 6)), window_attn=win,
                window_valid=jnp.ones((1, 1), bool))
  np.testing.assert_allclose(retrieval_scores([(cache, sig)], 1, 2), [[0.5, 1 / 8]])
  assert split_heads(np.array([[0.5, 1 / 8]]), 0.5) == ((True, False),)
  assert split_heads(np.array([[0.2, 0.2], [0.1, 0.3]]), 0.5) == ((True, False), (False, True))
  # Random calibration users (uneven lengths, padding garbage, some invalid query rows).
  items = []
  for s in (3, 4):
    cache, sig = make_cache(s)
    wv = np.ones((B, W), bool)
    wv[1, :2] = False
    items.append((cache, sig.replace(window_valid=jnp.asarray(wv))))
  np.testing.assert_allclose(retrieval_scores(items, 2, 3), ref_scores(items, 2, 3), rtol=1e-12)
  with pytest.raises(ValueError, match="signals"):
    retrieval_scores([items[0][0]], 2, 3)
  with pytest.raises(ValueError, match="no calibration user"):
    retrieval_scores(items, T, T)


@pytest.mark.parametrize("seed,heads,sinks,recent", [
    (0, ((True, False), (False, True)), 2, 3), (1, ((False, False), (False, False)), 0, 4),
    (2, ((True, True), (True, False)), 3, 0), (3, ((True, True), (True, True)), 1, 1)])
def test_duoattention_keeps_full_or_streaming_rows(seed, heads, sinks, recent):
  for sparse in (False, True):
    cache, _ = make_cache(seed, sparse)
    comp = C.duoattention(heads=heads, sinks=sinks, recent=recent)
    memory, _ = jax.jit(comp.compress)(cache, comp.init(cache), None)
    dense = memory.materialize()
    cp, ck, cv = np.asarray(cache.pos), np.asarray(cache.k), np.asarray(cache.v)
    gp, gk, gv = np.asarray(dense.pos), np.asarray(dense.k), np.asarray(dense.v)
    for l, b, h in np.ndindex(L, B, H):
      want = ({int(p) for p in cp[l, b, h] if p >= 0} if heads[l][h]
              else ref_streaming(cp[l, b, h], sinks, recent))
      got = {int(p) for p in gp[l, b, h] if p >= 0}
      assert got == want, (l, b, h)
      for i in np.flatnonzero(gp[l, b, h] >= 0):
        j = int(np.flatnonzero(cp[l, b, h] == gp[l, b, h, i])[0])
        np.testing.assert_array_equal(gk[l, b, h, i], ck[l, b, h, j])
        np.testing.assert_array_equal(gv[l, b, h, i], cv[l, b, h, j])
    nr = sum(map(sum, heads))
    ns = L * H - nr
    c = sinks + recent
    per_user = nr * (T * 2 * D * 4 + T * 8) + ns * (c * 2 * D * 4 + c * 8) + 4
    assert C.nbytes(memory) == B * per_user and C.batch_size(memory) == B


def test_duoattention_hook_vmap_and_spec():
  items = [make_cache(s) for s in (5, 6)]
  shape = C.CacheShape.of(items[0][0])
  spec = C.get_spec("duoattention")
  assert spec.calibration_signals and spec.granularity == "head" and not spec.needs_signals
  params = spec.calibrate({"retrieval": 0.25, "sinks": 2, "recent": 3}, shape,
                          lambda: iter(items))
  assert params["heads"] == split_heads(ref_scores(items, 2, 3), 0.25)
  assert sum(map(sum, params["heads"])) == 1
  abstract = spec.calibrate({"retrieval": 0.5}, shape, None)
  assert abstract["heads"] == ((True, True), (False, False)) and abstract["recent"] == 64
  with pytest.raises(ValueError, match="retrieval"):
    spec.calibrate({"retrieval": 2}, shape, None)
  check_vmap("duoattention", {"heads": ((True, False), (False, True)), "sinks": 1, "recent": 2},
             [c for c, _ in items], None)
  with pytest.raises(ValueError, match="heads mask"):
    C.duoattention(heads=((True,),)).compress(items[0][0], None, None)
  assert C.memory_bytes("duoattention", C.cache_spec(L, H, 64, 16), retrieval=0.5, sinks=4,
                        recent=12) == 2 * (64 * 128 + 64 * 8) + 2 * (16 * 128 + 16 * 8) + 4


@pytest.mark.parametrize("heads,sinks,recent", [
    (((True, False), (False, True)), 2, 3), (((False, False), (False, False)), 0, 4),
    (((True, True), (True, True)), 1, 1)])
def test_duoattention_stored_bytes_closed_form(heads, sinks, recent):
  """Users of 0, 4 and T (capacity) events: every stored slot has float32 k, v (D each) and
  int32 pos, ts; retrieval rows hold min(n, T) slots, streaming rows min(n, sinks + recent)."""
  lengths = np.array([0, 4, T])
  cache, _ = make_cache(8)
  pos = np.where(np.arange(T)[None] < lengths[:, None], np.arange(T)[None], -1)  # [B, T]
  pos = np.broadcast_to(pos[None, :, None], (L, B, H, T))
  cache = cache.replace(pos=jnp.asarray(pos, jnp.int32), length=jnp.asarray(lengths, jnp.int32))
  comp = C.duoattention(heads=heads, sinks=sinks, recent=recent)
  memory, _ = comp.compress(cache, comp.init(cache), None)
  nr = sum(map(sum, heads))
  ns = L * H - nr
  per = 2 * D * 4 + 8
  want = (nr * np.minimum(lengths, T) + ns * np.minimum(lengths, sinks + recent)) * per + 4
  got = C.stored_bytes(memory)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, want)
