"""Memory bank on TensorStore: exact round trips by user id, overwrites, errors, corruption,
crafted metadata, crashes and concurrent processes; on a local directory (OCDBT) and memory://."""

from __future__ import annotations

import functools
import json
import pickle
import re
import signal
import subprocess
import sys
import time

import blosc
import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from malloc_jax import bank as bank_lib
from malloc_jax import compressors as C
from malloc_jax.bank import BankCorruptedError, MemoryBank, default_user_axes
from malloc_jax.cache import Cache, Signals

L, H, T, D = 2, 2, 8, 8
NUM_USERS = 40
STORAGES = ["file", "memory"]
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


_memory_banks = iter(range(10**9))


def location(tmp_path, storage: str, name: str):
  """A fresh bank location: a local directory (OCDBT) or a unique prefix of memory://."""
  if storage == "file":
    return tmp_path / name
  return {"driver": "memory", "path": f"{tmp_path.name}_{name}_{next(_memory_banks)}/"}


@pytest.fixture(params=STORAGES)
def storage(request):
  return request.param


@pytest.fixture
def bank_of(tmp_path, storage):
  banks = []

  def make(kind, example=None, **kw):
    example = make_memory(kind, 4, 0) if example is None else example
    kw = dict(num_users=NUM_USERS) | kw
    banks.append(MemoryBank.create(location(tmp_path, storage, f"bank_{kind}"), example, **kw))
    return banks[-1]

  yield make
  for b in banks:
    b.close()


def where(bank):
  """What reopens a bank: its directory, or its kvstore spec."""
  return bank.path if bank.path is not None else bank.spec


def raw_kv(bank) -> ts.KvStore:
  """The bank's key-value store, opened independently (to tamper with it)."""
  return ts.KvStore.open(bank.spec, context=bank_lib._ROOT_CONTEXT).result()


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
  ids_a = np.array([5, 17, 0, 33, 8, 21])
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
  # Reopened (another process would see the same).
  bank.close()
  again = MemoryBank.open(where(bank))
  assert_same(again.read(ids), want)
  again.close()


def _concat(parts):
  flat = [jax.tree_util.tree_flatten_with_path(p)[0] for p in parts]
  leaves = []
  for j, (path, leaf) in enumerate(flat[0]):
    axis = axis_of(".".join(k.name for k in path), leaf)
    leaves.append(leaf if axis is None else np.concatenate([f[j][1] for f in flat], axis=axis))
  return jax.tree.unflatten(jax.tree.structure(parts[0]), leaves)


def test_overwrite_keeps_other_users(bank_of):
  bank = bank_of("kivi2")
  a, b = make_memory("kivi2", 3, 1), make_memory("kivi2", 3, 2)
  bank.write([1, 2, 3], a)
  bank.write([2, 3, 4], b)
  got = bank.read([1, 2, 3, 4])
  assert_same(got, _concat([select(a, [0]), select(b, [0]), select(b, [1]), select(b, [2])]))
  assert len(bank) == 4
  assert list(bank.contains([1, 4, 5, -1, 99])) == [True, True, False, False, False]
  zero = _filled(a, 0)  # all-zero users are stored too (not mistaken for never written)
  bank.write([5, 6, 7], zero)
  assert_same(bank.read([5, 6, 7]), zero)
  assert len(bank) == 7


def test_a_users_record_is_its_leaves_bytes_little_endian_8_byte_aligned(tmp_path, storage):
  """The stored value of a user, read from the key-value store as raw bytes, is a blosc frame
  of its leaves' little-endian bytes in leaf order, each padded with zeros to a multiple of 8,
  then the crc32c of key and frame (reference built by hand; decoded with python-blosc and
  google-crc32c directly)."""
  rng = np.random.default_rng(3)
  mem = {"a": rng.integers(-9, 9, size=(4, 3)).astype(np.int8),  # users on axis 0: 3 bytes
         "b": rng.normal(size=(2, 4, 3)).astype(np.float32),  # users on axis 1: 2x3x4 bytes
         "c": rng.random(4) < 0.5, "w": np.ones(2, np.float16)}  # bool users; w shared
  axes = {"a": 0, "b": 1, "c": 0, "w": None}
  with MemoryBank.create(location(tmp_path, storage, "rec"), mem, num_users=6,
                         user_axes=axes) as bank:
    bank.write([5, 0, 3, 1], mem)
    assert bank.record_bytes == 8 + 24 + 8  # 3 -> 8, 24, 1 -> 8
    kv = raw_kv(bank)
    assert sorted(kv.list().result()) == sorted(
        [b"bank.json", b"s003/zarr.json", b"s003/c/0"] +
        [b"users/%010d" % u for u in (0, 1, 3, 5)])
  for u, user in enumerate([5, 0, 3, 1]):
    key = b"users/%010d" % user
    value = kv.read(key).result().value
    frame, crc = value[:-4], int.from_bytes(value[-4:], "little")
    assert crc == google_crc32c.value(key + frame), u
    want = bytearray(40)
    want[0:3] = mem["a"][u].tobytes()
    want[8:32] = mem["b"][:, u].astype("<f4").tobytes()
    want[32:33] = mem["c"][u:u + 1].tobytes()
    assert blosc.decompress(frame) == bytes(want), u


