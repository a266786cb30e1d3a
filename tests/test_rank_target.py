"""Target-aware ranking (M-FALCON): ``model.rank`` against direct forward passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.models import Events, make_model
from tests.helpers import VARIANT_OPTIONS, jit_forward, random_events

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
  """Reference: one full forward pass (no cache) per (user, candidate) over history +
  request + that candidate, assembled in NumPy; the B * C sequences run as one batch."""
  hi, ht, hl = map(np.asarray, (hist.items, hist.ts, hist.length))
  ri, rt, rl = map(np.asarray, (req.items, req.ts, req.length))
  cands = np.asarray(cands)
  B, Cn = cands.shape
  W = int((hl + rl).max()) + 1
  items = np.zeros((B * Cn, W), np.int32)
  ts = np.zeros((B * Cn, W), np.int32)
  lengths = np.zeros(B * Cn, np.int32)
  for b in range(B):
    t_c = rt[b, rl[b] - 1] if rl[b] else 0
    for c in range(Cn):
      row = np.concatenate([hi[b, :hl[b]], ri[b, :rl[b]], [cands[b, c]]])
      n = len(row)
      items[b * Cn + c, :n] = row
      ts[b * Cn + c, :n] = np.concatenate([ht[b, :hl[b]], rt[b, :rl[b]], [t_c]])
      lengths[b * Cn + c] = n
  x = np.asarray(jit_forward(model, Events(jnp.asarray(items), jnp.asarray(ts),
                                           jnp.asarray(lengths))))  # [B * C, W, d]
  h = x[np.arange(B * Cn), lengths - 1][:, None]  # [B * C, 1, d]: each candidate's state
  out = model.rank_logits(jnp.asarray(h), jnp.asarray(cands.reshape(B * Cn, 1)))
  return np.asarray(out, np.float64).reshape(B, Cn)


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
  logits, attn = jax.jit(lambda m, c, r, k: m.rank(c, r, k, return_attn=True))(
      model, cache, req, cands)
  L, B, H, Cc, T = attn.shape
  assert (L, B, Cc, T) == (2, 4, C, cache.capacity)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(_rank(model, cache, req, cands)),
                             atol=1e-6)
  empty = ~np.asarray(cache.valid)[:, :, :, None, :]
  assert np.all(np.asarray(attn)[np.broadcast_to(empty, attn.shape)] == 0)
  # Softmax rows: memory + request + self sum to 1, so the memory part is at most 1.
  assert np.all(np.asarray(attn).sum(-1) <= 1 + 1e-5)


def test_rank_cell_serves_through_the_pipeline():
  """``ranking.rank_cell`` (serving.batches -> serve(target_aware=True)) against the direct
  forward passes: native memory, the recompute reference, and oracle signals (which the
  native memory ignores); batches of 3 over 4 users (the last batch padded)."""
  from malloc_jax import compressors as comp_lib  # noqa: PLC0415
  from malloc_jax.data.dataset import EvalSet  # noqa: PLC0415
  from malloc_jax.ranking import rank_cell  # noqa: PLC0415
  from tests.helpers import take  # noqa: PLC0415

  model = make("hstu")  # the pipeline is backbone-agnostic; rank itself is tested above
  q = 2
  full = random_events(4, 12, [8, 1, 12, 5], NUM_ITEMS, seed=7)
  length = np.asarray(full.length)
  split = np.maximum(length - q, 0)  # users shorter than the request keep what they have
  hist, req = take(full, np.zeros(4, int), split), take(full, split, length)
  cands = np.random.default_rng(8).integers(1, NUM_ITEMS + 1, (4, C)).astype(np.int32)
  data = EvalSet(np.asarray(full.items), np.asarray(full.ts), length, cands[:, 0].copy(),
                 np.zeros(4, np.int32))
  ref = _direct(model, hist, req, jnp.asarray(cands))
  native = rank_cell(model, data, cands, comp_lib.native(), batch_size=3, query_len=q,
                     window=4)
  np.testing.assert_allclose(native["logits"], ref, atol=1e-5, rtol=1e-5)
  recompute = rank_cell(model, data, cands, None, batch_size=3, query_len=q, window=4)
  np.testing.assert_allclose(recompute["logits"], ref, atol=1e-5, rtol=1e-5)
  # recompute keeps the raw events: one item id and one time stamp per event, plus a length
  assert recompute["bytes_per_user"] == pytest.approx(np.mean(length * 8 + 4))
  oracle = rank_cell(model, data, cands, comp_lib.native(), batch_size=3, query_len=q,
                     window=4, oracle=True)
  np.testing.assert_allclose(oracle["logits"], ref, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="oracle signals need"):
    rank_cell(model, data, cands, None, oracle=True)
