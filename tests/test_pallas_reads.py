"""Pallas reads (interpret mode on CPU) against the jnp reads of malloc_jax.reads."""

import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax import kernels, reads
from malloc_jax.cache import Cache


def _cache(L=1, B=2, H=2, T=32, D=8, lengths=(32, 13), seed=0):
  rng = np.random.default_rng(seed)
  slot = np.arange(T)[None, :]
  pos = np.where(slot < np.asarray(lengths)[:, None], slot, -1).astype(np.int32)
  ts = np.where(pos >= 0, np.cumsum(rng.integers(1, 9000, (B, T)), axis=1), 0)
  pos = np.broadcast_to(pos[None, :, None], (L, B, H, T))
  ts = np.broadcast_to(ts[None, :, None], (L, B, H, T)).astype(np.int32)
  k = rng.normal(size=(L, B, H, T, D)) * (pos >= 0)[..., None]
  v = rng.normal(size=(L, B, H, T, D)) * (pos >= 0)[..., None]
  return Cache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32),
               pos=jnp.asarray(pos), ts=jnp.asarray(ts),
               length=jnp.asarray(lengths, jnp.int32))


def _queries(B=2, H=2, m=3, D=8, hist=(32, 13), req=(3, 2), seed=1):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, H, m, D)), jnp.float32)
  valid = np.arange(m)[None] < np.asarray(req)[:, None]
  q_pos = np.where(valid, np.asarray(hist)[:, None] + np.arange(m), -1).astype(np.int32)
  q_ts = np.where(valid, 10**6, 0).astype(np.int32)
  return q, jnp.asarray(q_pos), jnp.asarray(q_ts), jnp.asarray(valid)


def _bias(q_pos, q_ts, kpos, kts):  # a position- and time-dependent bias, like HSTU's rab
  rel = (q_pos[:, None, :, None] - kpos[:, :, None, :]).astype(jnp.float32)
  dt = (q_ts[:, None, :, None] - kts[:, :, None, :]).astype(jnp.float32)
  return 0.1 * jnp.sin(rel) + 0.05 * jnp.log1p(jnp.abs(dt))


ATTNS = {"pointwise": reads.Attention("pointwise", norm=32.0, bias=_bias),
         "softmax": reads.Attention("softmax", scale=8 ** -0.5)}


def _check(want, got):
  np.testing.assert_allclose(np.asarray(reads.finish(got)), np.asarray(reads.finish(want)),
                             atol=1e-5, rtol=1e-5)
  if want.mx is not None:
    seen = jnp.isfinite(want.mx)
    np.testing.assert_array_equal(np.asarray(jnp.isfinite(got.mx)), np.asarray(seen))
    rescaled = got.den * jnp.exp(jnp.where(seen, got.mx - want.mx, 0.0))
    np.testing.assert_allclose(np.asarray(rescaled), np.asarray(want.den), rtol=1e-5)


@pytest.mark.parametrize("kind", ["pointwise", "softmax"])
def test_pallas_uniform8_matches_blocked_read(kind):
  cache = _cache()
  comp = C.uniform(8)
  mem = comp.compress(cache, comp.init(cache))[0]
  q, q_pos, q_ts, q_valid = _queries()
  view = reads.LayerView(mem, 0, chunk=8)
  want = reads.blocked_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid)
  got = kernels.uniform_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid, chunk=8)
  _check(want, got)


@pytest.mark.parametrize("kind", ["pointwise", "softmax"])
def test_pallas_lowrank_matches_projected_read(kind):
  cache = _cache()
  comp = C.lowrank(C.fit_lowrank([cache], rank=3))
  mem = comp.compress(cache, comp.init(cache))[0]
  q, q_pos, q_ts, q_valid = _queries()
  view = reads.LayerView(mem, 0)
  want = reads.lowrank_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid)
  got = kernels.lowrank_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid, chunk=8)
  _check(want, got)


def test_pallas_rows_read_rejects_ragged_chunk():
  r = jnp.zeros((1, 1, 12))
  with pytest.raises(ValueError, match="chunk=8 must divide the slot count 12"):
    kernels.rows_read(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 1)), jnp.zeros((1, 12, 4)), r, r,
                      jnp.zeros((1, 12, 4)), r, r, jnp.zeros((1, 3, 12)), jnp.zeros((1, 3, 12)),
                      kind="softmax", chunk=8)


@pytest.mark.parametrize("kind", ["pointwise", "softmax"])
@pytest.mark.parametrize("bits,residual,key_residual", [(2, 16, "block"), (4, 8, "sliding"),
                                                        (2, 8, "block")])
