"""Numerical and input edge cases, tried on purpose: each asserts the specific outcome."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.data.dataset import build_dataset
from malloc_jax.evaluate import evaluate
from tests.helpers import jit_prefill, jit_score, random_events, random_model, take


def _dataset(num_items=40, users=6, n=12, seed=0):
  rng = np.random.default_rng(seed)
  items = [rng.integers(1, num_items + 1, n).astype(np.int32) for _ in range(users)]
  ts = [np.arange(n) * 60 for _ in range(users)]
  return build_dataset("toy", items, ts, num_items, max_len=16)


def _poison(comp: C.Compressor, value: float) -> C.Compressor:
  """Wraps a compressor so that its stored keys of user 2 become ``value``."""

  def compress(cache, state, signals=None):
    memory, state = comp.compress(cache, state, signals)
    return memory.replace(k=memory.k.at[:, 2].set(value)), state

  return C.Compressor(comp.init, compress)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_memory_is_reported_not_averaged(value):
  model = random_model("hstu")
  data = _dataset()
  with pytest.raises(FloatingPointError, match="first user index 2"):
    evaluate(model, data.test, _poison(C.native(), value), batch_size=8)


def test_item_beyond_vocabulary_at_serving_is_named():
  model = random_model("hstu", num_items=40)
  data = _dataset(num_items=50)  # ids up to 50 but the model knows 40
  with pytest.raises(ValueError, match=r"outside the model's vocabulary 1\.\.40"):
    evaluate(model, data.test, C.native())


def test_empty_history_at_serving_is_named():
  model = random_model("hstu")
  data = _dataset()
  test = dataclasses.replace(data.test, length=data.test.length.copy())
  test.length[3] = 0
  with pytest.raises(ValueError, match="user index 3 has an empty history"):
    evaluate(model, test, C.native())


@pytest.mark.parametrize("comp", [C.uniform(bits=8), C.uniform(bits=4),
                                  C.kivi(bits=2, group=4, residual=4),
                                  C.intactkv(bits=4, pivots=2)],
                         ids=["uniform8", "uniform4", "kivi2", "intactkv4"])
@pytest.mark.parametrize("fill", [0.0, 0.75])
def test_constant_and_zero_caches_quantize_exactly(comp, fill):
  """Zero range (constant channels, all-zero caches) gives exact values, never NaN."""
  model = random_model("hstu")
  ev = random_events(3, 8, [8, 5, 2])
  cache, sig = jit_prefill(model, ev)
  valid = (cache.pos >= 0)[..., None]
  cache = cache.replace(k=jnp.where(valid, fill, 0.0), v=jnp.where(valid, fill, 0.0))
  mem, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
  dense = mem.materialize()
  k = np.asarray(dense.k)
  assert np.isfinite(k).all()
  np.testing.assert_allclose(k[np.asarray(dense.pos) >= 0], fill, atol=1e-6)


@pytest.mark.parametrize("comp, exact", [(C.native(), True), (C.h2o(heavy=3, recent=3), False),
                                         (C.snapkv(budget=6, window=3), False),
                                         (C.uniform(bits=8), False),
                                         (C.kivi(bits=4, group=4, residual=4), False)],
                         ids=["native", "h2o", "snapkv", "uniform8", "kivi4"])
def test_bfloat16_caches(comp, exact):
  """bfloat16 caches compress and serve with finite scores close to float32 ones."""
  model = random_model("hstu")
  n = np.array([10, 6, 3])
  ev = random_events(3, 10, n)
  cache, sig = jit_prefill(model, take(ev, 0 * n, n - 1))
  q = take(ev, n - 1, n)
  half = cache.replace(k=cache.k.astype(jnp.bfloat16), v=cache.v.astype(jnp.bfloat16))
  mem, _ = jax.jit(comp.compress)(half, comp.init(half), sig)
  got = np.asarray(jit_score(model, mem.materialize(), q))
  ref = np.asarray(jit_score(model, cache, q))
  assert np.isfinite(got[:, 1:]).all()
  if exact:  # only bfloat16 rounding of K and V (relative 2**-8) separates the two
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=0.5)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_histories_of_length_one_two_and_budget(n):
  """Eviction at budget 6 on histories of 1, 2 and exactly 6 events keeps them all."""
  model = random_model("hstu")
  ev = random_events(2, 8, [n, n])
  cache, sig = jit_prefill(model, ev)
  for comp in (C.h2o(heavy=3, recent=3), C.streaming(sinks=2, recent=4),
               C.snapkv(budget=6, window=1)):
    mem, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
    kept = np.sort(np.asarray(mem.materialize().pos)[0, 0, 0])
    np.testing.assert_array_equal(kept[kept >= 0], np.arange(n))
