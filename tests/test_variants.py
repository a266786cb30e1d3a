"""Trained memory-efficient variants (issue 4): serving equals the full forward pass, reductions
to the native models, bytes of fixed-size memories, independent references of the cores, and
that every variant config builds and differentiates."""

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from malloc_jax import compressors
from malloc_jax.config_validation import validate_config
from malloc_jax.experiment import build_model
from malloc_jax.models import BACKBONES, Events, make_model
from malloc_jax.models.variants import BlockRecommender, FixedState
from malloc_jax.models.variants.common import rope
from malloc_jax.models.variants.recurrent import ssd_block, wkv_scan
from malloc_jax.models.variants.sequence import linformer_block
from malloc_jax.train import sampled_softmax_loss
from tests.helpers import VARIANT_OPTIONS, random_events, take

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS, DIM, HEADS, LAYERS, MAX_LEN = 40, 16, 2, 2, 32
VARIANTS = VARIANT_OPTIONS
FIXED = ["hstu_linformer", "hstu_longformer", "hstu_rwkv", "hstu_linear"]
LENGTHS = [20, 11, 3, 1, 17]
BIASES = ("rab_pos", "rab_time", "row_bias", "global_in_bias", "global_out_bias")


def variant(name, seed=0, **overrides):
  """A variant with dropout off and its zero-initialized biases randomized."""
  kw = dict(dim=DIM, heads=HEADS, num_layers=LAYERS, max_len=MAX_LEN, dropout=0.0)
  kw.update(VARIANTS.get(name, {}), **overrides)
  model = make_model(name, NUM_ITEMS, seed=seed, **kw)
  rng = np.random.default_rng(seed + 1)
  for layer in model.layers:
    for attr in BIASES:
      if hasattr(layer, attr):
        p = getattr(layer, attr)
        p[...] = jnp.asarray(rng.normal(0, 0.5, p[...].shape), jnp.float32)
  return model


def abstract_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _l2(x):
  return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


# Compiled without LLVM optimizations: half the compile time, same float32 semantics.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


@jax.jit(**FAST)
def _serve_all(model, events, p1, p2, p3):
  """Full forward; prefill p1, encode and extend p2, score p3; the native compressor's view."""
  full = model(events)
  memory, _ = model.prefill(p1)
  h2 = model.encode(memory, p2)
  memory, _ = model.extend(memory, p2)
  logits = model.score(memory, p3)
  comp = compressors.native()
  stored, _ = comp.compress(memory, comp.init(memory), None)
  view = stored.materialize()
  back = model._as_memory(view) if isinstance(model, BlockRecommender) else view
  return full, h2, logits, memory, stored, back


@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_serving_equals_full_forward(name):
  """prefill + an uneven extend + score equal the variant's own full forward (1e-5)."""
  model = variant(name, seed=3)
  ev = random_events(5, 20, LENGTHS, num_items=NUM_ITEMS, seed=4)
  n = np.asarray(LENGTHS)
  c1 = n // 3
  c2 = np.maximum(n - 1 - np.arange(5) % 2, c1)  # requests of 1 or 2 events
  full, h2, logits, memory, stored, back = jax.device_get(
      _serve_all(model, ev, take(ev, 0 * n, c1), take(ev, c1, c2), take(ev, c2, n)))
  for u in range(5):
    np.testing.assert_allclose(h2[u, : c2[u] - c1[u]], full[u, c1[u]:c2[u]], atol=1e-5, rtol=0)
  # score(): cosine similarity (logits · temperature) of the last state within 1e-5
  ref = _l2(full[np.arange(5), n - 1]) @ np.asarray(model.item_embeddings()).T
  np.testing.assert_allclose(logits[:, 1:] * model.temperature, ref[:, 1:], atol=1e-5, rtol=0)
  assert np.all(np.isneginf(logits[:, 0]))
  np.testing.assert_array_equal(np.asarray(memory.length), c2)  # the request is not stored
  # the native compressor passes every variant's memory through unchanged, bytes included
  for a, b in zip(jax.tree.leaves(memory), jax.tree.leaves(back), strict=True):
    np.testing.assert_array_equal(a, b)
  if isinstance(memory, FixedState):
    assert compressors.nbytes(stored) == compressors.nbytes(memory)
  _check_layout(name, model, memory, c2)