def test_explicit_user_axes(tmp_path, storage):
  # A plain dict memory: users on axis 2 of "x" (bfloat16), axis 0 of "n"; "w" shared.
  rng = np.random.default_rng(0)
  mem = {"x": np.asarray(jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.bfloat16)),
         "n": np.arange(5, dtype=np.int32), "w": np.ones(4, np.float16)}
  axes = {"x": 2, "n": 0, "w": None}
  loc = location(tmp_path, storage, "dict")
  with MemoryBank.create(loc, mem, num_users=10, user_axes=axes) as bank:
    bank.write([9, 0, 4, 5, 2], mem)
  with MemoryBank.open(loc) as bank:
    got = bank.read([5, 9])
    assert got["x"].dtype == jnp.bfloat16
    assert np.array_equal(got["x"].view(np.uint16), mem["x"][:, :, [3, 0]].view(np.uint16))
    assert np.array_equal(got["n"], [3, 0]) and np.array_equal(got["w"], mem["w"])
    assert bank.bytes_per_user == 3 * 2 * 2 + 4
  bad = location(tmp_path, storage, "bad")
  with pytest.raises(ValueError, match="no entry for leaf 'w'"):
    MemoryBank.create(bad, mem, num_users=10, user_axes={"x": 2, "n": 0})
  with pytest.raises(ValueError, match="leaf 'x' has 2 users on axis 1 but leaf 'n' has 5"):
    MemoryBank.create(bad, mem, num_users=10, user_axes={"x": 1, "n": 0, "w": None})
  with pytest.raises(FileExistsError):
    MemoryBank.create(loc, mem, num_users=10, user_axes=axes)


def test_variable_length_users_pay_for_their_events_not_the_capacity(tmp_path):
  """A user with 40 kept events of 1,024 zeroed slots costs about 40 events on disk."""
  L_, H_, T_, D_ = 2, 2, 1024, 16
  rng = np.random.default_rng(0)

  def memory(n):  # native memory of users with n[b] events, zeros in the empty slots
    B = len(n)
    valid = np.arange(T_)[None] < n[:, None]  # [B, T]
    k = np.where(valid[None, :, None, :, None], rng.normal(size=(L_, B, H_, T_, D_)), 0)
    v = np.where(valid[None, :, None, :, None], rng.normal(size=(L_, B, H_, T_, D_)), 0)
    ts_ = np.where(valid, 60 * np.arange(T_)[None] + 1_700_000_000, 0).astype(np.int32)
    index = C.DenseIndex(ts=ts_, length=n.astype(np.int32))
    return C.DenseMemory(index=index, k=k.astype(np.float32), v=v.astype(np.float32))

  def disk_per_user(n, users=64):
    path = tmp_path / f"b{n}"
    with MemoryBank.create(path, memory(np.full(4, n)), num_users=users) as bank:
      for start in range(0, users, 16):
        bank.write(np.arange(start, start + 16), memory(np.full(16, n)))
      empty = bank.bytes_on_disk()
      assert_same(bank.read([3]), bank.read([3]))
    return empty / users

  # The events' own bytes (float64 reference of the count): k, v float32 and ts int32.
  per_event = 2 * L_ * H_ * D_ * 4 + 4
  full, short = disk_per_user(T_), disk_per_user(40)
  assert full >= T_ * per_event * 0.9  # random floats barely compress
  assert short <= 40 * per_event * 1.25 + 2048, (short, 40 * per_event)
  assert short < full / 15


# ----------------------------------------------------------------------------------------
# Errors.


