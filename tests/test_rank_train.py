"""Ranking training: impressions, several positions per window, listwise loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.models import Events
from malloc_jax.train import RankingSampler, ranking_impressions, ranking_logits, ranking_loss
from tests.test_rank_target import NUM_ITEMS, make

# 8 groups of 5 items: 1-5, 6-10, ..., 36-40.
GROUPS = np.arange(1, NUM_ITEMS + 1).reshape(8, 5)
ITEM_GROUP = np.concatenate([[-1], np.repeat(np.arange(8), 5)])


def _windows(B=3, N=12, lengths=(13, 7, 2), seed=0):
  rng = np.random.default_rng(seed)
  items = rng.integers(1, NUM_ITEMS + 1, (B, N + 1))
  ts = np.cumsum(rng.integers(1, 5000, (B, N + 1)), axis=1)
  valid = np.arange(N + 1)[None] < np.asarray(lengths)[:, None]
  return (jnp.asarray(np.where(valid, items, 0), jnp.int32),
          jnp.asarray(np.where(valid, ts, 0), jnp.int32), jnp.asarray(lengths, jnp.int32))


def test_hard_negatives_are_the_other_members():
  items, _, length = _windows()
  sampler = RankingSampler(uniform=2, hard=4, groups=GROUPS, item_group=ITEM_GROUP,
                           positions=6)
  p, cands = map(np.asarray, ranking_impressions(items, length, jax.random.key(0), sampler,
                                                 NUM_ITEMS))
  assert cands.shape == (3, 6, 1 + 2 + 4)
  for b in range(3):
    n = int(length[b])
    for j in range(6):
      assert max(1, int(np.ceil(0.5 * n))) <= p[b, j] <= n - 1
      pos = int(items[b, p[b, j]])
      assert cands[b, j, 0] == pos
      others = set(GROUPS[ITEM_GROUP[pos]].tolist()) - {pos}
      assert sorted(cands[b, j, 3:].tolist()) == sorted(others)  # all 4, no repeats
      assert np.all((cands[b, j, 1:3] >= 1) & (cands[b, j, 1:3] <= NUM_ITEMS))
  with pytest.raises(ValueError, match="at most 4 other members"):
    RankingSampler(hard=5, groups=GROUPS, item_group=ITEM_GROUP)
  with pytest.raises(ValueError, match="rank_loss='pairwise'"):
    RankingSampler(hard=1, groups=GROUPS, item_group=ITEM_GROUP, loss="pairwise")


@pytest.mark.parametrize("name", ["hstu", "sasrec", "hstu_gqa", "hstu_mqa", "hstu_mla", "hstu_lsh",
                                  "hstu_cla", "sasrec_cla"])
def test_positions_in_one_pass_equal_rank_of_each_prefix(name):
  """P candidate blocks at P positions of one window = ``model.rank`` of each prefix alone."""
  model = make(name)
  items, ts, length = _windows()
  p = jnp.asarray([[12, 3, 7, 1], [6, 2, 6, 4], [1, 1, 1, 1]], jnp.int32)  # [B, P]
  cands = jnp.asarray(np.random.default_rng(5).integers(1, NUM_ITEMS + 1, (3, 4, 5)),
                      jnp.int32)
  got = np.asarray(jax.jit(ranking_logits)(model, items, ts, length, p, cands))
  N = items.shape[1] - 1
  rank_alone = jax.jit(lambda m, req, c: m.rank(m.empty_cache(3), req, c))
  for j in range(p.shape[1]):
    req = Events(items[:, :N], ts[:, :N], p[:, j])
    want = np.asarray(rank_alone(model, req, cands[:, j]))
    np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=1e-5)


def test_listwise_loss_is_softmax_cross_entropy():
  model = make("hstu")
  items, ts, length = _windows()
  sampler = RankingSampler(uniform=3, hard=4, groups=GROUPS, item_group=ITEM_GROUP,
                           positions=3, loss="listwise")
  rng = jax.random.key(3)
  loss, count = jax.jit(lambda m, *a: ranking_loss(m, *a, sampler, dropout=False))(
      model, items, ts, length, rng)
  p, cands = ranking_impressions(items, length, jax.random.split(rng)[0], sampler, NUM_ITEMS)
  z = np.asarray(jax.jit(ranking_logits)(model, items, ts, length, p, cands),
                 np.float64)  # [B, P, C]
  c = np.asarray(cands)
  keep = np.ones(c.shape, bool)
  keep[..., 1:] = c[..., 1:] != c[..., :1]  # a uniform draw equal to the positive drops out
  zk = np.where(keep, z, -np.inf)
  want = np.log(np.exp(zk).sum(-1)) - z[..., 0]  # [B, P]; every window here has n >= 2
  assert int(count) == 9
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5)


def test_experiment_runs_the_ranking_task(tmp_path):
  """config.task="ranking" trains on impressions and tables every compressor's GAUC."""
  import importlib.util
  from pathlib import Path

  from malloc_jax.experiment import ranking_sampler, train_and_evaluate

  path = Path(__file__).parents[1] / "configs" / "ranking_synthetic.py"
  spec = importlib.util.spec_from_file_location("ranking_synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal=True,steps=2")
  config.eval.max_users = 16
  res = train_and_evaluate(config, str(tmp_path), print_fn=lambda *_: None)
  rows = {r["method"]: r for r in res["rows"]}
  assert res["task"] == "ranking" and set(rows) == {"native", "h2o_8x", "streaming_8x"}
  assert rows["native"]["dGAUC"] == 0.0
  assert rows["streaming_8x"]["bytes_per_user"] < rows["native"]["bytes_per_user"]
  for r in rows.values():
    assert 0.0 <= r["GAUC"] <= 1.0 and 0.0 <= r["NDCG@10"] <= 1.0
  config.task = "bogus"
  with pytest.raises(ValueError, match="task='bogus'"):
    ranking_sampler(config, None)


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_tied_query_key_init(name):
  """After tying, a token's query and key are one vector: q·k of a token with itself = |q|^2."""
  from malloc_jax.train import tie_query_key_init

  model = make(name)
  tie_query_key_init(model)
  layer = model.layers[0]
  x = jax.random.normal(jax.random.key(0), (5, 16))
  y = (layer.qkv if name == "sasrec" else layer.uvqk)(layer.ln1(x) if name == "sasrec"
                                                        else layer.ln(x))
  if name == "sasrec":
    q, k = y[:, :16], y[:, 16:32]
  else:
    a, w = 2 * layer.heads * layer.dv, layer.heads * layer.dqk
    q, k = y[:, a:a + w], y[:, a + w:a + 2 * w]
  np.testing.assert_array_equal(np.asarray(q), np.asarray(k))
  if name == "hstu":
    tie_query_key_init(model, score_offset=-3.0)
    np.testing.assert_array_equal(np.asarray(layer.rab_pos[...]), -3.0)
    # qk_scale: the query and key pre-activations are both `scale` times the untied query's.
    fresh = make(name)
    lin = fresh.layers[0].uvqk
    w0, b0 = np.asarray(lin.kernel[...]).copy(), np.asarray(lin.bias[...]).copy()
    tie_query_key_init(fresh, qk_scale=2.5)
    xn = np.asarray(fresh.layers[0].ln(x))
    got = xn @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])
    want_q = 2.5 * (xn @ w0[:, a:a + w] + b0[a:a + w])
    np.testing.assert_allclose(got[:, a:a + w], want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, a + w:a + 2 * w], want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, :a], xn @ w0[:, :a] + b0[:a], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no qkv/uvqk"):
    tie_query_key_init(make("hstu_rwkv"))


