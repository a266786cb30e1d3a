"""Streaming protocol: native streaming equals one-shot; r = 1 equals one-shot for every method.

The protocol code runs eagerly around a few compiled pieces (the model's ``prefill`` /
``extend``, each compressor's ``compress``, ``materialize`` and ``score``), which are shared
by the one-shot and the streaming paths: compiling each pair of paths whole would take
minutes on two CPU cores.
"""

import jax
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.evaluate import split_request
from malloc_jax.streaming import split_chunks, stream_memory
from tests.helpers import random_events, random_model

B, N, V = 3, 24, 40
LENGTHS = [24, 17, 6]


class _JittedModel:
  """The model with jitted ``prefill`` / ``extend`` (what ``stream_memory`` calls)."""

  def __init__(self, model):
    self.model = model
    self.prefill = jax.jit(model.prefill, static_argnums=1)
    self.extend = jax.jit(model.extend, static_argnums=2)
    self.empty_cache = model.empty_cache


_materialize = jax.jit(lambda memory: memory.materialize())  # compiles once per memory type
_score = jax.jit(lambda model, cache, req: model.score(cache, req))  # once per capacity


def score_memory(model, memory, req):
  return _score(model, _materialize(memory), req)


class Setup:
  """A model, histories split into prefix and request, the prefilled cache and compressors."""

  def __init__(self, name, seed):
    self.model = random_model(name, V, max_len=N)
    self.fast = _JittedModel(self.model)
    ev = random_events(B, N, LENGTHS, V, seed=seed)
    self.prefix, self.req = split_request(ev.items, ev.ts, ev.length, 1)
    self.cache, self.signals = self.fast.prefill(self.prefix, 4)

  def one_shot(self, comp):
    memory, _ = comp.compress(self.cache, comp.init(self.cache), self.signals)
    return score_memory(self.model, memory, self.req), memory

  def streamed(self, comp, r):
    memory, _ = stream_memory(self.fast, self.prefix, comp, r, window=4)
    return score_memory(self.model, memory, self.req), memory


def _jitted(comp):
  return C.Compressor(comp.init, jax.jit(comp.compress))  # shared by both protocols


@pytest.fixture(scope="module")
def hstu():
  s = Setup("hstu", seed=2)
  shape = C.CacheShape.of(s.cache)  # every registered method, built from its spec's example
  def caches(spec):  # calibration items: (cache, signals) pairs where the spec reads signals
    item = (s.cache, s.signals) if spec.calibration_signals else s.cache
    return lambda: [item]
  comps = {name: C.build_compressor(name, dict(spec.example), shape, caches=caches(spec))
           for name, spec in C.specs().items()}
  comps["h2o"] = C.h2o(heavy=4, recent=4)  # the budget the eviction test below expects
  comps["chain"] = C.chain(C.snapkv(12, window=4), C.uniform(bits=8))
  s.comps = {k: _jitted(c) for k, c in comps.items()}
  return s


def test_split_chunks_covers_each_history_in_order():
  ev = random_events(B, N, LENGTHS, V)
  ch = split_chunks(ev, 4)
  assert ch.items.shape == (4, B, 6)
  for b, n in enumerate(LENGTHS):
    lens = np.asarray(ch.length[:, b])
    assert lens.sum() == n and lens.max() - lens.min() <= 1
    got = np.concatenate([np.asarray(ch.items[j, b, :lens[j]]) for j in range(4)])
    np.testing.assert_array_equal(got, np.asarray(ev.items[b, :n]))


def test_one_request_equals_one_shot_for_every_compressor(hstu):
  for label, comp in hstu.comps.items():
    ref, ref_mem = hstu.one_shot(comp)
    got, mem = hstu.streamed(comp, 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5,
                               err_msg=label)
    assert C.bytes_per_user(mem) == C.bytes_per_user(ref_mem), label


def _check_native(setup, comp, r):
  ref, ref_mem = setup.one_shot(comp)
  got, mem = setup.streamed(comp, r)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert C.bytes_per_user(mem) == C.bytes_per_user(ref_mem)  # same capacity, same bytes
  a, b = ref_mem.materialize(), mem.materialize()
  np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
  valid = np.asarray(a.pos) >= 0
  np.testing.assert_allclose(np.asarray(a.k)[valid], np.asarray(b.k)[valid], rtol=1e-5,
                             atol=1e-5)
  # the native memory keeps growing: it holds every event of the prefix
  np.testing.assert_array_equal(np.asarray(b.fill), np.array(LENGTHS) - 1)


def test_native_streaming_equals_one_shot_hstu(hstu):
  _check_native(hstu, hstu.comps["native"], 4)


def test_native_streaming_equals_one_shot_sasrec():
  _check_native(Setup("sasrec", seed=1), _jitted(C.native()), 7)


def test_streaming_eviction_keeps_budget_and_changes_the_memory(hstu):
  """With r > 1 H2O re-compresses after every request: capacity stays at the budget and the
  kept set differs from the one-shot choice (error accumulates)."""
  comp = hstu.comps["h2o"]
  _, one = hstu.one_shot(comp)
  _, mem = hstu.streamed(comp, 4)
  kept = np.asarray(mem.materialize().pos)
  assert kept.shape[-1] == 8 and (kept >= 0).sum(-1).max() == 8
  assert not np.array_equal(np.sort(kept, -1), np.sort(np.asarray(one.materialize().pos), -1))
  np.testing.assert_array_equal(np.asarray(mem.index.length), np.array(LENGTHS) - 1)
