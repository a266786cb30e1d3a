"""A sharded on-disk bank of compressed per-user memories, written and read by user id.

Usage::

  bank = MemoryBank.create(path, example_memory, num_users=100_000, num_shards=16)
  bank.write(user_ids, memory)   # memory: a batch of len(user_ids) users, any memory pytree
  memory = bank.read(user_ids)   # the same pytree type with NumPy leaves, in that order
  bank.close()
  bank = MemoryBank.open(path)

Any memory pytree can be stored: a :class:`~malloc_jax.cache.Cache`, or what a compressor
returns (``DenseMemory``, ``KiviMemory``, ``LowRankMemory``, ...). Each leaf's user axis is
explicit: ``user_axes`` maps every leaf path (``"index.ts"``, ``"k_codes"``) to an axis, or
to None for a leaf shared by all users (stored once, returned with every read); it may also
be a function ``(path, leaf) -> axis``. By default (:func:`default_user_axes`) leaves under a
memory's ``shared_fields`` (e.g. low-rank bases) are shared, leaves of rank <= 2 ([B]
lengths, [B, T] time stamps of a DenseIndex) have users on axis 0, and layer-stacked leaves
of rank >= 3 ([L, B, ...]: keys, values, packed codes, scales, pos, ts) on axis 1. Static
fields (``QuantSpec``, ``Cache.contiguous``) are kept in a template and come back unchanged.

Files::

  MANIFEST.json       format name and version, users, shards, the leaf table (path, per-user
                      shape, dtype, user axis, byte offset in a record), crc32 of the next two
  template.pkl        the pytree structure (leaves replaced by ints) with its static fields
  shared.bin          the shared leaves, stored once
  shards/00003.slots  fixed-size records: one user's per-user leaves, bytes concatenated
  shards/00003.index.0000000042
                      shard 3's index at its 42nd commit: per local user, the slot (int32,
                      -1: never written) and the record's crc32; a header (magic, format
                      version, shard, users, commit) and a crc32 trailer. The highest commit
                      present is current.
  LOCK                flock'ed by the one process that writes

User ``u`` lives in shard ``u % num_shards`` at local index ``u // num_shards``.

Updates are shadow paging, one record at a time. A write puts each user's new record into a
free slot of its shard's slots file (a slot that the current index does not point to; the
file grows when none is free). The touched slots files are fdatasync'ed, the touched shards'
next indexes are written to temporary files and fsync'ed (concurrently: fsyncs issued
together share the file system's journal commits), and each is renamed to its next commit
number: that rename is the shard's atomic commit. Only then are the superseded index files
deleted and the users' old slots freed for reuse. (Renaming to a new name rather than over
the old index avoids the flush that ext4 forces on a rename over an existing file, about 3 ms
per shard here.) Whenever a process is killed (or, with ``fsync=True``, the machine loses
power), the newest index of every shard points to complete records, so each user reads
entirely old or entirely new; a call's users in one shard commit together, shards commit one
after another. Slots are reused, so nothing needs garbage collection or compaction: a slots
file holds at most its live users plus one batch of records. A batch of 256 users costs 256
record writes, one index rewrite (8 bytes per user of the shard) per touched shard, and three
rounds of fsyncs.

Integrity: each record's crc32 is kept in the index and checked on read (``verify=False``
skips it); the indexes, the template and the shared leaves carry their own crc32, checked at
open. A mismatch raises :class:`BankCorruptedError` naming the shard and file. Reading a user
never written raises KeyError naming the id; writing a memory whose structure, static fields,
per-user shapes or dtypes differ from the bank's raises ValueError naming the leaf.

One process writes at a time (``LOCK``). A reader in another process sees the indexes as of
``open`` (or :meth:`MemoryBank.refresh`); a record replaced under it fails its checksum, and
the read reloads that shard's index and retries once. ``template.pkl`` is a pickle: open only
banks you trust.

References: R. A. Lorie, "Physical Integrity in a Large Segmented Database", ACM TODS 2(1),
  1977 (shadow paging).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.fileio import fsync_dir, write_bytes

FORMAT = "malloc_jax.bank"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
_MAGIC = b"MJXBANK\x00"
_HEADER = struct.Struct("<8sIIQQ")  # magic, format version, shard, local users, commit
_TRAILER = struct.Struct("<I")  # crc32 of header + entries
_ENTRY = np.dtype([("slot", "<i4"), ("crc", "<u4")])
_ALIGN = 8  # byte alignment of each leaf inside a record

UserAxes = Mapping[str, int | None] | Callable[[str, Any], int | None] | None


class BankCorruptedError(RuntimeError):
  """A bank file is missing, truncated or fails its checksum."""


class BankLockedError(RuntimeError):
  """Another process is writing to the bank."""


# ----------------------------------------------------------------------------------------
# Leaves and their user axes.


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(getattr(key, "key", key))


def _path_str(path) -> str:
  return ".".join(_key_name(k) for k in path) or "<root>"


def _is_shared(memory, path) -> bool:
  """Whether a leaf sits under a field named in some enclosing node's ``shared_fields``."""
  obj = memory
  for key in path:
    if _key_name(key) in getattr(obj, "shared_fields", ()):
      return True
    if isinstance(key, jax.tree_util.GetAttrKey):
      obj = getattr(obj, key.name, None)
    elif isinstance(key, jax.tree_util.DictKey | jax.tree_util.SequenceKey):
      try:
        obj = obj[key.key if isinstance(key, jax.tree_util.DictKey) else key.idx]
      except (KeyError, IndexError, TypeError):
        return False
    else:
      return False
  return False