def test_unknown_and_out_of_range_ids(bank_of):
  bank = bank_of("native")
  bank.write([0, 1, 2, 3], make_memory("native", 4, 1))
  with pytest.raises(KeyError, match="user 7 was never written"):
    bank.read([0, 7])
  with pytest.raises(KeyError, match="user 23 was never written"):
    bank.read([23])
  with pytest.raises(KeyError, match=f"user {NUM_USERS} is not in the bank"):
    bank.read([NUM_USERS])
  with pytest.raises(ValueError, match="user 3 appears more than once"):
    bank.write([3, 3, 4, 5], make_memory("native", 4, 1))
  with pytest.raises(ValueError, match="3 user ids for a memory of 4 users"):
    bank.write([4, 5, 6], make_memory("native", 4, 1))
  with pytest.raises(ValueError, match="user id -1 is outside"):
    bank.write([4, 5, 6, -1], make_memory("native", 4, 1))
  assert len(bank) == 4


def test_writing_zero_users_is_a_no_op(bank_of):
  bank = bank_of("lowrank")
  before = sorted(raw_kv(bank).list().result())
  empty = make_memory("lowrank", 0, 1)
  bank.write(np.zeros(0, np.int64), empty)
  bank.write([], empty)
  assert sorted(raw_kv(bank).list().result()) == before and len(bank) == 0
  got = bank.read([])  # and reading none gives a memory of 0 users
  assert_same(got, empty)


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


def test_unregistered_types_are_refused_and_registered_ones_stored(tmp_path, storage,
                                                                    monkeypatch):
  from flax import struct

  monkeypatch.setattr(bank_lib, "MEMORY_TYPES", dict(bank_lib.MEMORY_TYPES))  # undone after

  @struct.dataclass
  class MyMemory:
    x: jax.Array
    tag: str = struct.field(pytree_node=False, default="a")

  mem = MyMemory(x=np.arange(6, dtype=np.int16).reshape(3, 2), tag="b")
  with pytest.raises(ValueError, match="MyMemory is not registered"):
    MemoryBank.create(location(tmp_path, storage, "u"), mem, num_users=4, user_axes={"x": 0})
  bank_lib.register_memory_type(MyMemory, "test_bank.MyMemory")
  loc = location(tmp_path, storage, "r")
  with MemoryBank.create(loc, mem, num_users=4, user_axes={"x": 0}) as bank:
    bank.write([3, 1, 0], mem)
  with MemoryBank.open(loc) as bank:
    got = bank.read([1])
    assert type(got) is MyMemory and got.tag == "b" and got.x.tolist() == [[2, 3]]


# ----------------------------------------------------------------------------------------
# Integrity: every key and every file is checked.


def _flip(data: bytes, pos: int) -> bytes:
  out = bytearray(data)
  out[pos] ^= 0x01
  return bytes(out)


def _open_and_read(loc, ids):
  with MemoryBank.open(loc) as bank:
    return bank.read(ids)


