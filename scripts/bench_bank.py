r"""Memory bank throughput: write and read back 100,000 users' compressed memories by id.

  python scripts/bench_bank.py [--users 100000] [--batch 256] [--shards 16] [--dir /tmp]
                               [--nofsync]

Memories are real low-rank compressions at the default config's ``lowrank_4x`` setting of
HSTU as configured by default (2 layers, 2 heads, dim 64 so head dim 32, history 128):
rank 8, float32. Each batch is a random contiguous cache of 96-128 events per user (the
synthetic data's history lengths), compressed by ``compressors.lowrank`` with bases fitted
once on another random cache (the bases are shared: stored once, not per user). Per user:
ck, cv [2, 2, 128, 8] float32 + index ts [128] int32 + length int32 = 33,284 bytes.

The bank (``malloc_jax.bank``) is created in a fresh directory under ``--dir`` (default: the
system temp dir) and removed at the end. Users are written in a random order in batches of
``--batch`` (one ``write`` each, fsync'ed unless ``--nofsync``; generating the memories is not
timed), then read back in another random order in batches of ``--batch`` with checksums
verified (timed). Every user read is compared, outside the timer, with a 64-bit hash of
what was written for it. Reads come from the OS page cache (the bank was just written).
Prints users/s written and read, bytes on disk per user against in-memory bytes per user,
and their ratio last.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from malloc_jax import compressors as C
from malloc_jax import logging_setup
from malloc_jax.bank import MemoryBank, default_user_axes
from malloc_jax.cache import Cache

_USERS = flags.DEFINE_integer("users", 100_000, "Users written and read.")
_BATCH = flags.DEFINE_integer("batch", 256, "Users per write and per read.")
_SHARDS = flags.DEFINE_integer("shards", 16, "Shards of the bank.")
_DIR = flags.DEFINE_string("dir", None, "Parent of the bank's temporary directory.")
_FSYNC = flags.DEFINE_boolean("fsync", True, "fsync every write (durable against power loss).")
L, H, T, DK, RANK, MIN_LEN = 2, 2, 128, 32, 8, 96


def random_cache(rng: np.random.Generator, batch: int) -> Cache:
  """A contiguous cache of batch users with MIN_LEN..T events each (random keys and values)."""
  n = rng.integers(MIN_LEN, T + 1, size=batch)
  slot = np.arange(T, dtype=np.int32)
  pos = np.where(slot[None] < n[:, None], slot[None], -1)  # [B, T]
  pos = np.broadcast_to(pos[None, :, None, :], (L, batch, H, T))
  return Cache(k=rng.random((L, batch, H, T, DK), np.float32) - 0.5,
               v=rng.random((L, batch, H, T, DK), np.float32) - 0.5, pos=pos,
               ts=np.where(pos >= 0, 60 * pos + 1_700_000_000, 0).astype(np.int32),
               length=n.astype(np.int32))


def user_digests(memory, axes: dict, weights: np.ndarray) -> np.ndarray:
  """uint64 [B]: a linear hash of each user's per-user leaves (users moved first).

  sum_i w_i x_i mod 2^64 over the user's bytes read as 64-bit words, with random odd w_i: a
  difference in any one word always changes it (odd w is invertible mod 2^64).
  """
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(memory)[0]:
    axis = axes[".".join(k.name for k in path)]
    if axis is not None:
      x = np.moveaxis(np.asarray(leaf), axis, 0)
      rows.append(np.ascontiguousarray(x).reshape(x.shape[0], -1).view(np.uint8))
  pad = -sum(r.shape[1] for r in rows) % 8
  words = np.concatenate(rows + [np.zeros((len(rows[0]), pad), np.uint8)], axis=1)
  words = words.view(np.uint64)
  return (words * weights[:words.shape[1]]).sum(axis=1, dtype=np.uint64)


def run(users: int, batch: int, shards: int, directory: str | None, fsync: bool) -> dict:
  """Writes and reads back ``users`` memories; returns throughputs and sizes."""
  rng = np.random.default_rng(0)
  bases = C.fit_lowrank([random_cache(rng, 16)], rank=RANK)
  comp = C.lowrank(bases)
  compress = jax.jit(lambda cache: comp.compress(cache, None)[0])
  make = lambda: jax.device_get(compress(random_cache(rng, batch)))
  example = make()
  axes = default_user_axes(example)
  weights = rng.integers(0, 2**63, size=example_words(example, axes), dtype=np.uint64) * 2 + 1
  root = Path(tempfile.mkdtemp(prefix="bench_bank_", dir=directory))
  try:
    bank = MemoryBank.create(root / "bank", example, num_users=users, num_shards=shards,
                             fsync=fsync)
    digests = np.zeros(users, np.uint64)
    write_s = 0.0
    order = rng.permutation(users)
    for start in range(0, users, batch):
      ids = order[start:start + batch]
      memory = make()
      if len(ids) < batch:
        memory = _take(memory, len(ids), axes)
      t0 = time.perf_counter()
      bank.write(ids, memory)
      write_s += time.perf_counter() - t0
      digests[ids] = user_digests(memory, axes, weights)
    bank.close()

    bank = MemoryBank.open(root / "bank")
    read_s, bad = 0.0, 0
    order = rng.permutation(users)
    for start in range(0, users, batch):
      ids = order[start:start + batch]
      t0 = time.perf_counter()
      memory = bank.read(ids)
      read_s += time.perf_counter() - t0
      bad += int((user_digests(memory, axes, weights) != digests[ids]).sum())
    result = dict(write_s=write_s, read_s=read_s, mismatches=bad, disk=bank.bytes_on_disk(),
                  per_user=bank.bytes_per_user, record=bank.record_nbytes,
                  reference=C.bytes_per_user(example), shared=C.shared_nbytes(example))
    bank.close()
  finally:
    shutil.rmtree(root)
  return result


def example_words(memory, axes: dict) -> int:
  """Number of 64-bit words of one user's per-user bytes (rounded up)."""
  n = sum(np.asarray(leaf).nbytes // np.shape(leaf)[axes[".".join(k.name for k in path)]]
          for path, leaf in jax.tree_util.tree_flatten_with_path(memory)[0]
          if axes[".".join(k.name for k in path)] is not None)
  return -(-n // 8)


def _take(memory, n: int, axes: dict):
  """The first n users of a batched memory (the last, short batch)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(memory)
  out = []
  for path, leaf in flat:
    axis = axes[".".join(k.name for k in path)]
    out.append(leaf if axis is None else np.take(leaf, np.arange(n), axis=axis))
  return jax.tree.unflatten(treedef, out)


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  users, batch = _USERS.value, _BATCH.value
  r = run(users, batch, _SHARDS.value, _DIR.value, _FSYNC.value)
  mb = users * r["per_user"] / 1e6
  print(f"memory: lowrank rank {RANK} float32 of HSTU (L={L}, H={H}, T={T}, head dim {DK}); "
        f"{r['per_user']} B per user (compressors.bytes_per_user: {r['reference']:.0f}), "
        f"shared bases {r['shared']} B once")
  print(f"bank: {users} users, {_SHARDS.value} shards, batches of {batch}, "
        f"fsync={_FSYNC.value}, record {r['record']} B")
  print(f"write: {users / r['write_s']:,.0f} users/s ({mb / r['write_s']:,.0f} MB/s, "
        f"{r['write_s']:.2f} s)")
  print(f"read (random order, checksums verified): {users / r['read_s']:,.0f} users/s "
        f"({mb / r['read_s']:,.0f} MB/s, {r['read_s']:.2f} s)")
  print(f"read back bit-exact: {users - r['mismatches']}/{users} users")
  print(f"bytes per user: on disk {r['disk'] / users:,.1f}, in memory {r['per_user']:,}")
  print(f"disk / memory bytes per user: {r['disk'] / users / r['per_user']:.4f}")
  if r["mismatches"]:
    raise SystemExit(f"{r['mismatches']} users read back differently")


if __name__ == "__main__":
  app.run(main)