def _check_layout(name, model, memory, n):
  """Closed-form slot layouts of the variants that lay out their own Cache."""
  if name == "hstu_longformer":
    G, W = model.num_global, model.window
    pos = np.asarray(memory.pos)  # [L, B, H, G + W]
    assert pos.shape[-1] == G + W and (pos[..., :G] == -1).all()
    for u in range(len(n)):
      expect = np.arange(n[u] - W, n[u])
      assert (pos[:, u, :, G:] == np.where(expect >= 0, expect, -1)).all()
  if name == "hstu_beacon":
    C, nb = model.chunk, model.beacons
    pos = np.asarray(memory.pos)
    for u in range(len(n)):
      full_chunks = n[u] // C
      expect = np.concatenate([np.repeat(np.arange(full_chunks) * C + C - 1, nb),
                               np.arange(full_chunks * C, n[u])])
      got = pos[:, u, :]
      assert (got[..., : len(expect)] == expect).all() and (got[..., len(expect):] == -1).all()


@pytest.mark.parametrize("name", FIXED)
def test_fixed_memory_bytes_do_not_grow_with_history(name):
  """Per-user bytes at 128 and 4096 events are equal and match the closed form."""
  model = variant(name)

  def memory_at(n):
    ev = Events(jax.ShapeDtypeStruct((2, n), jnp.int32), jax.ShapeDtypeStruct((2, n), jnp.int32),
                jax.ShapeDtypeStruct((2,), jnp.int32))
    return jax.eval_shape(lambda m, e: m.prefill(e)[0], model, ev)

  b128, b4096 = abstract_bytes(memory_at(128)) / 2, abstract_bytes(memory_at(4096)) / 2
  assert b128 == b4096
  H, dqk, dv = model.head_dims()
  closed = {  # float32 state + int32 length (+ int32 pos, ts per Longformer slot)
      "hstu_linformer": lambda: LAYERS * H * model.k_proj * (dqk + dv) * 4 + 4,
      "hstu_longformer": lambda: LAYERS * H * (model.num_global + model.window) * (
          (dqk + dv) * 4 + 8) + 4,
      "hstu_rwkv": lambda: LAYERS * (DIM + 3 * model.channels) * 4 + 4,
      "hstu_linear": lambda: LAYERS * H * dqk * dv * 4 + 4,
  }[name]()
  assert b128 == closed


def test_mla_bytes_per_event():
  """MLA stores (kv_rank + rope_dim) floats per event and layer, plus the index."""
  kv_rank, rope_dim, n = 6, 4, 24
  model = variant("hstu_mla", kv_rank=kv_rank, rope_dim=rope_dim)
  ev = Events(jax.ShapeDtypeStruct((3, n), jnp.int32), jax.ShapeDtypeStruct((3, n), jnp.int32),
              jax.ShapeDtypeStruct((3,), jnp.int32))
  comp = compressors.native()
  stored = jax.eval_shape(
      lambda m, e: comp.compress(m.prefill(e)[0], compressors.EmptyState(), None)[0], model, ev)
  kv_bytes = abstract_bytes((stored.k, stored.v)) / 3 / n
  assert kv_bytes == (kv_rank + rope_dim) * 4 * LAYERS
  index_bytes = abstract_bytes(stored.index) / 3
  assert index_bytes == n * 4 + 4  # int32 timestamp per event, int32 length per user
  no_rope = jax.eval_shape(lambda m, e: m.prefill(e)[0], variant("hstu_mla", rope_dim=0), ev)
  assert no_rope.v.shape == (LAYERS, 3, 1, n, 0)


# ---------------------------------------------------------------------------------------
# Reductions to the native models (same parameters -> same outputs)


_forward = jax.jit(lambda model, events: model(events), **FAST)


def _assert_same_outputs(ref, model, atol=1e-6):
  ev = random_events(5, 20, LENGTHS, num_items=NUM_ITEMS, seed=5)
  np.testing.assert_allclose(np.asarray(_forward(model, ev)), np.asarray(_forward(ref, ev)),
                             atol=atol, rtol=0)


@pytest.mark.parametrize("native, name, heads, kv_heads", [
    ("hstu", "hstu_gqa", 2, 2), ("hstu", "hstu_mqa", 1, 1), ("sasrec", "sasrec_gqa", 2, 2)])
