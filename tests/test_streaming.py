"""Streaming protocol: native streaming equals one-shot; r = 1 equals one-shot for every method."""

import jax
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.evaluate import split_request
from malloc_jax.streaming import split_chunks, stream_memory
from tests.helpers import random_events, random_model

B, N, V = 3, 24, 40
LENGTHS = [24, 17, 6]


def _one_shot(model, ev, comp):
  prefix, req = split_request(ev.items, ev.ts, ev.length, 1)
  cache, signals = model.prefill(prefix, 4)
  memory, _ = comp.compress(cache, comp.init(cache), signals)
  return model.score(memory.materialize(), req), memory


def _streamed(model, ev, comp, r):
  prefix, req = split_request(ev.items, ev.ts, ev.length, 1)
  memory, _ = stream_memory(model, prefix, comp, r, window=4)
  return model.score(memory.materialize(), req), memory


one_shot = jax.jit(_one_shot, static_argnums=2)
streamed = jax.jit(_streamed, static_argnums=(2, 3))


def test_split_chunks_covers_each_history_in_order():
  ev = random_events(B, N, LENGTHS, V)
  ch = split_chunks(ev, 4)
  assert ch.items.shape == (4, B, 6)
  for b, n in enumerate(LENGTHS):
    lens = np.asarray(ch.length[:, b])
    assert lens.sum() == n and lens.max() - lens.min() <= 1
    got = np.concatenate([np.asarray(ch.items[j, b, :lens[j]]) for j in range(4)])
    np.testing.assert_array_equal(got, np.asarray(ev.items[b, :n]))


@pytest.mark.parametrize("name, r", [("hstu", 4), ("sasrec", 7)])
def test_native_streaming_equals_one_shot(name, r):
  model = random_model(name, V, max_len=N)
  ev = random_events(B, N, LENGTHS, V, seed=1)
  ref, ref_mem = one_shot(model, ev, C.native())
  got, mem = streamed(model, ev, C.native(), r)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert C.bytes_per_user(mem) == C.bytes_per_user(ref_mem)  # same capacity, same bytes
  # the native memory keeps growing: it holds every event of the prefix
  np.testing.assert_array_equal(np.asarray(mem.materialize().fill), np.array(LENGTHS) - 1)
  a, b = ref_mem.materialize(), mem.materialize()
  np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
  np.testing.assert_allclose(np.asarray(a.k)[np.asarray(a.pos) >= 0],
                             np.asarray(b.k)[np.asarray(b.pos) >= 0], rtol=1e-5, atol=1e-5)


def _compressors(model, ev):
  prefix, _ = split_request(ev.items, ev.ts, ev.length, 1)
  cache, _ = model.prefill(prefix, 4)
  bases = C.fit_lowrank([cache], 3)
  return {
      "native": C.native(), "h2o": C.h2o(heavy=4, recent=4), "snapkv": C.snapkv(8, window=4),
      "streaming": C.streaming(sinks=2, recent=6), "random": C.random(8, seed=3),
      "merge_evicted": C.merge_evicted(heavy=4, recent=4),
      "kivi": C.kivi(bits=2, group=4, residual=4), "intactkv": C.intactkv(bits=4),
      "uniform": C.uniform(bits=4), "lowrank": C.lowrank(bases),
      "chain": C.chain(C.snapkv(12, window=4), C.uniform(bits=8)),
  }


class _JittedModel:
  """The model with jitted ``prefill`` / ``extend``, so that the protocol code runs eagerly
  around a few compiled pieces (compiling every pair of paths whole would take minutes)."""

  def __init__(self, model):
    self.model = model
    self.prefill = jax.jit(model.prefill, static_argnums=1)
    self.extend = jax.jit(model.extend, static_argnums=2)
    self.empty_cache = model.empty_cache


_materialize = jax.jit(lambda memory: memory.materialize())  # compiles once per memory type
_score = jax.jit(lambda model, cache, req: model.score(cache, req))  # once per capacity
score_memory = lambda model, memory, req: _score(model, _materialize(memory), req)


def test_one_request_equals_one_shot_for_every_compressor():
  model = random_model("hstu", V, max_len=N)
  ev = random_events(B, N, LENGTHS, V, seed=2)
  fast = _JittedModel(model)
  prefix, req = split_request(ev.items, ev.ts, ev.length, 1)
  cache, signals = fast.prefill(prefix, 4)
  for label, comp in _compressors(fast, ev).items():
    comp = C.Compressor(comp.init, jax.jit(comp.compress))  # shared by both protocols
    ref_mem, _ = comp.compress(cache, comp.init(cache), signals)
    mem, _ = stream_memory(fast, prefix, comp, 1, window=4)
    np.testing.assert_allclose(np.asarray(score_memory(model, mem, req)),
                               np.asarray(score_memory(model, ref_mem, req)), rtol=1e-5,
                               atol=1e-5, err_msg=label)
    assert C.bytes_per_user(mem) == C.bytes_per_user(ref_mem), label


def test_streaming_eviction_keeps_budget_and_changes_the_memory():
  """With r > 1 H2O re-compresses after every request: capacity stays at the budget and the
  kept set differs from the one-shot choice (error accumulates)."""
  model = random_model("hstu", V, max_len=N)
  ev = random_events(B, N, [N] * B, V, seed=4)
  comp = C.h2o(heavy=3, recent=3)
  _, one = one_shot(model, ev, comp)
  _, mem = streamed(model, ev, comp, 4)
  assert mem.materialize().capacity == 6
  kept = np.asarray(mem.materialize().pos)
  assert (kept >= 0).sum(-1).max() == 6
  assert not np.array_equal(np.sort(kept, -1), np.sort(np.asarray(one.materialize().pos), -1))
  np.testing.assert_array_equal(np.asarray(mem.index.length), np.asarray(ev.length) - 1)
