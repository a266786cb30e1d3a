"""Quest in the ranking task: every request event and candidate reads only its own top pages.

References: a float64 NumPy forward of HSTU and SASRec over (request events, one candidate)
against the stored memory, each query's pages chosen by Quest's bound in float64; bytes read
by the closed form of ``quest_rank_read_bytes`` counted from that reference's selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.compressors.quest_pages import quest, quest_rank, quest_rank_read_bytes
from malloc_jax.models import make_model
from malloc_jax.serving import split_request
from tests.test_rank_target import NUM_ITEMS, _inputs, _prefill, make


def _np(x):
  return np.asarray(x, np.float64)


def _ln(mod, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * _np(mod.scale[...]) + _np(mod.bias[...])


def _lin(mod, x):
  return x @ _np(mod.kernel[...]) + _np(mod.bias[...])


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu(x):  # jax.nn.gelu's default tanh approximation
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _pages_of(ck, cpos, page):
  """{page: (min, max)} float64 channel bounds of one (layer, head) row's real pages."""
  real = np.flatnonzero(cpos >= 0)
  out = {}
  for p in sorted({i // page for i in real}):
    rows = ck[[i for i in real if i // page == p]]
    out[p] = (rows.min(0), rows.max(0))
  return out


def _choose(q, bounds, pages, extra=None):
  """Pages (sorted by bound desc, page asc) of one query; also the gap at the cut. ``extra``
  {page: the largest score bias over the page's real events} is added to the key bound."""
  ub = {p: float(np.sum(np.maximum(q * lo, q * hi))) + (extra[p] if extra else 0.0)
        for p, (lo, hi) in bounds.items()}
  order = sorted(ub, key=lambda p: (-ub[p], p))
  gap = np.inf if len(order) <= pages else ub[order[pages - 1]] - ub[order[pages]]
  return set(order[:pages]), gap


def _rab(layer, hh, qpos, qts, kp, kt):
  """float64 HSTU bias rab_pos[rel] + rab_time[bucket] of one query on slots (kp, kt)."""
  rel = np.clip(qpos - kp, 0, layer.max_len - 1)
  dt = np.maximum(np.abs(qts - kt), 1)
  bucket = np.clip(np.floor(np.log(dt) / 0.301), 0, layer.num_time_buckets - 1).astype(int)
  return _np(layer.rab_pos[...])[hh, rel] + _np(layer.rab_time[...])[hh, bucket]


def ref_rank(model, name, cache, b, req, cand, page, pages, with_bias=True):
  """float64 logits [C] of user b, chosen pages {(layer, head, token row): set} (row j < m:
  request event j, m + c: candidate c, as in ``rank``'s queries), min tie gap. With
  ``with_bias`` (HSTU) a page's bound adds the query's largest rab over the page's events.

  One forward per candidate over [request events; candidate]: the request events at
  positions start + j attend causally to one another, the candidate (position start + n_req,
  the last request time) to all of them and itself; each query reads the memory slots of its
  own chosen pages only.
  """
  ri, rt, rl = (np.asarray(x)[b] for x in (req.items, req.ts, req.length))
  start = int(np.asarray(cache.length)[b])
  ck, cv = np.asarray(cache.k, np.float64)[:, b], np.asarray(cache.v, np.float64)[:, b]
  cpos, cts = np.asarray(cache.pos)[:, b], np.asarray(cache.ts)[:, b]
  d, max_len = model.dim, model.max_len
  E, Pe = _np(model.item_emb.embedding[...]), _np(model.pos_emb.embedding[...])
  t_c = rt[rl - 1] if rl else 0
  logits, chosen, gap = [], {}, np.inf
  m = req.items.shape[1]
  for ci, c in enumerate(np.asarray(cand)[b]):
    items = np.concatenate([ri[:rl], [c]]).astype(int)
    pos = np.arange(start, start + rl + 1)
    ts = np.concatenate([rt[:rl], [t_c]]).astype(np.float64)
    n = len(items)
    x = E[items] * np.sqrt(d) + Pe[np.minimum(pos, max_len - 1)]
    for li, layer in enumerate(model.layers):
      H = layer.heads
      if name == "hstu":
        h = _silu(_lin(layer.uvqk, _ln(layer.ln, x)))
        dv, dq = layer.dv, layer.dqk
        u, v, q, k = np.split(h, [H * dv, 2 * H * dv, 2 * H * dv + H * dq], axis=-1)
      else:
        dq = dv = layer.dh
        q, k, v = np.split(_lin(layer.qkv, _ln(layer.ln1, x)), 3, axis=-1)
      q, k, v = (t.reshape(n, H, -1) for t in (q, k, v))
      o = np.zeros((n, H, dv))
      for hh in range(H):
        bounds = _pages_of(ck[li, hh], cpos[li, hh], page)
        for j in range(n):
          extra = None
          if name == "hstu" and with_bias:
            real = np.flatnonzero(cpos[li, hh] >= 0)
            r = _rab(layer, hh, pos[j], ts[j], cpos[li, hh, real], cts[li, hh, real])
            extra = {p: float(r[real // page == p].max()) for p in bounds}
          sel, g = _choose(q[j, hh], bounds, pages, extra)
          gap = min(gap, g)
          chosen[(li, hh, j if j < rl else m + ci)] = sel
          mem = [t for t in range(ck.shape[2]) if cpos[li, hh, t] >= 0 and t // page in sel]
          keys = np.concatenate([ck[li, hh, mem], k[:j + 1, hh]])
          vals = np.concatenate([cv[li, hh, mem], v[:j + 1, hh]])
          kp = np.concatenate([cpos[li, hh, mem], pos[:j + 1]])
          kt = np.concatenate([cts[li, hh, mem], ts[:j + 1]])
          s = keys @ q[j, hh]
          if name == "hstu":
            s = s + _rab(layer, hh, pos[j], ts[j], kp, kt)
            a = _silu(s) / max_len
          else:
            s = s / np.sqrt(dq)
            a = np.exp(s - s.max())
            a = a / a.sum()
          o[j, hh] = a @ vals
      o = o.reshape(n, H * dv)
      if name == "hstu":
        x = x + _lin(layer.out, u * _ln(layer.ln_attn, o))
      else:
        x = x + _lin(layer.out, o)
        x = x + _lin(layer.ff2, _gelu(_lin(layer.ff1, _ln(layer.ln2, x))))
    if name == "sasrec":
      x = _ln(model.final_ln, x)
    hc = x[-1]
    hn = hc / np.sqrt(np.sum(hc * hc) + 1e-6) * np.sqrt(d)
    logit = np.sum(hn * E[c]) + _lin(model.rank_head, hc)[0]
    logits.append(logit)
  return np.asarray(logits), chosen, gap


@jax.jit
def _native(model, memory, req, cands):
  return model.rank(memory.materialize(), req, cands)


_quest_jit = jax.jit(quest_rank, static_argnums=(4, 5))


def _setup(name, page, seed=0):
  model = make(name)
  hist, req, cands = _inputs(seed)
  cache = _prefill(model, hist)
  comp = quest(page)
  memory = jax.jit(lambda c: comp.compress(c, comp.init(c))[0])(cache)
  return model, cache, memory, req, cands


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@pytest.mark.parametrize("page", [4, 5])
def test_all_pages_equal_native_rank(name, page):
  model, _, memory, req, cands = _setup(name, page)
  P = memory.kmin.shape[3]
  native = np.asarray(_native(model, memory, req, cands))
  for pages in (P, P + 3):
    for with_bias in (True, False):
      got, chosen = _quest_jit(model, memory, req, cands, pages, with_bias)
      np.testing.assert_array_equal(np.asarray(got), native)  # bit for bit


@pytest.mark.parametrize("name,with_bias", [("hstu", True), ("hstu", False), ("sasrec", True)])
@pytest.mark.parametrize("page,pages", [(4, 1), (4, 2), (3, 2)])
def test_few_pages_match_float64_reference(name, with_bias, page, pages):
  """Logits and every query's pages against the float64 reference; HSTU with the bound of
  the whole score (q.k + rab, the default) and of q.k alone (``with_bias=False``)."""
  model, cache, memory, req, cands = _setup(name, page)
  got, chosen = _quest_jit(model, memory, req, cands, pages, with_bias)
  got, chosen = np.asarray(got), np.asarray(chosen)  # [B, C], [L, B, H, m + C, P]
  native = np.asarray(_native(model, memory, req, cands))
  differs = False
  for b in range(got.shape[0]):
    ref, ref_chosen, gap = ref_rank(model, name, cache, b, req, cands, page, pages, with_bias)
    assert gap > 1e-4, f"user {b}: near-tie of page bounds ({gap}); pick other inputs"
    np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-4)
    for (li, hh, row), sel in ref_chosen.items():
      assert set(np.flatnonzero(chosen[li, b, hh, row])) == sel, (b, li, hh, row)
    differs |= not np.allclose(got[b], native[b], atol=1e-3)
  assert differs  # the selection is not idle on these inputs


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("page,pages", [(4, 1), (3, 2), (4, 9)])
def test_read_bytes_closed_form(page, pages, with_bias):
  model, cache, memory, req, cands = _setup("hstu", page)
  _, chosen = _quest_jit(model, memory, req, cands, pages, with_bias)
  q_valid = np.concatenate([np.asarray(req.valid), np.ones(cands.shape, bool)], axis=1)
  per_query, union = quest_rank_read_bytes(memory, chosen, q_valid, with_bias)
  chosen = np.asarray(chosen)
  cpos = np.asarray(cache.pos)
  L, B, H, T = cpos.shape
  dk, dv = cache.k.shape[-1], cache.v.shape[-1]
  for b in range(B):
    bounds = sum(len({t // page for t in range(T) if cpos[li, b, hh, t] >= 0}) * 2 * dk * 4
                 for li in range(L) for hh in range(H))
    if with_bias:  # every stored event's time stamp (int32), once per user
      bounds += int((cpos[0, b, 0] >= 0).sum()) * 4
    merged = set()
    for j in range(q_valid.shape[1]):
      if not q_valid[b, j]:
        assert per_query[b, j] == 0
        continue
      events = 0
      for li in range(L):
        for hh in range(H):
          sel = set(np.flatnonzero(chosen[li, b, hh, j]))
          real = [t for t in range(T) if cpos[li, b, hh, t] >= 0 and t // page in sel]
          events += len(real)
          merged |= {(li, hh, t) for t in real}
      assert per_query[b, j] == bounds + events * (dk + dv) * 4
    assert union[b] == bounds + len(merged) * (dk + dv) * 4
    # A query never reads more than one full pass over the store.
    assert per_query[b].max() <= memory.stored_bytes()[b]


def test_refused_by_other_layers():
  for name in ("hstu_gqa", "sasrec_cla"):
    from tests.helpers import VARIANT_OPTIONS  # noqa: PLC0415
    model = make_model(name, NUM_ITEMS, dim=16, num_layers=2, max_len=32, dropout=0.0, seed=0,
                       **{"heads": 2, **VARIANT_OPTIONS[name]})
    hist, req, cands = _inputs()
    cache = _prefill(model, hist)
    with pytest.raises(ValueError, match="slot_select"):
      model.rank(cache, req, cands, slot_select=lambda i, q: jnp.ones(q.shape[:3] + (12,), bool))


def _eval_split(lengths, num_cands: int, seed: int):
  """(EvalSet, items, ts, length, candidates) of random histories of ``lengths`` (N = 14
  slots), each user's last event its target, and ``num_cands`` random candidates each."""
  from malloc_jax.data.dataset import EvalSet
  rng = np.random.default_rng(seed)
  length = np.asarray(lengths, np.int32)
  U, N = len(length), 14
  items = np.where(np.arange(N)[None] < length[:, None], rng.integers(1, NUM_ITEMS + 1, (U, N)),
                   0).astype(np.int32)
  ts = np.where(items > 0, np.cumsum(rng.integers(1, 4000, (U, N)), axis=1), 0).astype(np.int32)
  split = EvalSet(items=items, ts=ts, length=length, target=items[np.arange(U), length - 1],
                  target_ts=ts[np.arange(U), length - 1])
  cands = rng.integers(1, NUM_ITEMS + 1, (U, num_cands)).astype(np.int32)
  return split, items, ts, length, cands


def test_quest_rank_cell_all_pages_is_native_and_few_pages_match_one_batch():
  """``ranking.quest_rank_cell``: with every page read it ranks exactly as the native
  ``rank_cell``; with fewer pages its logits and bytes are those of one direct batch
  (``quest_rank``, checked against the float64 reference above)."""
  from malloc_jax import compressors as C
  from malloc_jax import ranking
  model = make("hstu")
  split, items, ts, length, cands = _eval_split([14, 9, 6, 12, 3], 6, seed=4)
  native = ranking.rank_cell(model, split, cands, C.native(), batch_size=4)
  full = ranking.quest_rank_cell(model, split, cands, page=4, pages=8, batch_size=4)
  np.testing.assert_allclose(full["logits"], native["logits"], rtol=1e-6, atol=1e-6)
  few = ranking.quest_rank_cell(model, split, cands, page=4, pages=1, batch_size=8)
  prefix, req = split_request(jnp.asarray(items), jnp.asarray(ts), jnp.asarray(length), 1)
  cache, _ = model.prefill(prefix, 8)
  comp = quest(4)
  memory = comp.compress(cache, comp.init(cache))[0]
  lg, chosen = _quest_jit(model, memory, req, jnp.asarray(cands), 1, True)
  np.testing.assert_allclose(few["logits"], np.asarray(lg), rtol=1e-5, atol=1e-5)
  assert not np.allclose(few["logits"], native["logits"], atol=1e-3)
  q_valid = np.concatenate([np.asarray(req.valid), np.ones(cands.shape, bool)], axis=1)
  per_query, union = quest_rank_read_bytes(memory, chosen, q_valid, True)
  assert few["read_per_candidate"] == pytest.approx(per_query[:, 1:].mean())
  assert few["read_union"] == pytest.approx(union.mean())
  assert few["bytes_per_user"] == pytest.approx(np.asarray(memory.stored_bytes()).mean())


@pytest.mark.parametrize("name", ["hstu_linformer", "hstu_rwkv", "hstu_linear", "hstu_beacon",
                                  "hstu_longformer"])
def test_rank_cell_serves_every_block_variant_with_its_bytes(name):
  """``ranking.rank_cell`` with the native memory of the block variants (the path of the
  ranking table's variant rows): it ranks as ``model.rank`` of the prefilled memory, and a
  fixed-size state's stored bytes (its Cache view after ``native()``) are the state's own:
  every leaf's bytes per user, as ``stored_bytes`` counts the state itself. (A view with no
  slot index used to crash the byte count.)"""
  from malloc_jax import compressors as C
  from malloc_jax import ranking
  from tests.helpers import VARIANT_OPTIONS
  model = make_model(name, NUM_ITEMS, dim=16, num_layers=2, max_len=32, dropout=0.0, seed=0,
                     **{"heads": 2, **VARIANT_OPTIONS.get(name, {})})
  split, items, ts, length, cands = _eval_split([14, 9, 6, 12], 5, seed=5)
  U = len(length)
  got = ranking.rank_cell(model, split, cands, C.native(), batch_size=4)
  prefix, req = split_request(jnp.asarray(items), jnp.asarray(ts), jnp.asarray(length), 1)
  state, _ = model.prefill(prefix, 8)
  want = np.asarray(model.rank(state, req, jnp.asarray(cands)))
  np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
  memory, _ = C.native().compress(state, C.native().init(state))
  stored = C.stored_bytes(memory)
  if name in ("hstu_linformer", "hstu_rwkv", "hstu_linear"):  # fixed-size states
    leaves = jax.tree.leaves(state)
    per_user = sum(x.size * x.dtype.itemsize for x in leaves) // U
    assert np.all(stored == per_user) and np.all(C.stored_bytes(state) == per_user)
  assert got["bytes_per_user"] > 0