def test_pallas_kivi_unpacks_codes_like_blocked_read(kind, bits, residual, key_residual):
  # lengths 32, 13 and 30 with R = 16 / 8: rows whose tail mixes quantized and exact keys
  cache = _cache(B=3, lengths=(32, 13, 30))
  comp = C.kivi(bits=bits, group=8, residual=residual, key_residual=key_residual)
  mem = comp.compress(cache, comp.init(cache))[0]
  q, q_pos, q_ts, q_valid = _queries(B=3, hist=(32, 13, 30), req=(3, 2, 1))
  view = reads.LayerView(mem, 0, chunk=8)
  want = reads.blocked_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid)
  got = kernels.kivi_read(ATTNS[kind], view, q, q_pos, q_ts, q_valid, chunk=16)
  _check(want, got)


def test_pallas_kivi_reads_an_evicted_then_quantized_memory():
  cache = _cache()
  rng = np.random.default_rng(3)
  signals = _signals(cache, rng)
  comp = C.chain(C.h2o(heavy=8, recent=8), C.kivi(bits=2, group=8, residual=8))
  mem = comp.compress(cache, comp.init(cache), signals)[0]
  q, q_pos, q_ts, q_valid = _queries()
  view = reads.LayerView(mem, 0)
  want = reads.blocked_read(ATTNS["pointwise"], view, q, q_pos, q_ts, q_valid)
  got = kernels.kivi_read(ATTNS["pointwise"], view, q, q_pos, q_ts, q_valid, chunk=8)
  _check(want, got)


def _signals(cache, rng):
  from malloc_jax.cache import Signals
  L, B, H, T = cache.pos.shape
  return Signals(acc_attn=jnp.asarray(rng.random((L, B, H, T)), jnp.float32),
                 window_attn=jnp.asarray(rng.random((L, B, H, 4, T)), jnp.float32),
                 window_valid=jnp.ones((B, 4), bool))


def test_pallas_kivi_unpack_matches_pack_codes():
  from malloc_jax.compressors.quantization import pack_codes
  from malloc_jax.kernels.pallas_reads import _unpack
  rng = np.random.default_rng(0)
  for bits in (2, 4):
    codes = rng.integers(0, 2 ** bits, (5, 12))
    got = _unpack(pack_codes(jnp.asarray(codes, jnp.int32), bits), bits, 12)
    np.testing.assert_array_equal(np.asarray(got), codes)


def test_model_encode_and_score_pick_the_kivi_kernel_by_flag():
  """serving_view(..., kernel="pallas") reads KIVI with the kernel; the default stays jnp."""
  import jax

  from tests.helpers import random_events, random_model
  model = random_model("hstu", dim=16, heads=2, max_len=64)
  hist = random_events(3, 32, [32, 20, 7], seed=1)
  cache, _ = jax.jit(lambda m, e: m.prefill(e))(model, hist)
  comp = C.kivi(bits=2, group=8, residual=8)
  mem = comp.compress(cache, comp.init(cache))[0]
  req = random_events(3, 4, [4, 2, 3], seed=7)
  req = req.replace(ts=req.ts + 10**7)
  assert reads.serving_view(model, mem) is mem  # default: the jnp blocked read
  view = reads.serving_view(model, mem, kernel="pallas")
  assert isinstance(view, reads.PallasRead) and view.memory is mem
  enc = jax.jit(lambda m, c, e: m.encode(c, e))
  assert "pallas_call" in str(jax.make_jaxpr(lambda c: model.encode(c, req))(view))
  valid = np.asarray(req.valid)[..., None]
  got, want = enc(model, view, req), enc(model, mem.materialize(), req)
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5,
                             rtol=1e-5)
  score = jax.jit(lambda m, c, e: m.score(c, e))
  np.testing.assert_allclose(score(model, view, req), score(model, mem.materialize(), req),
                             atol=1e-4, rtol=1e-5)  # logits: cosines / temperature 0.05


def test_pallas_flag_rejects_memories_without_a_kernel():
  from tests.helpers import random_model
  model = random_model("hstu", dim=16, heads=2, max_len=64)
  cache = _cache(D=8)
  comp = C.uniform(4)
  mem = comp.compress(cache, comp.init(cache))[0]
  with pytest.raises(TypeError, match="no Pallas kernel reads UniformMemory"):
    reads.serving_view(model, mem, kernel="pallas")
  with pytest.raises(ValueError, match="kernel must be None or 'pallas'"):
    reads.serving_view(model, mem, kernel="triton")