def leaf_paths(memory) -> list[str]:
  """Dotted paths of a memory's leaves in flattening order (``"index.ts"``, ``"k"``)."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(memory)[0]]


def default_user_axes(memory) -> dict[str, int | None]:
  """The default user axis of each leaf of a memory of this package.

  Leaves under a node's ``shared_fields`` -> None (shared, stored once); rank <= 2 -> 0
  ([B] lengths, [B, T] DenseIndex time stamps); rank >= 3 -> 1 (layer-stacked [L, B, ...]).

  Args:
    memory: a batch of memories (Cache, DenseMemory, KiviMemory, LowRankMemory, ...).

  Returns:
    {leaf path: axis or None}, to pass (edited if needed) as ``user_axes``.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(memory)[0]:
    if _is_shared(memory, path):
      out[_path_str(path)] = None
    else:
      out[_path_str(path)] = 0 if np.ndim(leaf) <= 2 else 1
  return out


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One leaf: per-user shape (user axis removed) or, if shared, the whole shape."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  axis: int | None  # None: shared by all users
  offset: int  # byte offset inside a record (per-user) or inside shared.bin (shared)
  nbytes: int  # bytes per user (per-user) or in all (shared)

  def to_json(self) -> dict:
    return dict(path=self.path, shape=list(self.shape), dtype=self.dtype.name, axis=self.axis,
                offset=self.offset, nbytes=self.nbytes)

  @classmethod
  def from_json(cls, d: dict) -> LeafSpec:
    return cls(path=d["path"], shape=tuple(d["shape"]), dtype=np.dtype(jnp.dtype(d["dtype"])),
               axis=d["axis"], offset=d["offset"], nbytes=d["nbytes"])

  def full_shape(self, users: int) -> tuple[int, ...]:
    if self.axis is None:
      return self.shape
    return self.shape[:self.axis] + (users,) + self.shape[self.axis:]