def test_flipped_byte_in_any_key_raises_naming_it(tmp_path):
  """memory://: every key (bank.json, each shared leaf's zarr.json and chunk, each user's
  record), three positions each."""
  like = make_memory("kivi2", 4, 0)
  loc = location(tmp_path, "memory", "flip")
  ids = np.array([3, 0, 7, 12])
  with MemoryBank.create(loc, like, num_users=16) as bank:
    bank.write(ids, like)
    kv = raw_kv(bank)
  keys = kv.list().result()
  assert len(keys) == 1 + 4  # bank.json; 4 users' records (10 leaves each; none shared)
  for key in keys:
    data = kv.read(key).result().value
    for pos in sorted({0, len(data) // 2, len(data) - 1}):
      kv.write(key, _flip(data, pos)).result()
      with pytest.raises(BankCorruptedError, match=re.escape(key.decode())):
        _open_and_read(loc, ids)
      kv.write(key, data).result()
  assert_same(_open_and_read(loc, ids[[2, 0, 3, 1]]), select(like, [2, 0, 3, 1]))


def test_moved_or_resized_records_are_refused_naming_the_key(tmp_path, storage):
  """A record copied under another user's key fails its crc32c (the key is in it); a frame of
  another size with a valid crc32c (a crafted value) is refused before it is decoded."""
  like = make_memory("native", 4, 0)
  with MemoryBank.create(location(tmp_path, storage, "moved"), like, num_users=8) as bank:
    bank.write([0, 1, 2, 3], like)
    kv = raw_kv(bank)
    kv.write(b"users/0000000007", kv.read(b"users/0000000003").result().value).result()
    with pytest.raises(BankCorruptedError, match="users/0000000007 fails its crc32c"):
      bank.read([7])
    key = b"users/0000000005"
    frame = blosc.compress(bytes(bank.record_bytes * 2), typesize=1, cname="lz4")
    crc = google_crc32c.value(key + frame).to_bytes(4, "little")
    kv.write(key, frame + crc).result()
    with pytest.raises(BankCorruptedError, match=f"users/0000000005 holds a frame of "
                                                 f"{bank.record_bytes * 2} bytes"):
      bank.read([5])
    assert_same(bank.read([3, 0]), select(like, [3, 0]))


def test_flipped_byte_in_any_file_is_detected(tmp_path):
  """A local OCDBT bank: a flipped byte anywhere in any file raises an error naming the file
  or the bank (a chunk's key), or, where it hits bytes no longer referenced (superseded
  B+tree nodes of the log-structured store), the read-back is still bit-exact."""
  like = make_memory("uniform4", 6, 0)
  path = tmp_path / "bank"
  with MemoryBank.create(path, like, num_users=8) as bank:
    bank.write([0, 1, 2], select(like, [0, 1, 2]))
    bank.write([5, 4, 3], select(like, [5, 4, 3]))
  files = sorted(p for p in path.rglob("*") if p.is_file())
  assert {p.name for p in files} >= {"manifest.ocdbt"}
  raised = 0
  for f in files:
    data = f.read_bytes()
    for pos in np.unique(np.linspace(0, len(data) - 1, 12).astype(int)):
      f.write_bytes(_flip(data, pos))
      try:
        got = _open_and_read(path, np.arange(6))
      except BankCorruptedError as e:
        assert f.name in str(e) or str(path) in str(e), (f, pos, e)
        raised += 1
      else:
        assert_same(got, like)
      f.write_bytes(data)
  assert raised >= len(files) * 6
  assert_same(_open_and_read(path, np.arange(6)), like)


def _tamper_metadata(kv, edit):
  """Rewrites bank.json through ``edit(body) -> body`` with a matching checksum (an attacker
  who knows the format)."""
  doc = json.loads(kv.read(bank_lib.METADATA_KEY).result().value)
  body = json.dumps(edit(json.loads(doc["body"])))
  doc |= {"body": body, "sha256": bank_lib._sha256(body.encode())}
  kv.write(bank_lib.METADATA_KEY, json.dumps(doc).encode()).result()


def test_crafted_metadata_cannot_run_code(tmp_path, storage, monkeypatch):
  def no_pickle(*args, **kw):
    raise AssertionError("the bank unpickled something")

  for name in ("loads", "load", "Unpickler"):
    monkeypatch.setattr(pickle, name, no_pickle)
  like = make_memory("kivi2", 3, 0)
  loc = location(tmp_path, storage, "crafted")
  with MemoryBank.create(loc, like, num_users=4) as bank:
    bank.write([0, 2, 3], like)
    kv = raw_kv(bank)
  assert_same(_open_and_read(loc, [0, 2, 3]), like)  # open + read, with pickle disabled
  original = kv.read(bank_lib.METADATA_KEY).result().value

  def as_type(name):
    def edit(body):
      body["tree"]["type"] = name
      return body
    return edit

  def static(value):
    def edit(body):
      body["tree"]["static"]["spec"] = value
      return body
    return edit

  def dtype(body):
    body["leaves"][2]["dtype"] = "object"
    return body

  cases = [(as_type("os.system"), "unknown memory type 'os.system'"),
           (as_type("builtins.eval"), "unknown memory type"),
           (static({"__reduce__": ["os.system", ["echo hacked"]]}), "cannot decode"),
           (static({"QuantSpec": {"bits": {"exec": "print(1)"}}}), "cannot decode"),
           (dtype, "dtype 'object'")]
  for edit, message in cases:
    _tamper_metadata(kv, edit)
    with pytest.raises(BankCorruptedError, match=re.escape(message)):
      MemoryBank.open(loc)
    kv.write(bank_lib.METADATA_KEY, original).result()
  # A checksum that does not match the body is refused before the body is parsed.
  doc = json.loads(original)
  kv.write(bank_lib.METADATA_KEY, json.dumps(doc | {"body": doc["body"].replace(
      '"num_users": 4', '"num_users": 5')}).encode()).result()
  with pytest.raises(BankCorruptedError, match="bank.json checksum mismatch"):
    MemoryBank.open(loc)
  kv.write(bank_lib.METADATA_KEY, original).result()
  assert_same(_open_and_read(loc, [3]), select(like, [2]))


def test_format_version_is_checked(bank_of):
  bank = bank_of("native")
  kv = raw_kv(bank)
  doc = json.loads(kv.read(bank_lib.METADATA_KEY).result().value)
  assert doc["format_version"] == 4
  kv.write(bank_lib.METADATA_KEY, json.dumps(doc | {"format_version": 99}).encode()).result()
  with pytest.raises(ValueError, match="format version 99, this code reads version 4"):
    MemoryBank.open(where(bank))


def test_open_of_nothing_is_not_found(tmp_path, storage):
  with pytest.raises(FileNotFoundError, match="not a memory bank"):
    MemoryBank.open(location(tmp_path, storage, "none"))


# ----------------------------------------------------------------------------------------
# Crashes and processes.


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


def test_failed_write_commits_nothing(bank_of, monkeypatch):
  """A write that fails after its records are staged (before the commit) leaves every user
  old."""
  like = make_memory("kivi2", 12, 0)
  bank = bank_of("kivi2", example=like, num_users=12)
  bank.write(np.arange(12), _filled(like, 1))
  real = bank_lib.MemoryBank._run
  calls = []

  def fail_at_commit(self, fn, path):
    calls.append(path)
    if path == "<commit>":
      raise RuntimeError("disk full")
    return real(self, fn, path)

  monkeypatch.setattr(bank_lib.MemoryBank, "_run", fail_at_commit)
  with pytest.raises(RuntimeError, match="disk full"):
    bank.write(np.arange(12)[::-1], _filled(like, 2))
  monkeypatch.undo()
  assert calls == [bank_lib.RECORDS, "<commit>"]  # staged, then failed
  np.testing.assert_array_equal(_versions(MemoryBank.open(where(bank))), 1)


_WRITER = r"""
import sys
import numpy as np
import jax
from malloc_jax.bank import MemoryBank

path, version, batch, first, stride = sys.argv[1], *map(int, sys.argv[2:6])
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else None
bank = MemoryBank.open(path)
like = bank.read(np.arange(batch))
rng = np.random.default_rng(version + first)
print("writing", flush=True)
while rounds is None or rounds > 0:
  mem = jax.tree.map(lambda x: np.full_like(x, version), like)
  for ids in rng.permutation(np.arange(first, bank.num_users, stride)).reshape(-1, batch):
    bank.write(ids, mem)
  print("done", version, flush=True)
  version += 1
  rounds = None if rounds is None else rounds - 1
"""


def _writer(path, version, batch, first=0, stride=1, rounds=None):
  args = [sys.executable, "-c", _WRITER, str(path), str(version), str(batch), str(first),
          str(stride)] + ([] if rounds is None else [str(rounds)])
  return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)



@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_sigkill_mid_update_leaves_every_user_old_or_new(tmp_path):
  """A writer process updating all users version after version is SIGKILLed at random times."""
  num_users, batch = 256, 32
  like, _ = random_cache(batch, 0, t=64, d=32)  # native caches: 64 KiB per user
  path = tmp_path / "bank"
  with MemoryBank.create(path, like, num_users=num_users) as bank:
    for ids in np.arange(num_users).reshape(-1, batch):
      bank.write(ids, _filled(like, 0))
  version = 1  # the version the next writer starts with; every user holds version - 1
  rng = np.random.default_rng(0)
  for delay in (0.05, 0.3, 0.8):
    child = _writer(path, version, batch)
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


def test_two_writer_processes_and_a_reader(tmp_path):
  """Two processes write disjoint users (even, odd ids) concurrently, 3 versions each, while
  this process reads: every read sees each user whole, and at the end all hold version 3."""
  num_users, batch = 64, 8
  like = make_memory("uniform4", batch, 0)
  path = tmp_path / "bank"
  with MemoryBank.create(path, like, num_users=num_users) as bank:
    bank.write(np.arange(batch), _filled(like, 0))
    for ids in np.arange(num_users).reshape(-1, batch):
      bank.write(ids, _filled(like, 0))
  reader = MemoryBank.open(path)  # opened before the writers start
  writers = [_writer(path, 1, batch, first, 2, rounds=3) for first in (0, 1)]
  seen = set()
  while any(w.poll() is None for w in writers):
    seen |= set(np.unique(_versions(reader)).tolist())  # raises if a user mixes versions
  for w in writers:
    out, _ = w.communicate()
    assert w.returncode == 0 and out.split() == ["writing", "done", "1", "done", "2", "done",
                                                 "3"]
  np.testing.assert_array_equal(_versions(reader), 3)  # the reader sees the last commits
  assert seen <= {0, 1, 2, 3}
  reader.close()
