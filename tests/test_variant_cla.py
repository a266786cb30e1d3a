"""Cross-Layer Attention (hstu_cla, sasrec_cla): the forward pass against a float64 NumPy
reference written from the definition, signals, the share=1 reduction to the native models,
serving at an odd depth, stored / buffer bytes in closed form (half of native's K/V for even
L), post-hoc compressors on its memory, vmap, and the runner's layer count and granularity.

The shared variant tests (tests/test_variants.py, test_rank_target.py, test_costs_variants.py)
also run both models through serving = full forward, rank = direct forward and the FLOPs
closed form."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from malloc_jax import compressors as C
from malloc_jax.experiment import model_cache_spec
from malloc_jax.models import backbone_spec, make_model
from malloc_jax.sweep import granularity
from tests.helpers import (
  jit_encode,
  jit_extend,
  jit_forward,
  jit_prefill,
  jit_score,
  random_events,
  random_model,
  take,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS, DIM, HEADS, MAX_LEN = 40, 16, 2, 32
LENGTHS = [20, 11, 3, 1, 17]


def cla(name, num_layers, share, seed=0):
  """A CLA model (dropout off) with randomized relative-position and time biases."""
  return random_model(name, NUM_ITEMS, dim=DIM, heads=HEADS, num_layers=num_layers,
                      max_len=MAX_LEN, seed=seed, share=share)


# ---------------------------------------------------------------------------------------
# float64 NumPy reference, from the definitions (HSTU: Zhai et al. 2024; SASRec: Kang &
# McAuley 2018; sharing: Brandon et al. 2024): layer i reads the K, V of layer s * (i // s).


def _np(x):
  return np.asarray(x[...], np.float64)


def _ln(x, mod, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * _np(mod.scale) + _np(mod.bias)


def _lin(x, mod):
  return x @ _np(mod.kernel) + _np(mod.bias)


def _silu(x):
  return x / (1 + np.exp(-x))


def _gelu(x):  # jax.nn.gelu's default (tanh approximation)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference(model, items, ts, share):
  """One user's hidden states [n, d] and per-layer attention magnitudes [L, H, n, n]."""
  n, d = len(items), model.dim
  x = _np(model.item_emb.embedding)[items] * np.sqrt(d) + _np(model.pos_emb.embedding)[
      np.minimum(np.arange(n), model.max_len - 1)]
  causal = np.arange(n)[None, :] <= np.arange(n)[:, None]  # [query, key]
  kv, attns = {}, []
  hstu = hasattr(model.layers[0], "uvqk")
  for i, layer in enumerate(model.layers):
    H = layer.heads
    producer = i % share == 0
    if hstu:
      dqk, dv = layer.dqk, layer.dv
      xh = _ln(x, layer.ln)
      if producer:
        h = _silu(_lin(xh, layer.uvqk))
        u, v, q, k = np.split(h, np.cumsum([H * dv, H * dv, H * dqk]), axis=-1)
        kv[i // share] = (k.reshape(n, H, dqk), v.reshape(n, H, dv))
      else:
        u, q = np.split(_silu(_lin(xh, layer.uq)), [H * dv], axis=-1)
      k, v = kv[i // share]
      q = q.reshape(n, H, dqk)
      rel = np.clip(np.arange(n)[:, None] - np.arange(n)[None, :], 0, layer.max_len - 1)
      gap = np.maximum(np.abs(ts[:, None] - ts[None, :]), 1).astype(np.float64)
      bucket = np.clip(np.floor(np.log(gap) / 0.301), 0, layer.num_time_buckets - 1)
      o = np.zeros((n, H, dv))
      a_all = np.zeros((H, n, n))
      for hd in range(H):
        s = (q[:, hd] @ k[:, hd].T + _np(layer.rab_pos)[hd][rel]
             + _np(layer.rab_time)[hd][bucket.astype(int)])
        a = np.where(causal, _silu(s), 0.0) / layer.max_len
        o[:, hd] = a @ v[:, hd]
        a_all[hd] = np.abs(a)
      x = x + _lin(u * _ln(o.reshape(n, H * dv), layer.ln_attn), layer.out)
    else:
      dh = layer.dh
      xh = _ln(x, layer.ln1)
      if producer:
        q, k, v = np.split(_lin(xh, layer.qkv), 3, axis=-1)
        kv[i // share] = (k.reshape(n, H, dh), v.reshape(n, H, dh))
      else:
        q = _lin(xh, layer.q)
      k, v = kv[i // share]
      q = q.reshape(n, H, dh)
      o = np.zeros((n, H, dh))
      a_all = np.zeros((H, n, n))
      for hd in range(H):
        s = np.where(causal, q[:, hd] @ k[:, hd].T / np.sqrt(dh), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o[:, hd] = a @ v[:, hd]
        a_all[hd] = a
      x = x + _lin(o.reshape(n, d), layer.out)
      x = x + _lin(_gelu(_lin(_ln(x, layer.ln2), layer.ff1)), layer.ff2)
    attns.append(a_all)
  if not hstu:
    x = _ln(x, model.final_ln)
  return x, np.stack(attns)


CASES = [("hstu_cla", 3, 2), ("hstu_cla", 4, 3), ("sasrec_cla", 3, 2)]


@pytest.mark.parametrize("name,num_layers,share", CASES)
def test_forward_and_signals_match_numpy_reference(name, num_layers, share):
  """Hidden states of the full forward pass, and prefill's accumulated attention per stored
  layer (the mean over its group's layers, summed over queries), against float64 NumPy."""
  model = cla(name, num_layers, share, seed=3)
  ev = random_events(3, 12, [12, 7, 1], NUM_ITEMS, seed=4)
  full = np.asarray(jit_forward(model, ev))
  cache, sig = jit_prefill(model, ev)
  P = -(-num_layers // share)
  assert cache.k.shape[0] == P == model.memory_layers()
  acc = np.asarray(sig.acc_attn)  # [P, B, H, T]
  for b, n in enumerate([12, 7, 1]):
    items, ts = np.asarray(ev.items[b, :n]), np.asarray(ev.ts[b, :n]).astype(np.int64)
    ref, attn = reference(model, items, ts, share)
    np.testing.assert_allclose(full[b, :n], ref, atol=2e-5, rtol=1e-4)
    for j in range(P):
      group = attn[j * share:(j + 1) * share].mean(axis=0)  # [H, n, n]
      np.testing.assert_allclose(acc[j, b, :, :n], group.sum(axis=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("native,name", [("hstu", "hstu_cla"), ("sasrec", "sasrec_cla")])
def test_share_one_is_the_native_backbone(native, name):
  ref = random_model(native, NUM_ITEMS, dim=DIM, heads=HEADS, num_layers=2, max_len=MAX_LEN,
                     seed=1)
  model = cla(name, 2, 1, seed=2)
  nnx.update(model, nnx.state(ref))
  ev = random_events(5, 20, LENGTHS, NUM_ITEMS, seed=5)
  np.testing.assert_allclose(np.asarray(jit_forward(model, ev)),
                             np.asarray(jit_forward(ref, ev)), atol=1e-6, rtol=0)


def test_serving_at_an_odd_depth_equals_full_forward():
  """3 layers, share 2 (groups {0, 1}, {2}): prefill + uneven extend + encode + score equal
  the full forward pass within 1e-5."""
  model = cla("hstu_cla", 3, 2, seed=6)
  ev = random_events(5, 20, LENGTHS, NUM_ITEMS, seed=7)
  n = np.asarray(LENGTHS)
  c1 = n // 3
  c2 = np.maximum(n - 1 - np.arange(5) % 2, c1)
  full = np.asarray(jit_forward(model, ev))
  memory, _ = jit_prefill(model, take(ev, 0 * n, c1))
  h2 = np.asarray(jit_encode(model, memory, take(ev, c1, c2)))
  memory, _ = jit_extend(model, memory, take(ev, c1, c2))
  logits = np.asarray(jit_score(model, memory, take(ev, c2, n)))
  assert memory.k.shape[0] == 2
  for u in range(5):
    np.testing.assert_allclose(h2[u, :c2[u] - c1[u]], full[u, c1[u]:c2[u]], atol=1e-5, rtol=0)
  last = full[np.arange(5), n - 1]
  last = last / np.sqrt((last * last).sum(-1, keepdims=True) + 1e-6)
  ref = last @ np.asarray(model.item_embeddings()).T
  np.testing.assert_allclose(logits[:, 1:] * model.temperature, ref[:, 1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Bytes


def closed_stored(layers, n, heads=HEADS, d=DIM // HEADS):
  """ceil-layers x H x n x (Dqk + Dv) float32, an int32 time stamp per event, the length."""
  return layers * heads * n * 2 * d * 4 + 4 * n + 4


@pytest.mark.parametrize("name,num_layers,share", [("hstu_cla", 4, 2), ("hstu_cla", 3, 2),
                                                   ("sasrec_cla", 4, 2)])
def test_stored_and_buffer_bytes_closed_form(name, num_layers, share):
  """Through the native compressor (as the sweep stores it): stored bytes are the closed form
  with ceil(L / share) layers; the buffer is the same at full capacity; for even L the K/V
  part is exactly half of the native backbone's."""
  model = cla(name, num_layers, share)
  ev = random_events(5, 20, LENGTHS, NUM_ITEMS, seed=8)
  cache, _ = jit_prefill(model, ev)
  memory, state = C.native().compress(cache, None, None)
  P = -(-num_layers // share)
  want = [closed_stored(P, n) for n in LENGTHS]
  np.testing.assert_array_equal(C.stored_bytes(memory, state), want)
  np.testing.assert_array_equal(C.buffer_bytes(memory, state), closed_stored(P, 20))
  native = name.split("_")[0]
  ref = random_model(native, NUM_ITEMS, dim=DIM, heads=HEADS, num_layers=num_layers,
                     max_len=MAX_LEN)
  nmem, _ = C.native().compress(jit_prefill(ref, ev)[0], None, None)
  index = np.array([4 * n + 4 for n in LENGTHS])
  kv_cla, kv_native = C.stored_bytes(memory) - index, C.stored_bytes(nmem) - index
  np.testing.assert_array_equal(kv_native, [closed_stored(num_layers, n) - 4 * n - 4
                                            for n in LENGTHS])
  if num_layers % 2 == 0:
    np.testing.assert_array_equal(2 * kv_cla, kv_native)


def test_post_hoc_compressors_apply_to_the_shared_memory():
  """SnapKV and KIVI compress the ceil(L/2)-layer memory like a native cache of that depth:
  bytes in closed form (kept events x P x H rows, a sparse index), and a SnapKV budget that
  keeps every event scores exactly as the uncompressed memory."""
  model = cla("hstu_cla", 4, 2, seed=9)
  ev = random_events(5, 20, LENGTHS, NUM_ITEMS, seed=10)
  n = np.asarray(LENGTHS)
  hist, req = take(ev, 0 * n, np.maximum(n - 1, 0)), take(ev, np.maximum(n - 1, 0), n)
  cache, sig = jit_prefill(model, hist)
  base = np.asarray(jit_score(model, cache, req))
  rows, kept = 2 * HEADS, np.minimum(np.maximum(n - 1, 0), 6)
  compress = lambda comp: jax.jit(lambda c, s: comp.compress(c, comp.init(c), s))
  memory, state = compress(C.snapkv(budget=6, window=2))(cache, sig)
  np.testing.assert_array_equal(
      C.stored_bytes(memory, state), rows * kept * (2 * (DIM // HEADS) * 4 + 8) + 4)
  assert np.all(np.isfinite(np.asarray(jit_score(model, memory.materialize(), req))[:, 1:]))
  memory, _ = compress(C.snapkv(budget=20, window=2))(cache, sig)
  np.testing.assert_allclose(np.asarray(jit_score(model, memory.materialize(), req))[:, 1:],
                             base[:, 1:], atol=1e-5, rtol=0)
  # KIVI quantizes keys once a block of 4 fills
  memory, _ = compress(C.kivi(bits=4, group=4, residual=4))(cache, sig)
  assert memory.materialize().k.shape[0] == 2
  native = C.stored_bytes(C.native().compress(cache, None, None)[0])
  np.testing.assert_array_equal(C.stored_bytes(memory) < native, np.maximum(n - 1, 0) >= 4)


def test_vmap_over_users_equals_the_batch():
  model = cla("hstu_cla", 2, 2, seed=11)
  ev = random_events(4, 12, [12, 5, 1, 9], NUM_ITEMS, seed=12)
  n = np.asarray([12, 5, 1, 9])
  hist, req = take(ev, 0 * n, n - 1), take(ev, n - 1, n)
  batched = np.asarray(jit_score(model, jit_prefill(model, hist)[0], req))

  def one(e, r):  # one user, a batch of 1
    add = lambda t: t[None]
    cache, _ = model.prefill(jax.tree.map(add, e), 4)
    return model.score(cache, jax.tree.map(add, r))[0]

  got = jax.jit(jax.vmap(one))(hist, req)
  np.testing.assert_allclose(np.asarray(got), batched, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# The runner


def test_runner_sees_layer_granularity_and_stored_depth():
  spec = importlib.util.spec_from_file_location("hstu_cla_cfg", ROOT / "configs" / "hstu_cla.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg, name in (("runlocal=True", "hstu_cla"), ("runlocal=True,model=sasrec", "sasrec_cla")):
    config = module.get_config(arg)
    assert config.model.name == name and config.model.share == 2
    cache = model_cache_spec(config)  # what the sweep resolves post-hoc ratios against
    assert cache.k.shape[0] == -(-config.model.num_layers // 2)
    assert granularity("native", name) == "layer" == backbone_spec(name).granularity
  with pytest.raises(ValueError, match="share=0"):
    cla("hstu_cla", 2, 0)


@pytest.mark.parametrize("native", ["hstu", "sasrec"])
def test_flops_closed_form_with_share_one_is_native(native):
  """share=1: every layer a producer, so cla_flops is request_flops of the native backbone
  (the XLA cross-check of share=2 is in test_costs_variants)."""
  from malloc_jax import costs
  shape = dict(batch=3, cached=17, request=2)
  model = make_model(f"{native}_cla", NUM_ITEMS, dim=32, heads=4, num_layers=3,
                     max_len=MAX_LEN, share=1)
  got = costs.closed_form_flops(model, **shape)
  ref = costs.request_flops(native, num_layers=3, dim=32, heads=4, dqk=8, dv=8,
                            num_items=NUM_ITEMS, **shape)
  for key in ("total", "per_request", "matmul"):
    assert got[key] == pytest.approx(ref[key]), key
  two = costs.closed_form_flops(
      make_model(f"{native}_cla", NUM_ITEMS, dim=32, heads=4, num_layers=3, max_len=MAX_LEN,
                 share=2), **shape)
  # one consumer layer without the K, V projections: 2 m d (H (Dqk + Dv)) = 2 m d (2 d) per user
  assert ref["matmul"] - two["matmul"] == 3 * 2 * 2 * 32 * (2 * 32)