@pytest.mark.parametrize("name", ["hstu_gqa", "hstu_mqa", "sasrec_gqa", "sasrec_mqa", "hstu",
                                  "sasrec"])
def test_tied_query_key_init_with_shared_key_heads(name):
  """With head sharing the key head g the layer itself computes (its ``step``, returned as the
  new tokens' keys) equals the query of head g * H / G, the first of its group, computed
  from the layer's projection; the value columns are untouched. (An earlier version tied
  columns by the native layout and so tied nothing for HSTU-GQA/MQA.)"""
  from malloc_jax.train import tie_query_key_init

  model = make(name)
  layer = model.layers[0]
  lin = layer.qkv if hasattr(layer, "qkv") else layer.uvqk
  before = np.asarray(lin.kernel[...]).copy()
  tie_query_key_init(model)
  H = layer.heads
  G = getattr(layer, "kv_heads", H)
  x = jax.random.normal(jax.random.key(1), (1, 3, 16))
  pos = jnp.arange(3)[None]
  empty = model.empty_cache(1)
  _, k, v, *_ = layer.step(x, pos, pos * 10, jnp.ones((1, 3), bool), empty.k[0], empty.v[0],
                           empty.pos[0], empty.ts[0])
  k = np.asarray(k)  # [1, G, 3, dk] as the layer computes it
  if hasattr(layer, "qkv"):
    dq = layer.dh
    q = np.asarray(layer.qkv(layer.ln1(x)))[..., :H * dq]  # SASRec: no activation
  else:
    dq = layer.dqk
    h = np.asarray(jax.nn.silu(layer.uvqk(layer.ln(x))))
    q0 = (H + G) * layer.dv
    q = h[..., q0:q0 + H * dq]
  q = q.reshape(1, 3, H, dq).transpose(0, 2, 1, 3)  # [1, H, 3, dq]
  assert k.shape[1] == G
  for g in range(G):
    np.testing.assert_allclose(k[0, g], q[0, g * (H // G)], rtol=1e-6, atol=1e-6)
  # Exactly the key columns changed (qk_scale 1: the query columns keep their values).
  after = np.asarray(lin.kernel[...])
  k0 = H * dq if hasattr(layer, "qkv") else (H + G) * layer.dv + H * dq
  changed = np.flatnonzero(np.any(after != before, axis=0))
  np.testing.assert_array_equal(changed, np.arange(k0, k0 + G * dq))


@pytest.mark.parametrize("name", ["hstu", "hstu_gqa", "hstu_mqa", "hstu_mla", "hstu_lsh"])
def test_top_layer_rows_equal_the_full_pass(name):
  """``_run_tokens(last_rows=r)`` (the top layer computes only the last r queries: HSTU and
  its per-event-cache variants) equals the last r rows of the full pass, keys and values of
  every layer included."""
  model = make(name)
  items, ts, length = _windows()
  B, N = 3, items.shape[1] - 1
  cands = jnp.asarray(np.random.default_rng(6).integers(1, NUM_ITEMS + 1, (B, 6)), jnp.int32)
  tok = jnp.concatenate([items[:, :N], cands], axis=1)
  valid = jnp.arange(N)[None] < jnp.minimum(length, N)[:, None]
  q_pos = jnp.concatenate([jnp.where(valid, jnp.arange(N)[None], -1),
                           jnp.broadcast_to(jnp.array([[5, 5, 9, 9, 2, 2]]), (B, 6))], axis=1)
  q_ts = jnp.concatenate([jnp.where(valid, ts[:, :N], 0), jnp.tile(ts[:, 4:5], (1, 6))], 1)
  q_valid = jnp.concatenate([valid, jnp.ones((B, 6), bool)], axis=1)
  iso = jnp.concatenate([jnp.zeros((B, N), bool), jnp.ones((B, 6), bool)], axis=1)
  run = jax.jit(lambda m, r: m._run_tokens(m.empty_cache(B), tok, q_pos, q_ts, q_valid,
                                           None, iso, last_rows=r), static_argnums=1)
  full_x, full_k, full_v, *_ = run(model, None)
  for r in (6, 1, N + 6):
    x, k, v, attn, _ = run(model, r)
    assert x.shape == (B, r, 16) and attn is None
    np.testing.assert_allclose(np.asarray(x), np.asarray(full_x[:, -r:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(full_k))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(full_v))


def test_bias_lr_scale_moves_only_the_rab_tables_faster():
  """Adam's first step moves each parameter by lr · sign(g) (closed form: m̂ = g, v̂ = g²);
  ``bias_lr_scale`` multiplies that step for HSTU's rab tables only."""
  from flax import nnx

  from malloc_jax.train import make_optimizer

  model = make("hstu")
  _, params, _ = nnx.split(model, nnx.Param, ...)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)  # global norm < clip
  for scale in (1.0, 7.0):
    tx = make_optimizer(1e-2, 0.0, bias_lr_scale=scale)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    for path, u in flat:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      want = 1e-2 * (scale if ("rab_pos" in name or "rab_time" in name) else 1.0)
      np.testing.assert_allclose(np.asarray(u), -want, rtol=1e-4, err_msg=name)