def test_gqa_and_mqa_reduce_to_native(native, name, heads, kv_heads):
  ref = variant(native, seed=1, heads=heads)
  kw = {} if name.endswith("mqa") else dict(kv_heads=kv_heads)
  model = variant(name, seed=2, heads=heads, **kw)
  nnx.update(model, nnx.state(ref))
  _assert_same_outputs(ref, model)


def test_longformer_with_window_covering_history_is_native_hstu():
  ref = variant("hstu", seed=1)
  model = variant("hstu_longformer", seed=2, window=MAX_LEN)
  nnx.update(model, nnx.state(ref))  # window and global parameters keep their values
  _assert_same_outputs(ref, model, atol=1e-5)


def test_beacon_with_chunk_longer_than_history_is_native_hstu():
  ref = variant("hstu", seed=1)
  model = variant("hstu_beacon", seed=2, chunk=MAX_LEN)
  nnx.update(model, nnx.state(ref))
  _assert_same_outputs(ref, model, atol=1e-5)


def test_lsh_with_a_single_bucket_is_hstu_with_shared_query_key():
  """Zero rotations hash every key to bucket 0: plain HSTU attention with K = Q."""
  model = variant("hstu_lsh", seed=2)
  ref = variant("hstu", seed=1)
  H, dqk, dv = model.head_dims()
  for lm, lr in zip(model.layers, ref.layers):
    lm.rotations[...] = jnp.zeros_like(lm.rotations[...])
    w, b = lm.uvq.kernel[...], lm.uvq.bias[...]
    q_cols = slice(2 * H * dv, 2 * H * dv + H * dqk)
    lr.uvqk.kernel[...] = jnp.concatenate([w, w[:, q_cols]], axis=1)
    lr.uvqk.bias[...] = jnp.concatenate([b, b[q_cols]])
    for attr in ("ln", "ln_attn", "out"):
      nnx.update(getattr(lr, attr), nnx.state(getattr(lm, attr)))
    for attr in ("rab_pos", "rab_time"):
      getattr(lr, attr)[...] = getattr(lm, attr)[...]
  ref.item_emb.embedding[...] = model.item_emb.embedding[...]
  ref.pos_emb.embedding[...] = model.pos_emb.embedding[...]
  _assert_same_outputs(ref, model, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Independent references (float64 NumPy, written from the papers' definitions)


def test_wkv_scan_matches_direct_formula():
  rng = np.random.default_rng(0)
  B, m, C = 2, 9, 3
  k, v = rng.normal(0, 2, (B, m, C)), rng.normal(0, 1, (B, m, C))
  w, u = np.exp(rng.normal(0, 1, C)), rng.normal(0, 1, C)
  valid = np.ones((B, m), bool)
  state0 = (np.zeros((B, C)), np.zeros((B, C)), np.full((B, C), -1e38))
  f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]
  # the block in two pieces (the second continues from the first's state)
  o1, s = wkv_scan(*f32(k[:, :4], v[:, :4], w, u), jnp.asarray(valid[:, :4]), tuple(f32(*state0)))
  o2, _ = wkv_scan(*f32(k[:, 4:], v[:, 4:], w, u), jnp.asarray(valid[:, 4:]), s)
  got = np.concatenate([o1, o2], axis=1)
  ref = np.zeros((B, m, C))
  for t in range(m):
    num = np.exp(u + k[:, t]) * v[:, t]
    den = np.exp(u + k[:, t])
    for i in range(t):
      e = np.exp(-(t - 1 - i) * w + k[:, i])
      num, den = num + e * v[:, i], den + e
    ref[:, t] = num / den
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_ssd_block_matches_sequential_recurrence():
  rng = np.random.default_rng(1)
  B, H, m, dk, dv = 2, 2, 7, 3, 4
  q, k, v = rng.normal(size=(B, H, m, dk)), rng.normal(size=(B, H, m, dk)), rng.normal(
      size=(B, H, m, dv))
  log_a = -rng.uniform(0, 1, (B, H, m))
  kv0 = rng.normal(size=(B, H, dk, dv))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o, kv = ssd_block(f32(q), f32(k), f32(v), f32(log_a), f32(kv0))
  s, ref = kv0.copy(), np.zeros((B, H, m, dv))
  for t in range(m):
    s = np.exp(log_a[:, :, t])[..., None, None] * s + np.einsum("bhd,bhe->bhde", k[:, :, t],
                                                                v[:, :, t])
    ref[:, :, t] = np.einsum("bhd,bhde->bhe", q[:, :, t], s)
  np.testing.assert_allclose(np.asarray(o), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(kv), s, atol=1e-5)


def test_linformer_block_matches_explicit_projection():
  rng = np.random.default_rng(2)
  B, H, m, kp, dk, dv = 2, 2, 6, 3, 4, 5
  q, k, v = rng.normal(size=(B, H, m, dk)), rng.normal(size=(B, H, m, dk)), rng.normal(
      size=(B, H, m, dv))
  e, f = rng.normal(size=(B, kp, m)), rng.normal(size=(B, kp, m))
  bias, ek0, fv0 = rng.normal(size=(H, kp)), rng.normal(size=(B, H, kp, dk)), rng.normal(
      size=(B, H, kp, dv))
  valid = np.ones((B, m), bool)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  o, ek, fv = linformer_block(*map(f32, (q, k, v, e, f, bias, ek0, fv0)), jnp.asarray(valid))
  silu = lambda x: x / (1 + np.exp(-x))
  ref = np.zeros((B, H, m, dv))
  for t in range(m):
    pk = ek0 + np.einsum("bri,bhid->bhrd", e[:, :, : t + 1], k[:, :, : t + 1])
    pv = fv0 + np.einsum("bri,bhid->bhrd", f[:, :, : t + 1], v[:, :, : t + 1])
    a = silu(np.einsum("bhd,bhrd->bhr", q[:, :, t], pk) + bias) / kp
    ref[:, :, t] = np.einsum("bhr,bhrd->bhd", a, pv)
  np.testing.assert_allclose(np.asarray(o), ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ek), pk, atol=1e-5)
  np.testing.assert_allclose(np.asarray(fv), pv, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(3)
  q, k = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32), jnp.asarray(
      rng.normal(size=(1, 8)), jnp.float32)
  score = lambda i, j: float(jnp.sum(rope(q, jnp.array([i])) * rope(k, jnp.array([j]))))
  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(8, 3), abs=1e-3)


