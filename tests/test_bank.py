"""Memory bank: exact round trips by user id, overwrites, errors, corruption and crashes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.bank import BankCorruptedError, BankLockedError, MemoryBank, default_user_axes
from malloc_jax.cache import Cache, Signals

L, H, T, D = 2, 2, 8, 8
NUM_USERS, SHARDS = 40, 3
KINDS = ["cache", "native", "sparse", "kivi2", "uniform4", "lowrank"]
COMPILED_BATCH = 12  # compressors run on one batch shape (one compile each); tests take rows


def random_cache(batch: int, seed: int, t: int = T, d: int = D) -> tuple[Cache, Signals]:
  """A random contiguous cache with uneven lengths (garbage in empty slots) and signals."""
  rng = np.random.default_rng(seed)
  n = rng.integers(1, t + 1, size=batch)
  pos = np.where(np.arange(t)[None] < n[:, None], np.arange(t)[None], -1)
  pos = np.broadcast_to(pos[None, :, None, :], (L, batch, H, t))
  cache = Cache(k=jnp.asarray(rng.normal(size=(L, batch, H, t, d)), jnp.float32),
                v=jnp.asarray(rng.normal(size=(L, batch, H, t, d)), jnp.float32),
                pos=jnp.asarray(pos, jnp.int32), ts=jnp.asarray(np.maximum(pos, 0) * 7, jnp.int32),
                length=jnp.asarray(n, jnp.int32))
  sig = Signals(acc_attn=jnp.asarray(rng.random((L, batch, H, t)), jnp.float32),
                window_attn=jnp.zeros((L, batch, H, 1, t)), window_valid=jnp.ones((batch, 1), bool))
  return cache, sig


@functools.cache
def _compressor(kind: str) -> C.Compressor:
  if kind == "native":
    return C.native()
  if kind == "kivi2":
    return C.kivi(bits=2, group=4, residual=4)
  if kind == "uniform4":
    return C.uniform(bits=4)
  if kind == "lowrank":  # one set of bases for every batch (a shared leaf of the memory)
    return C.lowrank(C.fit_lowrank([random_cache(8, 99)[0]], rank=3))
  raise ValueError(kind)


@functools.cache
def _jitted(kind: str):
  comp = _compressor(kind)
  return jax.jit(lambda cache, sig: comp.compress(cache, comp.init(cache), sig)[0])


def make_memory(kind: str, batch: int, seed: int):
  """A batch of ``batch`` users' memories of one kind (random, different for each seed)."""
  cache, sig = random_cache(COMPILED_BATCH, seed)
  if kind == "cache":
    memory = cache
  elif kind == "sparse":  # as after eviction: per-head positions (a SparseIndex)
    rng = np.random.default_rng(seed)
    pos = rng.integers(-1, 50, size=cache.pos.shape).astype(np.int32)
    index = C.SparseIndex(pos=pos, ts=pos * 3, length=np.asarray(cache.length))
    memory = C.DenseMemory(index=index, k=np.asarray(cache.k), v=np.asarray(cache.v))
  else:
    memory = _jitted(kind)(cache, sig)
  return select(memory, np.arange(batch))


def axis_of(path: str, leaf) -> int | None:
  """The layout by hand: bases shared; [B] and [B, T] leaves users first; [L, B, ...] second."""
  if path.startswith("bases."):
    return None
  return 0 if np.ndim(leaf) <= 2 else 1


