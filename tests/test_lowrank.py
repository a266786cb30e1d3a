"""Low-rank compressor against float64 PCA and the native cache."""

import jax
import numpy as np

from malloc_jax import compressors as C
from malloc_jax.checkpoint import load_memories, save_memories
from tests.helpers import jit_prefill, jit_score, random_events, random_model, take

LENGTHS = [20, 11, 3, 16]


def _setup(seed=0):
  model = random_model("hstu", seed=seed)
  ev = random_events(4, 20, LENGTHS, seed=seed)
  n = np.asarray(LENGTHS)
  cache, sig = jit_prefill(model, take(ev, 0 * n, n - 1))
  return model, cache, sig, take(ev, n - 1, n)


def test_fit_lowrank_matches_float64_pca():
  _, cache, _, _ = _setup()
  bases = C.fit_lowrank([cache], rank=3)
  k = np.asarray(cache.k, np.float64)
  valid = np.asarray(cache.pos) >= 0
  for l in range(k.shape[0]):
    for h in range(k.shape[2]):
      x = k[l][:, h][valid[l][:, h]]  # [n, D]
      mean = x.mean(0)
      _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
      np.testing.assert_allclose(np.asarray(bases.k_mean[l, h]), mean, atol=1e-5)
      # same subspace: projector onto the top-3 directions agrees
      p_ref = vt[:3].T @ vt[:3]
      b = np.asarray(bases.k_basis[l, h], np.float64)
      np.testing.assert_allclose(b @ b.T, p_ref, atol=1e-3)


def test_full_rank_reproduces_native_scores():
  model, cache, sig, q = _setup(1)
  dk = cache.k.shape[-1]
  comp = C.lowrank(C.fit_lowrank([cache], rank=dk))
  mem, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
  ref = np.asarray(jit_score(model, cache, q))
  got = np.asarray(jit_score(model, mem.materialize(), q))
  np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=1e-4)


def test_lowrank_bytes_are_stored_leaves():
  _, cache, sig, _ = _setup()
  L, B, H, T, D = cache.k.shape
  r = D // 4
  comp = C.lowrank(C.fit_lowrank([cache], rank=r))
  mem, _ = comp.compress(cache, comp.init(cache), sig)
  native, _ = C.native().compress(cache, None, sig)
  # closed forms: coordinates (2 * L*H*T*r float32) + index (ts [T] int32 + length int32)
  assert C.bytes_per_user(mem) == 2 * L * H * T * r * 4 + T * 4 + 4
  assert C.bytes_per_user(native) == 2 * L * H * T * D * 4 + T * 4 + 4
  assert C.shared_nbytes(mem) == 2 * (L * H * D + L * H * D * r) * 4
  assert C.nbytes(mem) == sum(x.nbytes for x in (mem.ck, mem.cv, mem.index.ts,
                                                 mem.index.length))


def test_lowrank_under_vmap_over_users():
  _, cache, sig, _ = _setup()
  comp = C.lowrank(C.fit_lowrank([cache], rank=2))
  stacked = jax.tree.map(lambda x: np.stack([x, x]), cache)
  mem = jax.vmap(lambda c: comp.compress(c, comp.init(c), None)[0])(stacked)
  single, _ = comp.compress(cache, comp.init(cache), None)
  np.testing.assert_allclose(np.asarray(mem.ck[1]), np.asarray(single.ck), atol=1e-6)


def test_saved_memories_restore_to_identical_scores(tmp_path):
  model, cache, sig, q = _setup(2)
  comp = C.lowrank(C.fit_lowrank([cache], rank=4))
  mem, _ = comp.compress(cache, comp.init(cache), sig)
  save_memories(tmp_path / "mem", mem, {"method": "lowrank"})
  restored, meta = load_memories(tmp_path / "mem", mem)
  assert meta == {"method": "lowrank"}
  a = np.asarray(jit_score(model, mem.materialize(), q))
  b = np.asarray(jit_score(model, restored.materialize(), q))
  np.testing.assert_array_equal(a, b)
