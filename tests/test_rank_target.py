"""Target-aware ranking (M-FALCON): ``model.rank`` against direct forward passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.models import Events, make_model
from tests.helpers import VARIANT_OPTIONS, random_events

NUM_ITEMS = 40
HIST = [7, 0, 12, 3]  # one user with an empty history
REQ = [2, 3, 1, 0]  # and one with an empty request
C = 5


def _inputs(seed=0):
  hist = random_events(4, 12, HIST, NUM_ITEMS, seed=seed)
  req = random_events(4, 3, REQ, NUM_ITEMS, seed=seed + 1)
  # Requests come after the history in time.
  req = Events(req.items, jnp.where(req.valid, req.ts + 100_000, 0), req.length)
  cands = jnp.asarray(np.random.default_rng(seed + 2).integers(1, NUM_ITEMS + 1, (4, C)),
                      jnp.int32)
  return hist, req, cands


def _direct(model, hist, req, cands):
  """float64 NumPy-assembled reference: one full forward pass per (user, candidate)."""
  out = np.zeros(cands.shape, np.float64)
  hi, ht, hl = map(np.asarray, (hist.items, hist.ts, hist.length))
  ri, rt, rl = map(np.asarray, (req.items, req.ts, req.length))
  for b in range(cands.shape[0]):
    t_c = rt[b, rl[b] - 1] if rl[b] else 0
    for c in range(cands.shape[1]):
      items = np.concatenate([hi[b, :hl[b]], ri[b, :rl[b]], [int(cands[b, c])]])
      ts = np.concatenate([ht[b, :hl[b]], rt[b, :rl[b]], [t_c]])
      ev = Events(jnp.asarray(items[None], jnp.int32), jnp.asarray(ts[None], jnp.int32),
                  jnp.asarray([len(items)], jnp.int32))
      h = model(ev)[:, -1:]  # [1, 1, d]
      out[b, c] = float(model.rank_logits(h, cands[b:b + 1, c:c + 1])[0, 0])
  return out


_rank = jax.jit(lambda m, cache, req, cands: m.rank(cache, req, cands))
_prefill = jax.jit(lambda m, e: m.prefill(e, 4)[0])

NAMES = ["hstu", "sasrec"] + sorted(VARIANT_OPTIONS)


def make(name):
  """A small model with randomized biases and ranking head (dropout off)."""
  opts = {"heads": 2, **VARIANT_OPTIONS.get(name, {})}
  model = make_model(name, NUM_ITEMS, dim=16, num_layers=2, max_len=32, dropout=0.0, seed=0,
                     **opts)
  rng = np.random.default_rng(1)
  for layer in model.layers:
    for attr in ("rab_pos", "rab_time"):
      if hasattr(layer, attr):
        p = getattr(layer, attr)
        p[...] = jnp.asarray(rng.normal(0, 0.5, p[...].shape), jnp.float32)
  # A non-zero ranking head, so that its bias and weights are exercised.
  model.rank_head.kernel[...] = jnp.asarray(rng.normal(0, 0.3, (16, 1)), jnp.float32)
  model.rank_head.bias[...] = jnp.asarray([0.7], jnp.float32)
  return model


@pytest.mark.parametrize("name", NAMES)
def test_rank_equals_direct_forward(name):
  model = make(name)
  hist, req, cands = _inputs()
  got = np.asarray(_rank(model, _prefill(model, hist), req, cands))
  np.testing.assert_allclose(got, _direct(model, hist, req, cands), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_candidates_do_not_see_each_other(name):
  model = make(name)
  hist, req, cands = _inputs(seed=3)
  cache = _prefill(model, hist)
  a = np.asarray(_rank(model, cache, req, cands))
  changed = cands.at[:, 2].set(cands[:, 2] % NUM_ITEMS + 1)
  b = np.asarray(_rank(model, cache, req, changed))
  keep = [0, 1, 3, 4]
  np.testing.assert_array_equal(a[:, keep], b[:, keep])  # bit for bit
  assert np.all(a[:, 2] != b[:, 2])


@pytest.mark.parametrize("name", ["hstu", "sasrec", "hstu_gqa", "hstu_rwkv"])
def test_rank_vmaps_over_users(name):
  """vmap over single users (batch of 1 each) equals the batched call."""
  model = make(name)
  hist, req, cands = _inputs(seed=5)
  cache = _prefill(model, hist)
  full = np.asarray(_rank(model, cache, req, cands))

  axes = jax.tree.map(lambda t: 1 if t.ndim > 1 else 0, cache)  # [L, B, ...] or [B]

  def one(c, r, k):  # one user: put a batch axis of 1 back where vmap took it
    c1 = jax.tree.map(lambda t, a: jnp.expand_dims(t, a), c, axes)
    return model.rank(c1, jax.tree.map(lambda t: t[None], r), k[None])[0]

  got = jax.jit(jax.vmap(one, in_axes=(axes, 0, 0)))(cache, req, cands)
  np.testing.assert_allclose(np.asarray(got), full, atol=1e-5, rtol=1e-5)


def test_rank_attention_rows_cover_memory():
  """return_attn gives the candidates' rows over the memory slots, zero on empty slots."""
  model = make("sasrec")
  hist, req, cands = _inputs()
  cache = _prefill(model, hist)
  logits, attn = model.rank(cache, req, cands, return_attn=True)
  L, B, H, Cc, T = attn.shape
  assert (L, B, Cc, T) == (2, 4, C, cache.capacity)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(_rank(model, cache, req, cands)),
                             atol=1e-6)
  empty = ~np.asarray(cache.valid)[:, :, :, None, :]
  assert np.all(np.asarray(attn)[np.broadcast_to(empty, attn.shape)] == 0)
  # Softmax rows: memory + request + self sum to 1, so the memory part is at most 1.
  assert np.all(np.asarray(attn).sum(-1) <= 1 + 1e-5)
