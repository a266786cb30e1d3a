"""Compressed reads (malloc_jax.reads) against a float64 NumPy attention over the dense cache.

Every memory form is read without materializing; the reference concatenates the memory's
materialized slots with the new events' keys and computes the attention in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax import reads
from tests.helpers import random_events, random_model

HIST = [40, 23, 9, 0]  # uneven history lengths (capacity 40)
REQ = [5, 3, 1, 4]  # uneven request lengths (capacity 5)


def _np_attend(kind, q, kk, vv, kpos, qpos, qvalid, bias, scale, norm):
  """float64 reference: q [B,H,m,D], kk/vv [B,H,T,D], kpos [B,H,T], bias [B,H,m,T] or None."""
  q, kk, vv = (np.asarray(x, np.float64) for x in (q, kk, vv))
  kpos, qpos, qvalid = np.asarray(kpos), np.asarray(qpos), np.asarray(qvalid)
  s = np.einsum("bhmd,bhtd->bhmt", q, kk)
  mask = (kpos[:, :, None] >= 0) & (kpos[:, :, None] <= qpos[:, None, :, None]) & (
      qvalid[:, None, :, None])
  if kind == "pointwise":
    s = s + np.asarray(bias, np.float64)
    a = np.where(mask, s / (1 + np.exp(-s)), 0.0) / norm
  else:
    s = np.where(mask, s * scale, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0.0)
    den = e.sum(-1, keepdims=True)
    a = np.where(den > 0, e / np.where(den > 0, den, 1), 0.0)
  return np.einsum("bhmt,bhtd->bhmd", a, vv)


@pytest.fixture(scope="module")
def setup():
  model = random_model("hstu", dim=16, heads=2, max_len=64)
  hist = random_events(4, 40, HIST, seed=1)
  cache, signals = jax.jit(lambda m, e: m.prefill(e, window=4))(model, hist)
  bases = C.fit_lowrank([cache], rank=3)
  comps = {
      "native": C.native(),
      "lowrank": C.lowrank(bases),
      "kivi2": C.kivi(bits=2, group=8, residual=16),
      "kivi4_sliding": C.kivi(bits=4, group=8, residual=8, key_residual="sliding"),
      "uniform8": C.uniform(8),
      "uniform4": C.uniform(4),
      "intactkv": C.intactkv(bits=4, pivots=3, sinks=1, group=4),
      "h2o": C.h2o(heavy=6, recent=4),
      "snapkv": C.snapkv(budget=12, window=4, kernel=3),
      "snapkv_kivi": C.chain(C.snapkv(budget=16, window=4, kernel=3),
                             C.kivi(bits=2, group=8, residual=8)),
      "h2o_lowrank": C.chain(C.h2o(heavy=6, recent=4), C.lowrank(bases)),
  }
  memories = {}
  for name, comp in comps.items():
    memories[name] = jax.jit(lambda c, s, comp=comp: comp.compress(c, comp.init(c), s)[0])(
        cache, signals)
  return model, memories


def _queries(B, H, m, D, lengths, hist, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, H, m, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, H, m, D)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, H, m, D)), jnp.float32)
  valid = np.arange(m)[None] < np.asarray(lengths)[:, None]
  q_pos = np.where(valid, np.asarray(hist)[:, None] + np.arange(m)[None], -1).astype(np.int32)
  q_ts = np.where(valid, 10**6 + rng.integers(0, 10**5, (B, m)), 0).astype(np.int32)
  return q, k, v, jnp.asarray(q_pos), jnp.asarray(q_ts), jnp.asarray(valid)


NAMES = ["native", "lowrank", "kivi2", "kivi4_sliding", "uniform8", "uniform4", "intactkv",
         "h2o", "snapkv", "snapkv_kivi", "h2o_lowrank"]


@pytest.mark.parametrize("kind", ["pointwise", "softmax"])
@pytest.mark.parametrize("name", NAMES)
def test_read_matches_float64_dense_attention(setup, name, kind):
  model, memories = setup
  memory = memories[name]
  layer_mod = model.layers[1]
  dense = memory.materialize()
  B, H = dense.k.shape[1:3]
  D = dense.k.shape[-1]
  q, k, v, q_pos, q_ts, q_valid = _queries(B, H, 5, D, REQ, HIST, seed=3)
  if kind == "pointwise":
    attn = reads.Attention("pointwise", norm=64.0, bias=layer_mod.bias)
  else:
    attn = reads.Attention("softmax", scale=D ** -0.5)
  # chunk 8 so the quantized reads scan over several chunks
  got = jax.jit(lambda mem, *a: reads.attend_memory(attn, reads.LayerView(mem, 1, chunk=8), *a))(
      memory, q, k, v, q_pos, q_ts, q_valid)
  # Reference: materialized slots of layer 1 followed by the new keys, in float64.
  kk = jnp.concatenate([dense.k[1], k], axis=2)
  vv = jnp.concatenate([dense.v[1], v], axis=2)
  kpos = jnp.concatenate([dense.pos[1], jnp.broadcast_to(q_pos[:, None], (B, H, 5))], axis=2)
  kts = jnp.concatenate([dense.ts[1], jnp.broadcast_to(q_ts[:, None], (B, H, 5))], axis=2)
  bias = layer_mod.bias(q_pos, q_ts, kpos, kts) if kind == "pointwise" else None
  want = _np_attend(kind, q, kk, vv, kpos, q_pos, q_valid, bias, D ** -0.5, 64.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_quantized_read_scans_chunks(setup):
  """The blocked read of a KIVI memory really scans (more than one chunk at chunk=8)."""
  _, memories = setup
  mem = memories["kivi2"]
  q, k, v, q_pos, q_ts, q_valid = _queries(4, 2, 5, 8, REQ, HIST, seed=0)
  attn = reads.Attention("softmax", scale=1.0)
  jaxpr = jax.make_jaxpr(lambda mem: reads.read_memory(
      attn, reads.LayerView(mem, 0, chunk=8), q, q_pos, q_ts, q_valid))(mem)
  assert "scan" in str(jaxpr)
  assert reads.chunk_size(mem, 40, 8) == 8


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize("name", ["native", "lowrank", "kivi2", "uniform4", "intactkv", "h2o",
                                  "snapkv_kivi"])
def test_model_encode_from_memory_equals_materialized(setup, backbone, name):
  """model.encode(memory) (compressed read) equals model.encode(memory.materialize())."""
  if backbone == "hstu":
    model, memories = setup
    memory = memories[name]
  else:
    model = random_model("sasrec", dim=16, heads=2, max_len=64)
    hist = random_events(4, 40, HIST, seed=1)
    cache, signals = jax.jit(lambda m, e: m.prefill(e, window=4))(model, hist)
    comp = {"native": C.native(), "lowrank": C.lowrank(C.fit_lowrank([cache], rank=3)),
            "kivi2": C.kivi(bits=2, group=8, residual=16), "uniform4": C.uniform(4),
            "intactkv": C.intactkv(bits=4, pivots=3, sinks=1, group=4),
            "h2o": C.h2o(heavy=6, recent=4),
            "snapkv_kivi": C.chain(C.snapkv(budget=16, window=4, kernel=3),
                                   C.kivi(bits=2, group=8, residual=8))}[name]
    memory = comp.compress(cache, comp.init(cache), signals)[0]
  req = random_events(4, 5, REQ, seed=7)
  req = req.replace(ts=req.ts + 10**7)
  enc = jax.jit(lambda m, c, e: m.encode(c, e))
  got = enc(model, memory, req)
  want = enc(model, memory.materialize(), req)
  valid = np.asarray(req.valid)[..., None]
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5,
                             rtol=1e-5)


def test_unknown_memory_type_is_an_error():
  with pytest.raises(TypeError, match="no compressed read for dict"):
    reads.read_memory(reads.Attention("softmax"), reads.LayerView({}, 0), None, None, None,
                      None)


def test_serving_view_reads_plain_models_and_materializes_variants(setup):
  model, memories = setup
  assert reads.serving_view(model, memories["kivi2"]) is memories["kivi2"]
  variant = random_model("hstu_gqa", dim=16, heads=4, max_len=64)
  view = reads.serving_view(variant, memories["kivi2"])
  assert type(view).__name__ == "Cache"


def test_read_costs_times_the_compressed_read(setup):
  model, memories = setup
  req = random_events(4, 5, REQ, seed=7)
  out = reads.read_costs(model, memories["kivi2"], req, warmup=1, iters=2)
  assert out["compressed_read"] is True
  assert out["latency_p50_ms"] > 0 and out["serving_temp_bytes"] > 0


@pytest.mark.parametrize("heads_agree", [True, False])
def test_hstu_rab_equals_numpy_tables(heads_agree):
  """HSTULayer.bias (shared bucket indices, flat-table gathers) against NumPy table lookups.

  The head-shared index ([B, 1, T]: bucketed once for all heads), a [B, H, T] index whose
  heads agree and one whose heads differ all give the reference's values.
  """
  from flax import nnx

  from malloc_jax.models.hstu import HSTULayer
  rng = np.random.default_rng(5)
  B, H, m, T, ML, NB = 3, 2, 4, 50, 64, 16
  layer = HSTULayer(16, H, 8, 8, ML, NB, 0.0, rngs=nnx.Rngs(0))
  layer.rab_pos[...] = jnp.asarray(rng.normal(size=(H, ML)), jnp.float32)
  layer.rab_time[...] = jnp.asarray(rng.normal(size=(H, NB)), jnp.float32)
  q_pos = rng.integers(0, 80, (B, m)).astype(np.int32)
  q_ts = rng.integers(0, 10**8, (B, m)).astype(np.int32)
  kpos = rng.integers(-1, 70, (B, 1 if heads_agree else H, T)).astype(np.int32)
  kts = rng.integers(0, 10**8, kpos.shape).astype(np.int32)
  tp, tt = np.asarray(layer.rab_pos[...]), np.asarray(layer.rab_time[...])
  rel = np.clip(q_pos[:, None, :, None] - kpos[:, :, None, :], 0, ML - 1)
  dt = np.maximum(np.abs(q_ts[:, None, :, None].astype(np.int64) - kts[:, :, None, :]), 1)
  bkt = np.clip(np.floor(np.log(dt.astype(np.float32)) / np.float32(0.301)), 0, NB - 1)
  h = np.arange(H)[None, :, None, None]
  want = tp[h, rel] + tt[h, bkt.astype(np.int64)]  # [B, H, m, T]
  kp = np.broadcast_to(kpos, (B, H, T))
  kt = np.broadcast_to(kts, (B, H, T))
  got = jax.jit(layer.bias)(q_pos, q_ts, jnp.asarray(kp), jnp.asarray(kt))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  if heads_agree:  # the [B, 1, T] form of the same index
    got1 = jax.jit(layer.bias)(q_pos, q_ts, jnp.asarray(kpos), jnp.asarray(kts))
    np.testing.assert_allclose(np.asarray(got1), want, atol=1e-6)