def select(memory, rows):
  """Users ``rows`` of a batched memory (NumPy reference, by the hand-written layout)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(memory)
  out = []
  for path, leaf in flat:
    name = ".".join(k.name for k in path)
    axis = axis_of(name, leaf)
    out.append(np.asarray(leaf) if axis is None else np.take(np.asarray(leaf), rows, axis=axis))
  return jax.tree.unflatten(treedef, out)


def assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)  # static fields included
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    b = np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, path[0]
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), path[0]  # bit-exact


@pytest.fixture
def bank_of(tmp_path):
  banks = []

  def make(kind, example=None, **kw):
    example = make_memory(kind, 4, 0) if example is None else example
    kw = dict(num_users=NUM_USERS, num_shards=SHARDS) | kw
    banks.append(MemoryBank.create(tmp_path / f"bank_{kind}", example, **kw))
    return banks[-1]

  yield make
  for b in banks:
    b.close()


# ----------------------------------------------------------------------------------------
# Round trips.


def test_default_user_axes_follow_the_documented_layout():
  kivi = make_memory("kivi2", 3, 0)
  axes = default_user_axes(kivi)
  assert axes == {"index.ts": 0, "index.length": 0, "k_codes": 1, "k_scale": 1, "k_min": 1,
                  "k_res": 1, "v_codes": 1, "v_scale": 1, "v_min": 1, "v_res": 1}
  low = default_user_axes(make_memory("lowrank", 3, 0))
  assert low["bases.k_basis"] is None and low["ck"] == 1
  assert default_user_axes(make_memory("cache", 3, 0)) == {
      "k": 1, "v": 1, "pos": 1, "ts": 1, "length": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_random_order_is_bit_exact(bank_of, kind):
  bank = bank_of(kind)
  a, b = make_memory(kind, 6, 1), make_memory(kind, 5, 2)
  ids_a = np.array([5, 17, 0, 33, 8, 21])  # every shard
  ids_b = np.array([39, 1, 2, 30, 14])
  bank.write(ids_a, a)
  bank.write(ids_b, b)
  assert len(bank) == 11
  # A random order across both writes, with a repeat.
  rng = np.random.default_rng(0)
  order = rng.permutation(11)
  order = np.r_[order, order[3]]
  ids = np.r_[ids_a, ids_b][order]
  got = bank.read(ids)
  parts = [select(a, [i]) if i < 6 else select(b, [i - 6]) for i in order]
  want = _concat(parts)
  assert_same(got, want)
  if kind != "cache":
    assert bank.bytes_per_user == C.bytes_per_user(a)
    if kind == "lowrank":
      assert got.bases.k_basis.shape == a.bases.k_basis.shape
  # Reopened from disk (another process would see the same).
  bank.close()
  again = MemoryBank.open(bank.path)
  assert_same(again.read(ids), want)
  again.close()


def _concat(parts):
  flat = [jax.tree_util.tree_flatten_with_path(p)[0] for p in parts]
  leaves = []
  for j, (path, leaf) in enumerate(flat[0]):
    axis = axis_of(".".join(k.name for k in path), leaf)
    leaves.append(leaf if axis is None else np.concatenate([f[j][1] for f in flat], axis=axis))
  return jax.tree.unflatten(jax.tree.structure(parts[0]), leaves)


def test_overwrite_keeps_other_users_and_reuses_slots(bank_of):
  bank = bank_of("kivi2")
  a, b = make_memory("kivi2", 3, 1), make_memory("kivi2", 3, 2)
  bank.write([1, 2, 3], a)
  bank.write([2, 3, 4], b)
  got = bank.read([1, 2, 3, 4])
  assert_same(got, _concat([select(a, [0]), select(b, [0]), select(b, [1]), select(b, [2])]))
  assert len(bank) == 4
  assert list(bank.contains([1, 4, 5, -1, 99])) == [True, True, False, False, False]
  # Repeated overwrites reuse freed slots: each shard holds at most live users + one batch.
  for seed in range(10):
    bank.write([2, 3, 4], make_memory("kivi2", 3, seed))
  slots = sum(os.path.getsize(p) for p in (bank.path / "shards").glob("*.slots"))
  assert slots <= (4 + 3) * bank.record_nbytes
  assert bank.bytes_on_disk() >= 4 * bank.bytes_per_user


def test_explicit_user_axes(bank_of, tmp_path):
  # A plain dict memory: users on axis 2 of "x" (bfloat16), axis 0 of "n"; "w" shared.
  rng = np.random.default_rng(0)
  mem = {"x": np.asarray(jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.bfloat16)),
         "n": np.arange(5, dtype=np.int32), "w": np.ones(4, np.float16)}
  axes = {"x": 2, "n": 0, "w": None}
  with MemoryBank.create(tmp_path / "dict", mem, num_users=10, num_shards=2,
                         user_axes=axes) as bank:
    bank.write([9, 0, 4, 5, 2], mem)
  with MemoryBank.open(tmp_path / "dict") as bank:
    got = bank.read([5, 9])
    assert got["x"].dtype == jnp.bfloat16
    assert np.array_equal(got["x"].view(np.uint16), mem["x"][:, :, [3, 0]].view(np.uint16))
    assert np.array_equal(got["n"], [3, 0]) and np.array_equal(got["w"], mem["w"])
    assert bank.bytes_per_user == 3 * 2 * 2 + 4
  with pytest.raises(ValueError, match="no entry for leaf 'w'"):
    MemoryBank.create(tmp_path / "bad", mem, num_users=10, num_shards=2, user_axes={"x": 2, "n": 0})
  with pytest.raises(ValueError, match="leaf 'x' has 2 users on axis 1 but leaf 'n' has 5"):
    MemoryBank.create(tmp_path / "bad", mem, num_users=10, num_shards=2, user_axes={"x": 1, "n": 0, "w": None})


# ----------------------------------------------------------------------------------------
# Errors.


def test_unknown_and_out_of_range_ids(bank_of):
  bank = bank_of("native")
  bank.write([0, 1, 2, 3], make_memory("native", 4, 1))
  with pytest.raises(KeyError, match="user 7 was never written"):
    bank.read([0, 7])
  with pytest.raises(KeyError, match=f"user {NUM_USERS} is not in the bank"):
    bank.read([NUM_USERS])
  with pytest.raises(ValueError, match="user 3 appears more than once"):
    bank.write([3, 3, 4, 5], make_memory("native", 4, 1))
  with pytest.raises(ValueError, match="3 user ids for a memory of 4 users"):
    bank.write([4, 5, 6], make_memory("native", 4, 1))
  with pytest.raises(ValueError, match="user id -1 is outside"):
    bank.write([4, 5, 6, -1], make_memory("native", 4, 1))


def test_structure_shape_dtype_and_static_mismatch_name_the_leaf(bank_of):
  bank = bank_of("cache")
  cache = make_memory("cache", 4, 1)
  with pytest.raises(ValueError, match="memory structure differs .* at leaf 'k'"):
    bank.write([0, 1, 2, 3], make_memory("native", 4, 1))
  with pytest.raises(ValueError, match=r"leaf 'k': expected float32\[2, 4, 2, 8, 8\].*"
                                       r"got float16\[2, 4, 2, 8, 8\]"):
    bank.write([0, 1, 2, 3], cache.replace(k=cache.k.astype(jnp.float16)))
  bigger, _ = random_cache(4, 1, d=D * 2)
  with pytest.raises(ValueError, match=r"leaf 'k': expected .* got float32\[2, 4, 2, 8, 16\]"):
    bank.write([0, 1, 2, 3], bigger)
  with pytest.raises(ValueError, match="static fields differ"):
    bank.write([0, 1, 2, 3], cache.replace(contiguous=False))
  kivi_bank = bank_of("kivi2")
  with pytest.raises(ValueError, match="static fields differ"):  # another QuantSpec
    kivi_bank.write([0, 1, 2], jax.jit(lambda c: C.kivi(bits=2, group=2, residual=4).compress(
        c, None)[0])(random_cache(3, 1)[0]))
  low_bank = bank_of("lowrank")
  other = C.lowrank(C.fit_lowrank([random_cache(8, 5)[0]], rank=3))
  with pytest.raises(ValueError, match="leaf 'bases.k_mean' is shared by all users and differs"):
    low_bank.write([0, 1], other.compress(random_cache(2, 1)[0], None)[0])
  assert len(bank) == len(kivi_bank) == len(low_bank) == 0  # nothing was written


def test_one_writer_and_stale_readers(tmp_path):
  like = make_memory("uniform4", 2, 0)
  v = [make_memory("uniform4", 2, seed) for seed in (1, 2)]
  writer = MemoryBank.create(tmp_path / "b", like, num_users=2, num_shards=1)
  writer.write([0, 1], v[0])  # slots 0, 1
  reader = MemoryBank.open(tmp_path / "b")
  with pytest.raises(BankLockedError, match="being written by another process"):
    reader.write([0], select(v[1], [0]))
  writer.write([1], select(v[1], [1]))  # to slot 2; slot 1 is freed
  writer.write([0], select(v[1], [0]))  # reuses slot 1
  # The reader's index still sends user 1 to slot 1: the checksum fails, it reloads.
  assert_same(reader.read([1]), select(v[1], [1]))
  reader.refresh()
  assert_same(reader.read([0, 1]), select(v[1], [0, 1]))
  writer.close()
  reader.write([0], select(v[0], [0]))  # the lock is free now
  assert_same(reader.read([0, 1]), _concat([select(v[0], [0]), select(v[1], [1])]))
  reader.close()


# ----------------------------------------------------------------------------------------
# Integrity.


def test_corrupted_shard_file_is_named(bank_of):
  bank = bank_of("kivi2")
  ids = np.arange(12)
  bank.write(ids, make_memory("kivi2", 12, 3))
  bank.close()
  slots = bank.path / "shards" / "00001.slots"
  data = bytearray(slots.read_bytes())
  data[bank.record_nbytes + 100] ^= 0xFF  # one byte of the second record of shard 1
  slots.write_bytes(bytes(data))
  bank = MemoryBank.open(bank.path)
  bank.read([0, 2, 3, 5])  # shards 0 and 2 are intact
  with pytest.raises(BankCorruptedError,
                     match=r"shard 1 file .*shards/00001\.slots checksum mismatch \(user \d+"):
    bank.read(ids)
  bank.read(ids, verify=False)  # unchecked reads still work
  bank.close()
  [index] = (bank.path / "shards").glob("00002.index.[0-9]*")  # shard 2's current index
  assert index.name == "00002.index.0000000001"  # created at commit 0, written once
  data = bytearray(index.read_bytes())
  data[40] ^= 0x01
  index.write_bytes(bytes(data))
  with pytest.raises(BankCorruptedError,
                     match=r"shard 2 file .*00002\.index\.0000000001 checksum mismatch"):
    MemoryBank.open(bank.path)
  index.unlink()
  with pytest.raises(BankCorruptedError, match=r"shard 2 file .*00002\.index\.\* is missing"):
    MemoryBank.open(bank.path)


def test_format_version_is_checked(bank_of):
  bank = bank_of("native")
  bank.close()
  manifest = bank.path / "MANIFEST.json"
  m = json.loads(manifest.read_text())
  assert m["format_version"] == 1
  manifest.write_text(json.dumps(m | {"format_version": 99}))
  with pytest.raises(ValueError, match="format version 99, this code reads version 1"):
    MemoryBank.open(bank.path)


# ----------------------------------------------------------------------------------------
# Crashes.


def _filled(like, value):
  return jax.tree.map(lambda x: np.full_like(x, value), like)


def _versions(bank) -> np.ndarray:
  """Each user's version (all leaves of a user must hold one and the same value)."""
  ids = np.arange(bank.num_users)
  flat = jax.tree_util.tree_flatten_with_path(bank.read(ids))[0]
  version = None
  for path, leaf in flat:
    axis = axis_of(".".join(k.name for k in path), leaf)
    rows = np.moveaxis(leaf, axis, 0).reshape(len(ids), -1)
    version = rows[:, 0].astype(np.int64) if version is None else version
    mixed = np.flatnonzero((rows != version[:, None].astype(rows.dtype)).any(axis=1))
    assert not len(mixed), f"users {ids[mixed]} mix versions in leaf {path}"
  return version


