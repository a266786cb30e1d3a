r"""Memory bank throughput: write and read back 100,000 users' compressed memories by id,
with the TensorStore bank and, side by side in the same run, the hand-written bank it replaced.

  python scripts/bench_bank.py [--users 100000] [--batch 256] [--dir /tmp] [--nofsync]
                               [--old_commit b512db6] [--noold]

Memories are real low-rank compressions at the default config's ``lowrank_4x`` setting of
HSTU as configured by default (2 layers, 2 heads, dim 64 so head dim 32, history 128):
rank 8, float32. Each batch is a random contiguous cache of 96-128 events per user (the
synthetic data's history lengths), compressed by ``compressors.lowrank`` with bases fitted
once on another random cache (the bases are shared: stored once, not per user). Per user:
ck, cv [2, 2, 128, 8] float32 + index ts [128] int32 + length int32 = 33,284 bytes of
buffer; the user's real events need fewer (``stored_bytes`` below).

Each bank is created in a fresh directory under ``--dir`` (default: the system temp dir) and
removed at the end. Users are written in a random order in batches of ``--batch`` (one
``write`` each, fsync'ed unless ``--nofsync``; generating the memories is not timed), then
read back in another random order in batches of ``--batch`` (timed; checksums verified).
Every user read is compared, outside the timer, with a 64-bit hash of what was written for
it. Reads come from the OS page cache (the bank was just written).

The old bank (``malloc_jax/bank.py`` at ``--old_commit``, a hand-written shard format) is
loaded from git into a temporary module for this run only and runs first, on the same
memories (same seeds), then the TensorStore bank; the load average is printed before each.
Prints users/s written and read of both, their ratios (new / old), the CPU time per user (all
threads of the process: steadier than wall time on a shared machine), and disk bytes per user
against stored bytes per user.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
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
_DIR = flags.DEFINE_string("dir", None, "Parent of the banks' temporary directories.")
_FSYNC = flags.DEFINE_boolean("fsync", True, "fsync every write (durable against power loss).")
_OLD = flags.DEFINE_boolean("old", True, "Also run the old hand-written bank, first.")
_OLD_COMMIT = flags.DEFINE_string("old_commit", "b512db6", "Commit of the old bank.py.")
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


def old_bank_class(commit: str):
  """The old bank's MemoryBank, loaded from git at ``commit`` into a temporary module."""
  root = Path(__file__).resolve().parent.parent
  source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:malloc_jax/bank.py"],
                          check=True, capture_output=True, text=True).stdout
  tmp = Path(tempfile.mkdtemp(prefix="old_bank_"))
  (tmp / "old_bank.py").write_text(source)
  spec = importlib.util.spec_from_file_location("old_bank", tmp / "old_bank.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["old_bank"] = module
  spec.loader.exec_module(module)
  shutil.rmtree(tmp)
  return module.MemoryBank


def run(kind: str, users: int, batch: int, directory: str | None, fsync: bool) -> dict:
  """Writes and reads back ``users`` memories with one bank kind ("old" or "new")."""
  rng = np.random.default_rng(0)
  bases = C.fit_lowrank([random_cache(rng, 16)], rank=RANK)
  comp = C.lowrank(bases)
  compress = jax.jit(lambda cache: comp.compress(cache, None)[0])
  make = lambda: jax.device_get(compress(random_cache(rng, batch)))
  example = make()
  axes = default_user_axes(example)
  weights = rng.integers(0, 2**63, size=example_words(example, axes), dtype=np.uint64) * 2 + 1
  root = Path(tempfile.mkdtemp(prefix=f"bench_bank_{kind}_", dir=directory))
  load = os.getloadavg()[0]
  try:
    if kind == "old":
      Bank = old_bank_class(_OLD_COMMIT.value)
      bank = Bank.create(root / "bank", example, num_users=users, num_shards=16, fsync=fsync)
    else:
      Bank = MemoryBank
      bank = Bank.create(root / "bank", example, num_users=users, fsync=fsync)
    digests = np.zeros(users, np.uint64)
    stored = np.zeros(users, np.int64)
    write_s = write_cpu = 0.0
    order = rng.permutation(users)
    for start in range(0, users, batch):
      ids = order[start:start + batch]
      memory = make()
      if len(ids) < batch:
        memory = _take(memory, len(ids), axes)
      t0, c0 = time.perf_counter(), time.process_time()
      bank.write(ids, memory)
      write_s += time.perf_counter() - t0
      write_cpu += time.process_time() - c0
      digests[ids] = user_digests(memory, axes, weights)
      stored[ids] = C.stored_bytes(memory)
    bank.close()

    bank = Bank.open(root / "bank")
    read_s, read_cpu, bad = 0.0, 0.0, 0
    order = rng.permutation(users)
    for start in range(0, users, batch):
      ids = order[start:start + batch]
      t0, c0 = time.perf_counter(), time.process_time()
      memory = bank.read(ids)
      read_s += time.perf_counter() - t0
      read_cpu += time.process_time() - c0
      bad += int((user_digests(memory, axes, weights) != digests[ids]).sum())
    result = dict(write_s=write_s, read_s=read_s, write_cpu=write_cpu, read_cpu=read_cpu,
                  mismatches=bad, disk=bank.bytes_on_disk(),
                  per_user=bank.bytes_per_user, stored=int(stored.sum()),
                  reference=C.bytes_per_user(example), shared=C.shared_nbytes(example),
                  load=load)
    bank.close()
  finally:
    shutil.rmtree(root)
  return result


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  users, batch = _USERS.value, _BATCH.value
  kinds = (["old"] if _OLD.value else []) + ["new"]
  results = {}
  for kind in kinds:
    results[kind] = r = run(kind, users, batch, _DIR.value, _FSYNC.value)
    print(f"[{kind}] load average at start {r['load']:.2f}; write "
          f"{users / r['write_s']:,.0f} users/s ({r['write_s']:.2f} s); read "
          f"{users / r['read_s']:,.0f} users/s ({r['read_s']:.2f} s); CPU time per user "
          f"(all threads) write {r['write_cpu'] / users * 1e6:.0f} us, read "
          f"{r['read_cpu'] / users * 1e6:.0f} us; bit-exact "
          f"{users - r['mismatches']}/{users}; disk {r['disk'] / users:,.1f} B/user", flush=True)
  r = results["new"]
  print(f"memory: lowrank rank {RANK} float32 of HSTU (L={L}, H={H}, T={T}, head dim {DK}); "
        f"{r['per_user']} B per user of buffer (compressors.bytes_per_user: "
        f"{r['reference']:.0f}), shared bases {r['shared']} B once")
  print(f"users {users}, batches of {batch}, fsync={_FSYNC.value}; load average now "
        f"{os.getloadavg()[0]:.2f} (machine shared with other jobs)")
  print(f"stored bytes per user (compressors.stored_bytes): "
        f"{r['stored'] / users:,.1f}")
  for kind in kinds:
    k = results[kind]
    print(f"{kind}: disk {k['disk'] / users:,.1f} B/user = {k['disk'] / k['stored']:.4f} x stored"
          f", {k['disk'] / users / k['per_user']:.4f} x buffer")
  if "old" in results:
    o = results["old"]
    print(f"write new/old: {o['write_s'] / r['write_s']:.2f}x; read new/old: "
          f"{o['read_s'] / r['read_s']:.2f}x (throughput); CPU time per user new/old: write "
          f"{r['write_cpu'] / o['write_cpu']:.2f}x, read {r['read_cpu'] / o['read_cpu']:.2f}x")
  bad = {k: v["mismatches"] for k, v in results.items() if v["mismatches"]}
  if bad:
    raise SystemExit(f"users read back differently: {bad}")


if __name__ == "__main__":
  app.run(main)