def _resolve_axes(memory, user_axes: UserAxes) -> list[tuple[str, np.ndarray, int | None]]:
  """(path, leaf as NumPy, axis) per leaf; ValueError names a leaf without a valid axis."""
  flat = jax.tree_util.tree_flatten_with_path(memory)[0]
  if user_axes is None:
    user_axes = default_user_axes(memory)
  out = []
  for path, leaf in flat:
    name = _path_str(path)
    arr = np.asarray(leaf)
    if callable(user_axes):
      axis = user_axes(name, leaf)
    elif name in user_axes:
      axis = user_axes[name]
    else:
      raise ValueError(f"user_axes has no entry for leaf '{name}' (leaves: "
                       f"{[_path_str(p) for p, _ in flat]})")
    if axis is not None:
      if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"leaf '{name}' of shape {arr.shape} has no axis {axis} to hold users")
      axis %= arr.ndim
    out.append((name, arr, axis))
  return out


def _align(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------
# Small file helpers.


def _index_name(shard: int, commit: int) -> str:
  return f"{shard:05d}.index.{commit:010d}"


def _index_bytes(shard: int, commit: int, entries: np.ndarray) -> bytes:
  body = (_HEADER.pack(_MAGIC, FORMAT_VERSION, shard, len(entries), commit) +
          entries.tobytes())
  return body + _TRAILER.pack(zlib.crc32(body))


def _local_users(num_users: int, num_shards: int, shard: int) -> int:
  return (num_users - shard + num_shards - 1) // num_shards


# ----------------------------------------------------------------------------------------
# The bank.


class MemoryBank:
  """Compressed memories of ``num_users`` users on disk, by user id (see module docstring)."""

  def __init__(self, path: Path, manifest: dict, fsync: bool):
    """Use :meth:`create` or :meth:`open`."""
    self.path = path
    self.fsync = fsync
    self.num_users = int(manifest["num_users"])
    self.num_shards = int(manifest["num_shards"])
    self.record_nbytes = int(manifest["record_nbytes"])
    self.specs = [LeafSpec.from_json(d) for d in manifest["leaves"]]
    self._paths = [s.path for s in self.specs]
    template = self._read_checked(path / manifest["template"], manifest["template_crc32"])
    self.treedef = jax.tree.structure(pickle.loads(template))
    shared = self._read_checked(path / manifest["shared"], manifest["shared_crc32"])
    self._shared = {}
    for s in self.specs:
      if s.axis is None:
        self._shared[s.path] = np.frombuffer(shared, s.dtype, count=int(np.prod(s.shape)),
                                             offset=s.offset).reshape(s.shape)
    self._fds: dict[int, int] = {}
    self._lock_fd: int | None = None
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._index: list[np.ndarray] = [None] * self.num_shards  # type: ignore[list-item]
    self._used: list[np.ndarray] = [None] * self.num_shards  # type: ignore[list-item]
    self._commit: list[int] = [0] * self.num_shards
    self.refresh()

  # -- creation and opening --------------------------------------------------------------

  @classmethod
  def create(cls, path: str | os.PathLike, example: Any, *, num_users: int,
             num_shards: int = 16, user_axes: UserAxes = None,
             fsync: bool = True) -> MemoryBank:
    """Creates an empty bank for memories shaped like ``example`` (a batch of any size).

    Args:
      path: directory to create (it may exist if empty).
      example: a batch of memories; fixes the structure, static fields, per-user shapes and
        dtypes, and the shared leaves (stored once, from this example).
      num_users: user ids are 0 .. num_users - 1.
      num_shards: users are spread over shards by ``id % num_shards``.
      user_axes: each leaf's user axis: {leaf path: axis or None (shared)}, a function
        ``(path, leaf) -> axis``, or None for :func:`default_user_axes`.
      fsync: fsync data before each commit (durable against power loss, not only crashes).

    Returns:
      The open bank.
    """
    path = Path(path).absolute()
    if num_users < 1:
      raise ValueError(f"num_users={num_users} must be >= 1")
    if not 1 <= num_shards <= num_users:
      raise ValueError(f"num_shards={num_shards} must be in [1, num_users={num_users}]")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
      raise FileExistsError(f"{path} exists and is not an empty directory")
    leaves = _resolve_axes(example, user_axes)
    specs, offset, shared_offset, shared_parts, users = [], 0, 0, [], None
    for name, arr, axis in leaves:
      if axis is None:
        data = np.ascontiguousarray(arr).tobytes()
        specs.append(LeafSpec(name, arr.shape, arr.dtype, None, shared_offset, len(data)))
        shared_parts.append(data + bytes(_align(len(data)) - len(data)))
        shared_offset += _align(len(data))
        continue
      if users is None:
        users = (name, arr.shape[axis])
      elif arr.shape[axis] != users[1]:
        raise ValueError(f"leaf '{name}' has {arr.shape[axis]} users on axis {axis} but leaf "
                         f"'{users[0]}' has {users[1]}: pass user_axes explicitly")
      shape = arr.shape[:axis] + arr.shape[axis + 1:]
      nbytes = int(np.prod(shape, dtype=np.int64)) * arr.dtype.itemsize
      specs.append(LeafSpec(name, shape, arr.dtype, axis, offset, nbytes))
      offset += _align(nbytes)
    if offset == 0:
      raise ValueError("the example memory has no per-user bytes to store")
    template = pickle.dumps(jax.tree.unflatten(jax.tree.structure(example),
                                               list(range(len(leaves)))))
    shared = b"".join(shared_parts)

    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    (tmp / "shards").mkdir(parents=True)
    write_bytes(tmp / "template.pkl", template, fsync)
    write_bytes(tmp / "shared.bin", shared, fsync)
    for s in range(num_shards):
      entries = np.zeros(_local_users(num_users, num_shards, s), _ENTRY)
      entries["slot"] = -1
      write_bytes(tmp / "shards" / _index_name(s, 0), _index_bytes(s, 0, entries), fsync)
      write_bytes(tmp / "shards" / f"{s:05d}.slots", b"", fsync)
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, num_users=num_users,
                    num_shards=num_shards, record_nbytes=offset,
                    leaves=[s.to_json() for s in specs], template="template.pkl",
                    template_crc32=zlib.crc32(template), shared="shared.bin",
                    shared_crc32=zlib.crc32(shared))
    write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode(), fsync)
    if fsync:
      fsync_dir(tmp / "shards")
      fsync_dir(tmp)
    os.replace(tmp, path)  # atomic; replaces an empty directory
    if fsync:
      fsync_dir(path.parent)
    return cls.open(path, fsync=fsync)

  @classmethod
  def open(cls, path: str | os.PathLike, *, fsync: bool = True) -> MemoryBank:
    """Opens an existing bank (checks format version and checksums of its small files)."""
    path = Path(path).absolute()
    mpath = path / MANIFEST
    if not mpath.exists():
      raise FileNotFoundError(f"{mpath} does not exist: not a memory bank")
    try:
      manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BankCorruptedError(f"{mpath} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
      raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{mpath}: format version {manifest.get('format_version')!r}, this code "
                       f"reads version {FORMAT_VERSION}")
    return cls(path, manifest, fsync)

  def _read_checked(self, path: Path, crc: int) -> bytes:
    try:
      data = path.read_bytes()
    except FileNotFoundError as e:
      raise BankCorruptedError(f"bank file {path} is missing") from e
    if zlib.crc32(data) != crc:
      raise BankCorruptedError(f"bank file {path} checksum mismatch")
    return data

  # -- indexes -----------------------------------------------------------------------------

  def _shard_file(self, shard: int, ext: str) -> Path:
    return self.path / "shards" / f"{shard:05d}.{ext}"

  def _index_files(self) -> dict[int, list[tuple[int, Path]]]:
    """shard -> [(commit, committed index file)], newest first."""
    out: dict[int, list[tuple[int, Path]]] = {s: [] for s in range(self.num_shards)}
    for name in os.listdir(self.path / "shards"):
      parts = name.split(".")
      if len(parts) == 3 and parts[1] == "index" and parts[2].isdigit():
        out.setdefault(int(parts[0]), []).append((int(parts[2]), self.path / "shards" / name))
    for files in out.values():
      files.sort(reverse=True)
    return out

  def _load_index(self, shard: int, files: list[tuple[int, Path]] | None = None
                  ) -> tuple[int, np.ndarray]:
    """(commit, entries) of a shard's newest committed index file."""
    for attempt in range(3):
      if files is None or attempt:
        files = self._index_files()[shard]
      if not files:
        raise BankCorruptedError(f"shard {shard} file {self.path / 'shards'}/"
                                 f"{shard:05d}.index.* is missing")
      commit, path = files[0]
      try:
        data = path.read_bytes()
        break
      except FileNotFoundError:  # a writer committed a newer one meanwhile
        continue
    else:
      raise BankCorruptedError(f"shard {shard} file {path} is missing")
    n = _local_users(self.num_users, self.num_shards, shard)
    if len(data) != _HEADER.size + n * _ENTRY.itemsize + _TRAILER.size:
      raise BankCorruptedError(f"shard {shard} file {path} has {len(data)} bytes, expected "
                               f"{_HEADER.size + n * _ENTRY.itemsize + _TRAILER.size}")
    body = data[:-_TRAILER.size]
    if zlib.crc32(body) != _TRAILER.unpack(data[-_TRAILER.size:])[0]:
      raise BankCorruptedError(f"shard {shard} file {path} checksum mismatch")
    magic, version, s, count, c = _HEADER.unpack(body[:_HEADER.size])
    if magic != _MAGIC or version != FORMAT_VERSION or s != shard or count != n or c != commit:
      raise BankCorruptedError(f"shard {shard} file {path} has a bad header (magic {magic!r}, "
                               f"version {version}, shard {s}, users {count}, commit {c})")
    return commit, np.frombuffer(body, _ENTRY, count=n, offset=_HEADER.size).copy()

  def refresh(self) -> None:
    """Reloads every shard's index from disk (a reader sees other processes' writes)."""
    files = self._index_files()
    for shard in range(self.num_shards):
      commit, entries = self._load_index(shard, files[shard])
      slots = entries["slot"][entries["slot"] >= 0]
      spath = self._shard_file(shard, "slots")
      try:
        capacity = os.stat(spath).st_size // self.record_nbytes
      except FileNotFoundError as e:
        raise BankCorruptedError(f"shard {shard} file {spath} is missing") from e
      used = np.zeros(capacity, bool)
      if len(slots) and (slots.max() >= capacity or len(np.unique(slots)) != len(slots)):
        raise BankCorruptedError(f"shard {shard} file {files[shard][0][1]} points past the "
                                 f"end of {spath} or twice to one slot")
      used[slots] = True
      self._index[shard], self._used[shard], self._commit[shard] = entries, used, commit

  def _fd(self, shard: int) -> int:
    if shard not in self._fds:
      flags = os.O_RDWR if self._lock_fd is not None else os.O_RDONLY
      self._fds[shard] = os.open(self._shard_file(shard, "slots"), flags)
    return self._fds[shard]

  def _close_fds(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

  def _acquire(self) -> None:
    """Takes the writer lock (once) and reloads the indexes under it."""
    if self._lock_fd is not None:
      return
    fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      os.close(fd)
      raise BankLockedError(f"{self.path} is being written by another process "
                            f"({self.path / 'LOCK'} is locked)") from e
    self._lock_fd = fd
    self._close_fds()  # reopen for writing
    self.refresh()
    for shard, files in self._index_files().items():
      for _, old in files[1:]:  # superseded indexes a killed writer did not recycle
        self._recycle(shard, old)

  def close(self) -> None:
    """Closes files and releases the writer lock."""
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    self._close_fds()
    if self._lock_fd is not None:
      os.close(self._lock_fd)  # releases the flock
      self._lock_fd = None

  def __enter__(self) -> MemoryBank:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass

  # -- sizes -------------------------------------------------------------------------------

  @property
  def bytes_per_user(self) -> int:
    """In-memory bytes of one user's per-user leaves (shared leaves excluded), as
    ``compressors.bytes_per_user`` counts them."""
    return sum(s.nbytes for s in self.specs if s.axis is not None)

  def bytes_on_disk(self) -> int:
    """Bytes of every file of the bank."""
    total = 0
    for root, _, files in os.walk(self.path):
      total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total

  def __len__(self) -> int:
    """Number of users written so far."""
    return int(sum((e["slot"] >= 0).sum() for e in self._index))

  def contains(self, user_ids) -> np.ndarray:
    """bool [n]: whether each id has been written."""
    ids = self._ids(user_ids)
    ok = (ids >= 0) & (ids < self.num_users)
    out = np.zeros(len(ids), bool)
    for i in np.flatnonzero(ok):
      out[i] = self._index[ids[i] % self.num_shards]["slot"][ids[i] // self.num_shards] >= 0
    return out

  def __repr__(self) -> str:
    return (f"MemoryBank({str(self.path)!r}, users={len(self)}/{self.num_users}, "
            f"shards={self.num_shards}, record={self.record_nbytes} B)")

  # -- reading -----------------------------------------------------------------------------

  @staticmethod
  def _ids(user_ids) -> np.ndarray:
    ids = np.asarray(user_ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"user ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64)

  def _pread(self, shard: int, slot: int, out: np.ndarray) -> None:
    got = os.preadv(self._fd(shard), [out], slot * self.record_nbytes)
    if got != self.record_nbytes:
      raise BankCorruptedError(f"shard {shard} file {self._shard_file(shard, 'slots')} is "
                               f"truncated: slot {slot} has {got} of {self.record_nbytes} bytes")

  def read(self, user_ids, *, verify: bool = True) -> Any:
    """Reads the memories of ``user_ids`` (any order, repeats allowed).

    Args:
      user_ids: int ids [n].
      verify: check each record's crc32 (about 2 GB/s of records on one core).

    Returns:
      A memory pytree of the bank's structure holding n users (NumPy leaves, user axes as
      written; shared leaves as stored).

    Raises:
      KeyError: an id was never written (or is out of range).
      BankCorruptedError: a record fails its checksum or a file is truncated.
    """
    ids = self._ids(user_ids)
    n, S = len(ids), self.num_shards
    bad = np.flatnonzero((ids < 0) | (ids >= self.num_users))
    if len(bad):
      raise KeyError(f"user {ids[bad[0]]} is not in the bank {self.path} (ids are "
                     f"0..{self.num_users - 1})")
    shard, local = ids % S, ids // S
    entries = np.empty(n, _ENTRY)
    for s in np.unique(shard):
      m = shard == s
      entries[m] = self._index[s][local[m]]
    missing = np.flatnonzero(entries["slot"] < 0)
    if len(missing):
      raise KeyError(f"user {ids[missing[0]]} was never written to the bank {self.path}")
    out = np.empty((n, self.record_nbytes), np.uint8)
    for i in range(n):
      s, slot = int(shard[i]), int(entries["slot"][i])
      self._pread(s, slot, out[i])
      if verify and zlib.crc32(out[i]) != entries["crc"][i]:
        self._reread(s, int(local[i]), int(ids[i]), slot, out[i])
    return self._unflatten(out)

  def _reread(self, shard: int, local: int, uid: int, slot: int, row: np.ndarray) -> None:
    """A record failed its checksum: retry with the shard's index on disk, else raise."""
    if self._lock_fd is None:  # a reader's index may be stale
      self._commit[shard], self._index[shard] = self._load_index(shard)
    entry = self._index[shard][local]
    if entry["slot"] != slot and entry["slot"] >= 0:
      self._pread(shard, int(entry["slot"]), row)
      if zlib.crc32(row) == entry["crc"]:
        return
      slot = int(entry["slot"])
    raise BankCorruptedError(f"shard {shard} file {self._shard_file(shard, 'slots')} checksum "
                             f"mismatch (user {uid}, slot {slot}): the bank is corrupted")

  def _unflatten(self, records: np.ndarray) -> Any:
    n = len(records)
    leaves = []
    for s in self.specs:
      if s.axis is None:
        leaves.append(self._shared[s.path].copy())
        continue
      x = records[:, s.offset:s.offset + s.nbytes].view(s.dtype).reshape((n,) + s.shape)
      leaves.append(np.ascontiguousarray(np.moveaxis(x, 0, s.axis)))
    return jax.tree.unflatten(self.treedef, leaves)

  # -- writing -----------------------------------------------------------------------------

  def _records(self, memory) -> tuple[np.ndarray, int]:
    """Checks ``memory`` against the bank and packs it into records [B, record_nbytes]."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(memory)
    if treedef != self.treedef:
      paths = [_path_str(p) for p, _ in flat]
      if paths != self._paths:
        first = next((a for a, b in zip(self._paths + [None], paths + [None]) if a != b))
        missing = [p for p in self._paths if p not in paths]
        extra = [p for p in paths if p not in self._paths]
        raise ValueError(f"memory structure differs from the bank's at leaf '{first}' "
                         f"(missing {missing}, unexpected {extra}; the bank stores "
                         f"{self._paths})")
      raise ValueError(f"memory's node types or static fields differ from the bank's: got "
                       f"{str(treedef)[:400]}, expected {str(self.treedef)[:400]}")
    batch = None
    arrays = []
    for spec, (_, leaf) in zip(self.specs, flat):
      arr = np.asarray(leaf)
      users = arr.shape[spec.axis] if spec.axis is not None and arr.ndim > spec.axis else None
      if batch is None and users is not None:
        batch = users
      want = spec.full_shape(batch if batch is not None else 0)
      if arr.dtype != spec.dtype or arr.shape != want:
        where = "shared" if spec.axis is None else f"users on axis {spec.axis}"
        raise ValueError(f"leaf '{spec.path}': expected {spec.dtype.name}{list(want)} ({where}), "
                         f"got {arr.dtype.name}{list(arr.shape)}")
      if spec.axis is None:
        if arr.tobytes() != self._shared[spec.path].tobytes():
          raise ValueError(f"leaf '{spec.path}' is shared by all users and differs from the "
                           f"bank's copy (a bank holds memories of one set of shared leaves)")
      arrays.append(arr)
    records = np.zeros((batch, self.record_nbytes), np.uint8)
    for spec, arr in zip(self.specs, arrays):
      if spec.axis is not None and spec.nbytes:
        x = np.ascontiguousarray(np.moveaxis(arr, spec.axis, 0)).reshape(batch, -1)
        records[:, spec.offset:spec.offset + spec.nbytes] = x.view(np.uint8)
    return records, batch

  def _allocate(self, shard: int, k: int) -> np.ndarray:
    """k free slots of a shard (lowest first; the slots file grows if needed), marked used."""
    used = self._used[shard]
    free = np.flatnonzero(~used)
    if len(free) < k:
      used = np.concatenate([used, np.zeros(k - len(free), bool)])
      free = np.flatnonzero(~used)
      self._used[shard] = used
    slots = free[:k]
    used[slots] = True
    return slots

  def _write_rows(self, shard: int, slots: np.ndarray, rows: np.ndarray) -> None:
    """pwrites rows [k, R] to sorted slots, one call per run of consecutive slots."""
    fd, R = self._fd(shard), self.record_nbytes
    breaks = (np.flatnonzero(np.diff(slots) != 1) + 1).tolist()
    for a, b in zip([0] + breaks, breaks + [len(slots)]):
      data = memoryview(rows[a:b]).cast("B")
      done = 0
      while done < len(data):
        done += os.pwrite(fd, data[done:], int(slots[a]) * R + done)

  def _stage_index(self, shard: int, entries: np.ndarray) -> Path:
    """Writes (and syncs) a shard's next index into its spare file; returns the file.

    The spare is a superseded index of the same size, overwritten in place: no blocks are
    allocated or freed (freeing an fsync'ed file's blocks costs about 3 ms on ext4).
    """
    spare = self._shard_file(shard, "index.spare")
    data = _index_bytes(shard, self._commit[shard] + 1, entries)
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
      reused = os.fstat(fd).st_size == len(data)
      if not reused:
        os.ftruncate(fd, 0)
      view, done = memoryview(data), 0
      while done < len(data):
        done += os.write(fd, view[done:])
      if self.fsync:
        (os.fdatasync if reused else os.fsync)(fd)
    finally:
      os.close(fd)
    return spare

  def _recycle(self, shard: int, old: Path) -> None:
    """Keeps a superseded index file as the shard's spare (or deletes it if one exists)."""
    spare = self._shard_file(shard, "index.spare")
    if spare.exists():
      old.unlink()
    else:
      os.rename(old, spare)

  def _parallel(self, fn, items) -> list:
    """fn over items on a few threads (fsync and file writes release the GIL)."""
    if len(items) <= 1:
      return [fn(x) for x in items]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(min(16, self.num_shards),
                                                         thread_name_prefix="bank")
    return list(self._pool.map(fn, items))

  def write(self, user_ids, memory) -> None:
    """Writes (or overwrites) the memories of ``user_ids``; each user's update is atomic.

    Records go to free slots, the touched slots files are fdatasync'ed together, the touched
    shards' next indexes are written and fsync'ed together, then renamed over the current
    ones in shard order (the commits; concurrent fsyncs share the file system's journal
    commits, so a call costs about three fsync latencies however many shards it touches).

    Args:
      user_ids: int ids [B], distinct, in 0 .. num_users - 1.
      memory: a batch of B users, of the bank's structure, static fields, shapes and dtypes
        (JAX or NumPy leaves); shared leaves must equal the bank's.

    Raises:
      ValueError: the memory does not match the bank (naming the leaf), or bad ids.
      BankLockedError: another process is writing.
    """
    ids = self._ids(user_ids)
    records, batch = self._records(memory)
    if batch != len(ids):
      raise ValueError(f"{len(ids)} user ids for a memory of {batch} users")
    bad = np.flatnonzero((ids < 0) | (ids >= self.num_users))
    if len(bad):
      raise ValueError(f"user id {ids[bad[0]]} is outside the bank's ids "
                       f"0..{self.num_users - 1}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"user {uniq[counts > 1][0]} appears more than once in one write")
    if not len(ids):
      return
    self._acquire()
    S = self.num_shards
    shard, local = ids % S, ids // S
    pending = {}  # shard -> (next index entries, new slots): not yet committed
    try:
      for s in map(int, np.unique(shard)):
        rows = np.flatnonzero(shard == s)
        slots = self._allocate(s, len(rows))
        entries = self._index[s].copy()
        entries["slot"][local[rows]] = slots
        entries["crc"][local[rows]] = [zlib.crc32(records[i]) for i in rows]
        pending[s] = (entries, slots)
        self._write_rows(s, slots, records[rows])
      if self.fsync:
        self._parallel(lambda s: os.fdatasync(self._fd(s)), list(pending))
      staged = self._parallel(lambda s: (s, self._stage_index(s, pending[s][0])), list(pending))
      superseded = []
      for s, spare in staged:  # the commits: one rename to a new name per shard
        os.replace(spare, self.path / "shards" / _index_name(s, self._commit[s] + 1))
        superseded.append((s, self.path / "shards" / _index_name(s, self._commit[s])))
        entries, _ = pending.pop(s)
        old = self._index[s]["slot"][local[shard == s]]
        self._index[s] = entries
        self._commit[s] += 1
        self._used[s][old[old >= 0]] = False  # the old records may now be reused
      if self.fsync:
        fsync_dir(self.path / "shards")
      for s, path in superseded:
        self._recycle(s, path)
    finally:
      for s, (_, slots) in pending.items():  # uncommitted: their slots are free again
        self._used[s][slots] = False