class _Crash(BaseException):
  pass


@pytest.mark.parametrize("point", ["mid_record", "before_commit", "after_two_shards"])
def test_crash_points_leave_old_or_new(tmp_path, monkeypatch, point):
  """A crash at a chosen point (simulated in-process: the half-done bank is abandoned)."""
  like = make_memory("kivi2", 12, 0)
  with MemoryBank.create(tmp_path / "b", like, num_users=12, num_shards=4) as bank:
    bank.write(np.arange(12), _filled(like, 1))
  bank = MemoryBank.open(tmp_path / "b")
  calls = {"pwrite": 0, "replace": 0}
  real_pwrite, real_replace = os.pwrite, os.replace

  def pwrite(fd, data, offset):
    calls["pwrite"] += 1
    if point == "mid_record" and calls["pwrite"] == 3:
      real_pwrite(fd, bytes(data)[:len(data) // 2], offset)  # half of a run of records
      raise _Crash
    return real_pwrite(fd, data, offset)

  def replace(src, dst):
    calls["replace"] += 1
    if point == "before_commit" or (point == "after_two_shards" and calls["replace"] == 3):
      raise _Crash
    return real_replace(src, dst)

  monkeypatch.setattr(os, "pwrite", pwrite)
  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(_Crash):
    bank.write(np.arange(12)[::-1], _filled(like, 2))
  monkeypatch.undo()
  bank.close()  # drop the lock; its in-memory state is never used again
  bank = MemoryBank.open(tmp_path / "b")
  version = _versions(bank)
  if point == "after_two_shards":  # shards 0 and 1 committed, in order
    np.testing.assert_array_equal(version, np.where(np.arange(12) % 4 < 2, 2, 1))
  else:
    np.testing.assert_array_equal(version, 1)
  bank.write(np.arange(12), _filled(like, 3))  # and the bank still takes writes
  np.testing.assert_array_equal(_versions(bank), 3)
  bank.close()


_WRITER = r"""
import sys
import numpy as np
import jax
from malloc_jax.bank import MemoryBank

path, version, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bank = MemoryBank.open(path)
like = bank.read(np.arange(batch))
rng = np.random.default_rng(version)
print("writing", flush=True)
while True:
  mem = jax.tree.map(lambda x: np.full_like(x, version), like)
  for ids in rng.permutation(bank.num_users).reshape(-1, batch):
    bank.write(ids, mem)
  print("done", version, flush=True)
  version += 1
"""


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_sigkill_mid_update_leaves_every_user_old_or_new(tmp_path):
  """A writer process updating all users version after version is SIGKILLed at random times."""
  num_users, batch = 256, 32
  like, _ = random_cache(batch, 0, t=64, d=32)  # native caches: 64 KiB records
  path = tmp_path / "bank"
  with MemoryBank.create(path, like, num_users=num_users, num_shards=8) as bank:
    for ids in np.arange(num_users).reshape(-1, batch):
      bank.write(ids, _filled(like, 0))
  version = 1  # the version the next writer starts with; every user holds version - 1
  rng = np.random.default_rng(0)
  for delay in (0.05, 0.3, 0.8):
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(version), str(batch)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    time.sleep(delay + rng.uniform(0, 0.05))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL
    done = [int(line.split()[1]) for line in out.split("\n") if line.startswith("done")]
    current = done[-1] + 1 if done else version  # the version being written when killed
    with MemoryBank.open(path) as bank:
      assert set(np.unique(_versions(bank))) <= {current - 1, current}
      for ids in np.arange(num_users).reshape(-1, batch):  # later writes work
        bank.write(ids, _filled(like, current + 1))
      np.testing.assert_array_equal(_versions(bank), current + 1)
    version = current + 2
