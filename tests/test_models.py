"""Serving invariant: prefill / extend / score from a native cache equal the full forward."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.models import Events
from malloc_jax.models.hstu import time_bucket
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

BACKBONES = ["hstu", "sasrec"]
LENGTHS = [20, 11, 3, 1, 17]


@pytest.mark.parametrize("name", BACKBONES)
def test_prefill_then_encode_equals_full_forward(name):
  model = random_model(name)
  ev = random_events(5, 20, LENGTHS)
  full = np.asarray(jit_forward(model, ev))  # [B, N, d]
  n = np.asarray(LENGTHS)
  cache, _ = jit_prefill(model, take(ev, 0 * n, n - 1))
  h = np.asarray(jit_encode(model, cache, take(ev, n - 1, n)))[:, 0]
  np.testing.assert_allclose(h, full[np.arange(5), n - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_chunked_extend_and_score_equal_full_forward(name):
  """History fed as prefill + two uneven extends; every new state and the logits match."""
  model = random_model(name, seed=3)
  ev = random_events(5, 20, LENGTHS, seed=4)
  full = np.asarray(jit_forward(model, ev))
  n = np.asarray(LENGTHS)
  c1, c2 = n // 3, (2 * n) // 3
  cache, _ = jit_prefill(model, take(ev, 0 * n, c1))
  chunk = take(ev, c1, c2)
  h2 = np.asarray(jit_encode(model, cache, chunk))
  for b in range(5):
    np.testing.assert_allclose(h2[b, : c2[b] - c1[b]], full[b, c1[b]:c2[b]], atol=1e-5)
  cache, _ = jit_extend(model, cache, chunk)
  np.testing.assert_array_equal(np.asarray(cache.length), c2)
  last = take(ev, c2, n)
  h3 = np.asarray(jit_encode(model, cache, last))
  for b in range(5):
    np.testing.assert_allclose(h3[b, : n[b] - c2[b]], full[b, c2[b]:n[b]], atol=1e-5)
  # score() of the request read against the cache equals logits of the full forward pass
  logits = np.asarray(jit_score(model, cache, last))
  h_last = full[np.arange(5), n - 1]
  h_last = h_last / np.sqrt((h_last ** 2).sum(-1, keepdims=True) + 1e-6)
  ref = h_last @ np.asarray(model.item_embeddings()).T / model.temperature
  np.testing.assert_allclose(logits[:, 1:], ref[:, 1:], atol=1e-4, rtol=1e-5)
  assert np.all(np.isneginf(logits[:, 0]))


@pytest.mark.parametrize("name", BACKBONES)
def test_prefill_cache_layout(name):
  model = random_model(name)
  ev = random_events(5, 20, LENGTHS)
  cache, sig = jit_prefill(model, ev)
  n = np.asarray(LENGTHS)
  pos = np.asarray(cache.pos)
  L, B, H, T = pos.shape
  for b in range(B):
    expect = np.where(np.arange(T) < n[b], np.arange(T), -1)
    assert (pos[:, b] == expect).all()
    assert (np.asarray(cache.ts)[:, b, :, : n[b]] == np.asarray(ev.ts)[b, : n[b]]).all()
  np.testing.assert_array_equal(np.asarray(cache.fill), n)
  # attention signals: nothing flows to empty slots; window rows of short users are empty
  acc = np.asarray(sig.acc_attn)
  assert acc.shape == (L, B, H, T)
  assert np.all(acc[pos < 0] == 0) and np.all(acc[pos >= 0] >= 0)
  wv = np.asarray(sig.window_valid)
  np.testing.assert_array_equal(wv.sum(1), np.minimum(n, 4))
  if name == "sasrec":  # softmax rows of real queries sum to one
    rows = np.asarray(sig.window_attn).sum(-1)  # [L, B, H, W]
    np.testing.assert_allclose(rows.transpose(0, 2, 1, 3)[:, :, wv], 1.0, atol=1e-5)
    # every real query's row sums to 1, so the total attention equals the number of queries
    np.testing.assert_allclose(acc.sum(-1), np.broadcast_to(n[None, :, None], (L, B, H)),
                               rtol=1e-5)


def test_hstu_time_bucket_closed_form():
  dt = jnp.array([0, 1, 2, 3, -7, 60, 3600, 86400, 10**9])
  got = np.asarray(time_bucket(dt, 64))
  ref = np.clip(np.floor(np.log(np.maximum(np.abs(np.asarray(dt, np.float64)), 1)) / 0.301),
                0, 63)
  np.testing.assert_array_equal(got, ref)


def hstu_reference(model, items, ts):
  """Float64 NumPy HSTU forward for one user (no padding), written from the paper."""
  f64 = lambda x: np.asarray(x, np.float64)
  silu = lambda x: x / (1 + np.exp(-x))

  def ln(x, mod):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + mod.epsilon) * f64(mod.scale[...]) + f64(mod.bias[...])

  n = len(items)
  x = f64(model.item_emb.embedding[...])[items] * np.sqrt(model.dim)
  x = x + f64(model.pos_emb.embedding[...])[np.arange(n)]
  for layer in model.layers:
    H, dqk, dv = layer.heads, layer.dqk, layer.dv
    h = silu(ln(x, layer.ln) @ f64(layer.uvqk.kernel[...]) + f64(layer.uvqk.bias[...]))
    u, v, q, k = np.split(h, [H * dv, 2 * H * dv, 2 * H * dv + H * dqk], axis=-1)
    q = q.reshape(n, H, dqk)
    k = k.reshape(n, H, dqk)
    v = v.reshape(n, H, dv)
    o = np.zeros((n, H, dv))
    for i in range(n):
      for j in range(i + 1):
        for hh in range(H):
          bucket = min(int(np.floor(np.log(max(abs(ts[i] - ts[j]), 1)) / 0.301)),
                       layer.num_time_buckets - 1)
          s = q[i, hh] @ k[j, hh] + float(layer.rab_pos[...][hh, i - j]) + float(
              layer.rab_time[...][hh, bucket])
          o[i, hh] += silu(s) / layer.max_len * v[j, hh]
    o = ln(o.reshape(n, H * dv), layer.ln_attn)
    x = x + (u * o) @ f64(layer.out.kernel[...]) + f64(layer.out.bias[...])
  return x


def test_hstu_matches_float64_reference():
  model = random_model("hstu", seed=7)
  ev = random_events(1, 9, [9], seed=8)
  got = np.asarray(jit_forward(model, ev))[0]
  ref = hstu_reference(model, np.asarray(ev.items)[0], np.asarray(ev.ts, np.int64)[0])
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_empty_history_is_served():
  """A user with no prior events (length-0 cache) still gets finite scores."""
  model = random_model("hstu")
  ev = random_events(2, 4, [0, 3])
  cache, _ = jit_prefill(model, ev)
  q = Events(jnp.array([[5], [6]], jnp.int32), jnp.array([[10], [20000]], jnp.int32),
             jnp.array([1, 1], jnp.int32))
  logits = np.asarray(jit_score(model, cache, q))
  assert np.isfinite(logits[:, 1:]).all()



@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_prefill_returns_the_last_window_queries(name):
  """Signals.window_queries [L, B, H, W, Dk]: the queries of each user's last W real events
  (zero rows where a user has fewer), checked on layer 0 against its input projection."""
  W, lengths = 4, [9, 2, 0]
  model = random_model(name, 40, max_len=12)
  ev = random_events(3, 12, lengths, 40, seed=3)
  _, sig = jit_prefill(model, ev)  # W = 4
  L, H = len(model.layers), model.layers[0].heads
  x = model.embed(ev.items, jnp.broadcast_to(jnp.arange(12), (3, 12)))  # [B, N, d]
  layer = model.layers[0]
  if name == "hstu":
    h = np.asarray(jax.nn.silu(layer.uvqk(layer.ln(x))))
    dk, start = layer.dqk, 2 * H * layer.dv
  else:
    h = np.asarray(layer.qkv(layer.ln1(x)))
    dk, start = layer.dh, 0
  q = h[..., start:start + H * dk].reshape(3, 12, H, dk)  # [B, N, H, Dk]
  got = np.asarray(sig.window_queries)
  assert got.shape == (L, 3, H, W, dk)
  for b, n in enumerate(lengths):
    for w in range(W):
      row = n - W + w
      want = q[b, row] if row >= 0 else np.zeros((H, dk))
      np.testing.assert_allclose(got[0, b, :, w], want, rtol=1e-5, atol=1e-6)
