"""Numerical and input edge cases, tried on purpose: each asserts the specific outcome."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc_jax import compressors as C
from malloc_jax import config_lib
from malloc_jax.config_validation import validate_config
from malloc_jax.data import parsers
from malloc_jax.data.dataset import build_dataset
from malloc_jax.evaluate import evaluate
from malloc_jax.experiment import train_and_evaluate
from malloc_jax.models import Events
from tests.helpers import (
  jit_extend,
  jit_forward,
  jit_prefill,
  jit_score,
  jitted_compress,
  random_events,
  random_model,
  take,
)


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


# --------------------------------------------------------------------------------------------
# Data files: conventions that are not errors
# --------------------------------------------------------------------------------------------


def test_duplicate_events_are_kept_as_repeats(tmp_path):
  """Repeated (user, item, time) rows are repeat consumptions, kept in file order (the
  convention of the sequential-recommendation datasets); nothing is silently merged."""
  path = tmp_path / "u.data"
  path.write_text("1\t10\t3\t100\n1\t10\t3\t100\n1\t20\t3\t200\n1\t10\t3\t100\n")
  inter = parsers.parse_movielens_100k(path)
  items, ts = inter.sequence(0)
  assert inter.item_ids[items].tolist() == [10, 10, 10, 20]  # stable sort on time
  assert ts.tolist() == [100, 100, 100, 200]
  assert inter.skipped == {"short_users": 0, "short_user_events": 0}


def test_single_event_user_is_a_counted_skip(tmp_path, caplog):
  path = tmp_path / "u.data"
  path.write_text("1\t10\t3\t100\n1\t11\t3\t101\n1\t12\t3\t102\n2\t10\t3\t100\n")
  inter = parsers.parse_movielens_100k(path)
  assert inter.users.tolist() == [1]
  assert inter.skipped == {"short_users": 1, "short_user_events": 1}


def test_million_event_user_keeps_its_last_window(tmp_path):
  """A user with 10^6 events parses and keeps the last max_len events of each split."""
  n = 10**6
  t = np.arange(n, dtype=np.int64) * 7
  items = (np.arange(n) % 97) + 1
  lines = np.char.add(np.char.add("5\t", items.astype(str)), "\t3\t")
  big = "\n".join(np.char.add(lines, t.astype(str)).tolist())
  path = tmp_path / "u.data"
  path.write_text(big + "\n6\t1\t3\t1\n6\t2\t3\t2\n6\t3\t3\t3\n")
  inter = parsers.parse_movielens_100k(path)
  seqs = [inter.sequence(u) for u in range(len(inter))]
  assert sorted(len(s[0]) for s in seqs) == [3, n]
  data = build_dataset("big", [s[0] for s in seqs], [s[1] for s in seqs], inter.num_items, 16)
  u = int(np.flatnonzero(data.test.length == 16)[0])
  orig = inter.item_ids[data.test.items[u]]
  np.testing.assert_array_equal(orig, items[n - 17:n - 1])
  assert inter.item_ids[data.test.target[u]] == items[-1]


# --------------------------------------------------------------------------------------------
# Configs: each bad value names its field
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, field, needle", [
    (lambda c: c.compressors.update({"e": {"name": "h2o", "heavy": 40, "recent": 4}}),
     "compressors.e.heavy", "at most data.max_len=32"),
    (lambda c: c.compressors.update({"s": {"name": "snapkv", "budget": 64, "window": 4}}),
     "compressors.s.budget", "at most data.max_len=32"),
    (lambda c: c.compressors.update({"q": {"name": "kivi", "bits": 3}}),
     "compressors.q", "bits"),
    (lambda c: c.compressors.update({"q": {"name": "uniform", "bits": 5}}),
     "compressors.q", "bits"),
    (lambda c: c.compressors.update({"q": {"name": "uniform", "bitz": 8}}),
     "compressors.q", "bitz"),
    (lambda c: c.compressors.update({"l": {"name": "lowrank", "rank": 0, "reduction": 0}}),
     "compressors.l.reduction", "an integer in"),
    (lambda c: c.train.update(steps=-3), "train.steps", ">= 0"),
    (lambda c: c.train.update(batch_size=0), "train.batch_size", ">= 1"),
    (lambda c: c.model.update(dropout=1.5), "model.dropout", ""),
    (lambda c: c.eval.update(ks=(10, 0)), "eval.ks", "positive integers"),
    (lambda c: c.data.synthetic.update(kind="topic"), "data.synthetic.kind", "one of"),
    (lambda c: c.data.update(source="netflix"), "data.source", "one of"),
])
def test_more_bad_configs_name_the_field(mutate, field, needle):
  c = config_lib.base_config("runlocal=True")
  mutate(c)
  with pytest.raises(ValueError) as info:
    validate_config(c)
  msg = str(info.value)
  assert f"config.{field}" in msg and needle in msg, msg


# --------------------------------------------------------------------------------------------
# Compressors at the edges of the history length
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("comp, per_user", [
    (C.h2o(heavy=3, recent=3), True), (C.snapkv(budget=6, window=2), True),
    (C.streaming(sinks=2, recent=4), True), (C.random(budget=6), False),
    (C.merge_evicted(heavy=3, recent=3), True), (C.uniform(bits=4), True),
    (C.kivi(bits=2, group=4, residual=4), True), (C.intactkv(bits=4, pivots=2), True)],
    ids=["h2o", "snapkv", "streaming", "random", "merge", "uniform4", "kivi2", "intactkv4"])
def test_empty_history_in_a_batch_keeps_nothing_and_stays_finite(comp, per_user):
  """A user with no events next to users with some: the memory keeps no slot for them,
  nothing is NaN, and the other users' memories are those of a batch without them."""
  model = random_model("hstu")
  ev = random_events(3, 8, [8, 0, 5])
  cache, sig = jit_prefill(model, ev)
  mem, _ = jax.jit(comp.compress)(cache, comp.init(cache), sig)
  dense = mem.materialize()
  pos = np.asarray(dense.pos)
  assert (pos[:, 1] < 0).all()
  assert int(dense.length[1]) == 0
  assert np.isfinite(np.asarray(dense.k, np.float32)).all()
  assert np.isfinite(np.asarray(dense.v, np.float32)).all()
  rows = np.array([0, 2])
  ev2 = Events(ev.items[rows], ev.ts[rows], ev.length[rows])
  cache2, sig2 = jit_prefill(model, ev2)
  mem2, _ = jax.jit(comp.compress)(cache2, comp.init(cache2), sig2)
  if per_user:  # random draws per batch row, so its choice depends on the row index
    np.testing.assert_array_equal(pos[:, np.array([0, 2])], np.asarray(mem2.materialize().pos))


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_same_config_and_seed_give_bit_identical_metrics(tmp_path):
  config = config_lib.base_config("runlocal=True,steps=6")
  config.compressors.update({"kivi": {"name": "kivi", "bits": 2, "group": 8, "residual": 8}})
  a = train_and_evaluate(config, str(tmp_path / "a"), print_fn=lambda *a, **k: None)
  b = train_and_evaluate(config, str(tmp_path / "b"), print_fn=lambda *a, **k: None)
  rows_a = {r["method"]: r for r in a["rows"]}
  rows_b = {r["method"]: r for r in b["rows"]}
  assert set(rows_a) == {"popularity", "native", "kivi"}
  for m in rows_a:
    for key in ("NDCG@10", "HR@10", "MRR", "NDCG@200"):
      assert rows_a[m][key] == rows_b[m][key], (m, key)