# ---------------------------------------------------------------------------------------
# Configs: every variant trains through the main command's config


CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("hstu_*.py"))


def _load_config(stem, arg):
  spec = importlib.util.spec_from_file_location(stem, ROOT / "configs" / f"{stem}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_every_variant_has_a_config():
  names = {_load_config(stem, "runlocal=True").model.name for stem in CONFIGS}
  assert {n for n in BACKBONES if n.startswith("hstu_")} <= names


@pytest.mark.parametrize("stem", CONFIGS)
def test_config_validates_builds_and_differentiates(stem):
  config = _load_config(stem, "runlocal=True")
  validate_config(config)
  model = build_model(config, num_items=50)
  N = config.data.max_len + 1
  items = jax.ShapeDtypeStruct((4, N), jnp.int32)
  length = jax.ShapeDtypeStruct((4,), jnp.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, items, ts, length, key):
    m = nnx.merge(graphdef, params, rest)
    return sampled_softmax_loss(m, items, ts, length, key, 8, dropout=True)[0]

  grads = jax.eval_shape(jax.grad(loss), params, items, items, length, jax.random.key(0))
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("name", ["hstu", "sasrec", *VARIANTS])
def test_trimmed_training_window_gives_the_full_window_loss(name):
  """Length bucketing trims a batch's windows to a shorter static width; the loss (dropout
  off, full softmax) must equal the one over the full window, for every backbone."""
  model = variant(name)
  ev = random_events(5, MAX_LEN + 1, [9, 12, 3, 1, 12], NUM_ITEMS, seed=3)
  loss_fn = jax.jit(sampled_softmax_loss, static_argnums=(5, 6))
  full, n_full = loss_fn(model, ev.items, ev.ts, ev.length, jax.random.key(0), 0, False)
  for width in (13, 21):
    loss, n = loss_fn(model, ev.items[:, :width], ev.ts[:, :width], ev.length,
                      jax.random.key(0), 0, False)
    assert int(n) == int(n_full)
    np.testing.assert_allclose(float(loss), float(full), rtol=2e-5, err_msg=f"width {width}")