# --------------------------------------------------------------------------------------------
# Crashes: SIGKILL during a checkpoint save
# --------------------------------------------------------------------------------------------

_SAVER = """
import sys
import numpy as np
from malloc_jax.checkpoint import TrainCheckpoints
store = TrainCheckpoints(sys.argv[1], max_to_keep=2)
start = (store.latest_step() or 0) + 1
for step in range(start, start + 10_000):
  store.save(step, {"w": np.full(1 << 21, step, np.float32), "b": np.arange(7) + step},
             {"step": step})
  if step == start:
    store.wait()
    print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.1])
def test_sigkill_during_checkpoint_saves_keeps_the_last_finished_step(tmp_path, delay):
  """A writer saving 8 MiB checkpoints back to back (async Orbax saves) is SIGKILLed at a
  random moment, most likely mid-save; the directory then restores the newest finished step
  with contents consistent with that step (never a mix, never an error), and saving goes on."""
  import subprocess
  import sys
  import time

  from malloc_jax.checkpoint import TrainCheckpoints

  directory = tmp_path / "ck"
  proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "saved"
  time.sleep(delay)
  proc.kill()
  proc.wait()
  store = TrainCheckpoints(directory)
  like = {"w": np.zeros(1 << 21, np.float32), "b": np.zeros(7, np.int64)}
  step, state, meta = store.restore(like)
  assert step >= 1 and meta == {"step": step}
  np.testing.assert_array_equal(state["w"], np.full(1 << 21, step, np.float32))
  np.testing.assert_array_equal(state["b"], np.arange(7) + step)
  store.save(step + 1, like, {"step": step + 1})
  store.wait()
  assert store.restore(like)[0] == step + 1
  store.close()


# --------------------------------------------------------------------------------------------
# Fuzzing: random batch sizes, history lengths, request splits and budgets through the serving
# path, against the full forward pass (native) and the native memory (full budgets)
# --------------------------------------------------------------------------------------------

_FUZZ_MODELS = {}


def _take_fixed(ev, start, stop, width):
  """Per-user slice [start_b, stop_b), right-padded to a fixed ``width`` (one compile)."""
  items, ts = np.zeros((len(start), width), np.int32), np.zeros((len(start), width), np.int32)
  for b, (i, j) in enumerate(zip(start, stop)):
    items[b, : j - i] = np.asarray(ev.items)[b, i:j]
    ts[b, : j - i] = np.asarray(ev.ts)[b, i:j]
  return Events(jnp.asarray(items), jnp.asarray(ts), jnp.asarray(stop - start, np.int32))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_serving_path_against_full_forward(data):
  """Random backbones, history lengths (including 1 event before the request), prefill /
  extend split points, seeds and eviction configurations; shapes are kept to one batch of 3 x
  16 so the examples share compiles (shape variety is covered by the compressors' hypothesis
  property tests)."""
  name = data.draw(st.sampled_from(["hstu", "sasrec"]), label="backbone")
  if name not in _FUZZ_MODELS:
    _FUZZ_MODELS[name] = random_model(name, seed=5)
  model = _FUZZ_MODELS[name]
  B, N = 3, 16
  n = np.array(data.draw(st.lists(st.integers(2, N), min_size=B, max_size=B), label="lengths"))
  cut = np.array([data.draw(st.integers(0, int(k) - 1), label="cut") for k in n])
  ev = random_events(B, N, n, seed=data.draw(st.integers(0, 99), label="seed"))
  full = np.asarray(jit_forward(model, ev))
  cache, _ = jit_prefill(model, _take_fixed(ev, 0 * n, cut, N))
  cache, _ = jit_extend(model, cache, _take_fixed(ev, cut, n - 1, N))
  req = _take_fixed(ev, n - 1, n, 1)
  got = np.asarray(jit_score(model, cache, req))
  h = full[np.arange(B), n - 1]
  h = h / np.sqrt((h ** 2).sum(-1, keepdims=True) + 1e-6)
  ref = h @ np.asarray(model.item_embeddings()).T / model.temperature
  np.testing.assert_allclose(got[:, 1:], ref[:, 1:], atol=1e-4, rtol=1e-5)
  # Eviction whose budget covers the capacity keeps every event: native scores exactly.
  cache, sig = jit_prefill(model, _take_fixed(ev, 0 * n, n - 1, N))
  method, params = data.draw(st.sampled_from([
      ("h2o", (("heavy", N - 1), ("recent", 1))), ("snapkv", (("budget", N), ("window", 1))),
      ("streaming", (("sinks", 1), ("recent", N - 1)))]), label="compressor")
  comp, compress = jitted_compress(method, params)  # one compile per compressor
  mem, _ = compress(cache, comp.init(cache), sig)
  np.testing.assert_array_equal(np.asarray(jit_score(model, mem.materialize(), req)),
                                np.asarray(jit_score(model, cache, req)))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_sweep_cell_flags_non_finite_memories(value):
  """The serving pipeline's stages report which users' scores are not finite, in the one-shot
  and the streaming protocol, and serve() refuses to return metrics (naming the user)."""
  from malloc_jax import serving

  model = random_model("hstu")
  data = _dataset()
  s = data.test
  comp = _poison(C.native(), value)
  cache, signals, prefix, req = serving.prefill_stage(model, s.items, s.ts, s.length,
                                                      query_len=1, window=4)
  memory = serving.compress_stage(cache, signals, compressor=comp)
  *_, finite = serving.score_stage(model, memory, req, s.target,
                                   np.tile(s.target[:, None], (1, 3)))
  np.testing.assert_array_equal(np.asarray(finite), np.arange(len(s)) != 2)
  *_, finite = serving.stream_stage(model, prefix, req, s.target, compressor=comp, requests=2,
                                    window=4)
  np.testing.assert_array_equal(np.asarray(finite), np.arange(len(s)) != 2)
  for requests in ((), (2,)):
    with pytest.raises(FloatingPointError, match="first user index 2"):
      serving.serve(model, serving.batches(model, s, batch_size=len(s), window=4), comp,
                    requests=requests, window=4)
