"""A bank of compressed per-user memories on TensorStore, written and read by user id.

Usage::

  bank = MemoryBank.create("bank/", example_memory, num_users=100_000)
  bank.write(user_ids, memory)   # memory: a batch of len(user_ids) users, any memory pytree
  memory = bank.read(user_ids)   # the same pytree type with NumPy leaves, in that order
  bank.close()
  bank = MemoryBank.open("bank/")

Where the bank lives is a TensorStore key-value store: a local directory (``"bank/"``: an
OCDBT database over ``file://``, the default), or any kvstore spec, e.g.
``{"driver": "ocdbt", "base": "gs://bucket/banks/users/"}`` for a bucket or
``"memory://"`` for an in-process store (a memory store lives as long as the process and is
shared by every bank of this module).

Any memory pytree of registered types can be stored: a :class:`~malloc_jax.cache.Cache` or
what a compressor returns (``DenseMemory``, ``KiviMemory``, ``LowRankMemory``, ...; see
:func:`register_memory_type`). Each leaf's user axis is explicit: ``user_axes`` maps every
leaf path (``"index.ts"``, ``"k_codes"``) to an axis, or to None for a leaf shared by all
users (stored once, returned with every read); it may also be a function
``(path, leaf) -> axis``. By default (:func:`default_user_axes`) leaves under a memory's
``shared_fields`` (e.g. low-rank bases) are shared, leaves of rank <= 2 ([B] lengths, [B, T]
time stamps of a DenseIndex) have users on axis 0, and layer-stacked leaves of rank >= 3
([L, B, ...]) on axis 1.

Layout (keys of the key-value store)::

  bank.json          what the bank holds, as JSON: format and version, users, the memory's
                     structure (registered type names, static fields), the leaf table (path,
                     array, per-user shape, dtype, user axis), how records are stored, the
                     SHA-256 of every shared leaf's zarr.json; and the SHA-256 of all that.
                     Written last at creation.
  users/0000000042   one key per user: its record as a blosc-lz4 frame (python-blosc), then
                     the crc32c of key and frame (4 bytes little-endian; google-crc32c).
  s000/ ...          one zarr3 array per shared leaf, one chunk, bytes -> crc32c.

A user's record is its per-user leaves' bytes (user axis removed, C order, little-endian) one
after another in leaf order, each at a multiple of 8 bytes (:func:`record_layout`, derived
from the leaf table: the metadata holds no offsets). One key per user, written through the
OCDBT :class:`tensorstore.KvStore` directly: a zarr3 array of records (one chunk per user,
bytes -> blosc -> crc32c codecs; format version 3) cost about twice the CPU per user written
(109 against 50 us at 20,000 users) and a little more per read (43 against 36 us), the
machine being shared (BENCHMARKS.md, "TensorStore bank throughput"). A write copies each
leaf into a [B, record bytes] array, compresses each row straight from it and stages B
writes in one transaction; a read issues the B reads at once, checks each value's crc32c and
decompresses it straight into its row of a [B, record bytes] array, then one NumPy copy per
leaf.

Variable lengths: empty slots of a memory (past a user's length, evicted slots) hold zeros
when the compressor zeroes them, and blosc-lz4 stores a run of zeros in a few bytes, so a
user with 40 kept events of 1,024 slots pays about for 40 (tested; ``scripts/bench_bank.py``
prints disk bytes per user against ``stored_bytes``). blosc-lz4 rather than zstd: on float
data that barely compresses it costs about as much CPU as no codec, zstd(1) 1.5-2x more.

Atomicity: all records of one :meth:`MemoryBank.write` are committed in one atomic TensorStore
transaction (an OCDBT commit, or one update of a ``memory://`` store): after a crash at any
point each user of the call is entirely old or entirely new.

Integrity: every record carries the crc32c of its key and frame, checked on every read
before the frame is decoded (with its decoded size checked against the record's); the
shared leaves' chunks a crc32c checked by TensorStore; OCDBT's manifest and B+tree nodes their
own crc32c; ``bank.json`` a SHA-256 of its contents and the SHA-256 of every shared leaf's
``zarr.json``, all checked at :meth:`MemoryBank.open`. A mismatch raises
:class:`BankCorruptedError` naming the key (and, for a local directory, TensorStore names the
database directory or data file). No pickle: the memory's node types are found by registered
name in :data:`MEMORY_TYPES`, static fields are JSON (primitives and ``QuantSpec``), and
opening a crafted bank runs no code of it.

Concurrency: readers in any process see every committed write (records are not cached;
OCDBT re-reads its manifest). Several writer processes may write one bank concurrently: each
write's OCDBT commit is a conditional update of the manifest, so concurrent commits retry
rather than overwrite each other (tested with two processes on a local directory). OCDBT's
distributed coordinator is not supported: TensorStore 0.1.86 refuses multi-key atomic
transactions under a coordinator, and a write spans several keys.

References: Zarr v3 specification (zarr-specs, 2023); Blosc (blosc.org); crc32c (RFC 3720);
  TensorStore OCDBT key-value store (google.github.io/tensorstore/kvstore/ocdbt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import blosc
import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

FORMAT = "malloc_jax.bank"
FORMAT_VERSION = 4  # 1: shard files; 2: a zarr3 array per leaf; 3: a zarr3 array of records
METADATA_KEY = "bank.json"
_LITTLE_ENDIAN = sys.byteorder == "little"
RECORDS = "users"  # the users' records: keys "users/0000000042" (:func:`record_key`)
_ALIGN = 8  # each leaf starts at a multiple of 8 bytes of the record
# How a record is stored (recorded in bank.json and checked at open): a blosc-lz4 frame of the
# record (a run of zeros, e.g. a user's empty slots, costs a few bytes), then the crc32c of key
# and frame (4 bytes, little-endian).
_RECORD_CODEC = {"compressor": "blosc", "cname": "lz4", "clevel": 1, "shuffle": "noshuffle",
                 "typesize": 1, "checksum": "crc32c(key + frame), 4 bytes little-endian"}
_SHARED_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
# B+tree nodes of at most 4 KiB, uncompressed (OCDBT's default: 8 MiB, zstd). A commit
# re-encodes every B+tree leaf it touches; with random ids and large nodes that is every leaf,
# so its cost grows with the bank. At 100,000 users (CPU per user write / read, disk per
# user; machine shared, load 16-19): 4 KiB 96 / 44 us, 31,041 B; 16 KiB 133 / 45, 32,857;
# 64 KiB 135 / 47, 33,652; 256 KiB 97 / 44, 32,449 (BENCHMARKS.md, issue 19 throughput).
_OCDBT_CONFIG = {"max_decoded_node_bytes": 4096, "compression": None}
_DTYPES = frozenset(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "float16", "bfloat16", "float32", "float64"])
_DATA_CACHE = "cache_pool#malloc_jax_bank_data"  # shared leaves: read once at open
# One root context for every bank of the process: a "memory://" bank can be reopened, and
# OCDBT's B+tree nodes (immutable once written) are cached across reads.
_ROOT_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20},
                            _DATA_CACHE: {"total_bytes_limit": 0}})
_CRC = struct.Struct("<I")

UserAxes = Mapping[str, int | None] | Callable[[str, Any], int | None] | None
Storage = str | os.PathLike | dict


class BankCorruptedError(RuntimeError):
  """A bank's metadata or chunk is missing, malformed, or fails its checksum."""


# ----------------------------------------------------------------------------------------
# Registered memory types: the only classes a bank's metadata can name.

# name -> class, or (module, attribute) imported on first use (keeps this module light).
MEMORY_TYPES: dict[str, type | tuple[str, str]] = {
    "Cache": ("malloc_jax.cache", "Cache"),
    "DenseIndex": ("malloc_jax.compressors.base", "DenseIndex"),
    "SparseIndex": ("malloc_jax.compressors.base", "SparseIndex"),
    "DenseMemory": ("malloc_jax.compressors.base", "DenseMemory"),
    "KiviMemory": ("malloc_jax.compressors.quantization", "KiviMemory"),
    "IntactKVMemory": ("malloc_jax.compressors.quantization", "IntactKVMemory"),
    "UniformMemory": ("malloc_jax.compressors.quantization", "UniformMemory"),
    "LowRankMemory": ("malloc_jax.compressors.lowrank", "LowRankMemory"),
    "LowRankBases": ("malloc_jax.compressors.lowrank", "LowRankBases"),
    "StateIndex": ("malloc_jax.models.variants.common", "StateIndex"),
    "RWKVState": ("malloc_jax.models.variants.recurrent", "RWKVState"),
    "LinearAttentionState": ("malloc_jax.models.variants.recurrent", "LinearAttentionState"),
    "LinformerMemory": ("malloc_jax.models.variants.sequence", "LinformerMemory"),
}


def register_memory_type(cls: type, name: str | None = None) -> type:
  """Lets banks store memories with nodes of ``cls`` (a registered pytree dataclass).

  Args:
    cls: a ``flax.struct`` dataclass (pytree fields are leaves or nodes; static fields hold
      JSON-able values or a ``QuantSpec``).
    name: the name written into bank metadata (default: the class name); must be unique.

  Returns:
    ``cls`` (usable as a decorator).
  """
  name = name or cls.__name__
  known = MEMORY_TYPES.get(name)
  if known is not None and _resolve(name) is not cls:
    raise ValueError(f"memory type name {name!r} is already registered for {_resolve(name)}")
  MEMORY_TYPES[name] = cls
  return cls


def _resolve(name: str) -> type:
  entry = MEMORY_TYPES[name]
  if isinstance(entry, tuple):
    entry = getattr(importlib.import_module(entry[0]), entry[1])
    MEMORY_TYPES[name] = entry
  return entry


def _type_name(cls: type) -> str | None:
  for name in list(MEMORY_TYPES):
    entry = MEMORY_TYPES[name]
    if entry is cls or (isinstance(entry, tuple) and entry[1] == cls.__name__ and
                        _resolve(name) is cls):
      return name
  return None


# ----------------------------------------------------------------------------------------
# Structure <-> JSON (no pickle).


def _encode_static(value, where: str):
  """JSON for a static field: primitives, lists/tuples of them, or a QuantSpec."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, list | tuple):
    return {"tuple" if isinstance(value, tuple) else "list":
            [_encode_static(v, where) for v in value]}
  if type(value).__name__ == "QuantSpec":
    return {"QuantSpec": {k: _encode_static(v, where) for k, v in value._items}}
  raise ValueError(f"static field {where} holds a {type(value).__name__}, which a bank cannot "
                   f"store as JSON (allowed: None, bool, int, float, str, lists, QuantSpec)")


def _decode_static(value, where: str):
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, dict) and len(value) == 1:
    (kind, body), = value.items()
    if kind in ("list", "tuple") and isinstance(body, list):
      out = [_decode_static(v, where) for v in body]
      return tuple(out) if kind == "tuple" else out
    if kind == "QuantSpec" and isinstance(body, dict):
      from malloc_jax.compressors.quantization import QuantSpec
      return QuantSpec(**{str(k): _decode_static(v, where) for k, v in body.items()})
  raise BankCorruptedError(f"static field {where}: cannot decode {json.dumps(value)[:200]}")


def _encode_tree(node, where: str, counter: list[int]) -> dict:
  """JSON of a pytree's structure; leaves become {"leaf": index in flattening order}."""
  if node is None:
    return {"type": "none"}
  if isinstance(node, dict):
    return {"type": "dict", "children": {str(k): _encode_tree(node[k], f"{where}.{k}", counter)
                                         for k in sorted(node)}}
  if isinstance(node, list | tuple) and type(node) in (list, tuple):
    return {"type": type(node).__name__,
            "children": [_encode_tree(v, f"{where}.{i}", counter) for i, v in enumerate(node)]}
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    name = _type_name(type(node))
    if name is None:
      raise ValueError(f"{where}: memory type {type(node).__qualname__} is not registered: "
                       f"call malloc_jax.bank.register_memory_type({type(node).__name__})")
    children, static = {}, {}
    for field in dataclasses.fields(node):
      value = getattr(node, field.name)
      if field.metadata.get("pytree_node", True):
        children[field.name] = _encode_tree(value, f"{where}.{field.name}", counter)
      else:
        static[field.name] = _encode_static(value, f"{where}.{field.name}")
    return {"type": name, "children": children, "static": static}
  if isinstance(node, np.ndarray | jax.Array | np.generic):
    counter[0] += 1
    return {"leaf": counter[0] - 1}
  raise ValueError(f"{where}: a {type(node).__qualname__} cannot be stored in a bank (expected "
                   f"arrays, dicts, lists, tuples, None, or a registered memory type)")


def _decode_tree(node, where: str):
  """The pytree template of an encoded structure (leaves: their int index)."""
  if not isinstance(node, dict):
    raise BankCorruptedError(f"structure at {where}: expected an object, got {node!r:.100}")
  if "leaf" in node:
    if not isinstance(node["leaf"], int) or isinstance(node["leaf"], bool):
      raise BankCorruptedError(f"structure at {where}: bad leaf {node['leaf']!r:.100}")
    return node["leaf"]
  kind, children = node.get("type"), node.get("children")
  if kind == "none":
    return None
  if kind == "dict" and isinstance(children, dict):
    return {k: _decode_tree(v, f"{where}.{k}") for k, v in children.items()}
  if kind in ("list", "tuple") and isinstance(children, list):
    out = [_decode_tree(v, f"{where}.{i}") for i, v in enumerate(children)]
    return tuple(out) if kind == "tuple" else out
  if not isinstance(kind, str) or kind not in MEMORY_TYPES:
    raise BankCorruptedError(f"structure at {where}: unknown memory type {kind!r:.100} "
                             f"(registered: {sorted(MEMORY_TYPES)})")
  static = node.get("static", {})
  if not isinstance(children, dict) or not isinstance(static, dict):
    raise BankCorruptedError(f"structure at {where}: bad fields of {kind}")
  cls = _resolve(kind)
  names = {f.name for f in dataclasses.fields(cls)}
  if set(children) | set(static) != names or set(children) & set(static):
    raise BankCorruptedError(f"structure at {where}: {kind} has fields {sorted(names)}, the "
                             f"bank lists {sorted(children)} + static {sorted(static)}")
  kw = {k: _decode_tree(v, f"{where}.{k}") for k, v in children.items()}
  kw |= {k: _decode_static(v, f"{where}.{k}") for k, v in static.items()}
  return cls(**kw)


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
  array: str  # key prefix of its zarr3 array: RECORDS for per-user leaves, "s000" if shared
  shape: tuple[int, ...]
  dtype: np.dtype
  axis: int | None  # None: shared by all users

  def to_json(self) -> dict:
    return dict(path=self.path, array=self.array, shape=list(self.shape), dtype=self.dtype.name,
                axis=self.axis)

  @classmethod
  def from_json(cls, d, where: str) -> LeafSpec:
    ok = (isinstance(d, dict) and set(d) == {"path", "array", "shape", "dtype", "axis"} and
          isinstance(d["path"], str) and isinstance(d["array"], str) and
          (d["array"] == RECORDS or re.fullmatch(r"s\d{3,6}", d["array"]) is not None) and
          isinstance(d["shape"], list) and
          all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in d["shape"]) and
          (d["axis"] is None or (isinstance(d["axis"], int) and not isinstance(d["axis"], bool)
                                 and 0 <= d["axis"] <= len(d["shape"]))) and
          (d["axis"] is None) == d["array"].startswith("s") and
          isinstance(d["dtype"], str))
    if not ok:
      raise BankCorruptedError(f"{where}: malformed leaf entry {json.dumps(d)[:300]}")
    if d["dtype"] not in _DTYPES:
      raise BankCorruptedError(f"{where}: leaf '{d['path']}' has dtype {d['dtype']!r:.40}, "
                               f"expected one of {sorted(_DTYPES)}")
    dtype = np.dtype(jnp.dtype(d["dtype"]))
    return cls(path=d["path"], array=d["array"], shape=tuple(d["shape"]), dtype=dtype,
               axis=d["axis"])

  @property
  def nbytes(self) -> int:
    """Bytes of one user's part of this leaf (or of the whole leaf, if shared)."""
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def full_shape(self, users: int) -> tuple[int, ...]:
    if self.axis is None:
      return self.shape
    return self.shape[:self.axis] + (users,) + self.shape[self.axis:]


def record_layout(specs: list[LeafSpec]) -> tuple[list[int], int]:
  """Where each per-user leaf lies in a user's record: (byte offsets, record bytes).

  The record is the per-user leaves' bytes (C order, little-endian, user axis removed) in
  leaf order, each starting at a multiple of 8 bytes (zero padding; the record's length is a
  multiple of 8 too, so every leaf of every row is aligned); derived from the leaf table, so
  the metadata holds no offsets that could disagree with it.
  """
  offsets, end = [], 0
  for s in specs:
    end += -end % _ALIGN
    offsets.append(end)
    end += s.nbytes
  return offsets, max(_ALIGN, end + -end % _ALIGN)


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


# ----------------------------------------------------------------------------------------
# Key-value store helpers.


def _storage_spec(where: Storage) -> tuple[dict | str, Path | None]:
  """(TensorStore kvstore spec, local directory or None) of a bank location."""
  if isinstance(where, dict):
    spec = dict(where)
    base = spec.get("base") if spec.get("driver") == "ocdbt" else spec
    local = None
    if isinstance(base, str) and base.startswith("file://"):
      local = Path(base[len("file://"):])
    elif isinstance(base, dict) and base.get("driver") == "file":
      local = Path(base["path"])
    return spec, local
  where = os.fspath(where)
  if "://" in where:
    return where, (Path(where[len("file://"):]) if where.startswith("file://") else None)
  local = Path(where).absolute()
  return {"driver": "ocdbt", "base": f"file://{local}/", "config": dict(_OCDBT_CONFIG)}, local


def _describe(spec) -> str:
  return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def record_key(user: int) -> bytes:
  """The key of a user's record: ``users/`` and the id in 10 digits (keys sort as ids)."""
  return b"%s/%010d" % (RECORDS.encode(), user)


def encode_record(key: bytes, address: int, size: int) -> bytes:
  """The stored value of a record: its blosc-lz4 frame, then the crc32c of key and frame.

  Args:
    key: the record's key (in the checksum: a record copied under another key fails it).
    address: where the record's ``size`` bytes lie in memory (a row of a NumPy array).
    size: the record's bytes.

  Returns:
    frame + crc32c (4 bytes, little-endian).

  References: Blosc (blosc.org), crc32c (RFC 3720).
  """
  frame = blosc.compress_ptr(address, size, typesize=1, clevel=_RECORD_CODEC["clevel"],
                             shuffle=blosc.NOSHUFFLE, cname=_RECORD_CODEC["cname"])
  return frame + _CRC.pack(google_crc32c.extend(google_crc32c.value(key), frame))


def decode_record(key: bytes, value: bytes, size: int, where: str) -> bytes:
  """The blosc frame of a stored record, after checking its crc32c and its sizes.

  Raises:
    BankCorruptedError: naming the bank and the key, if the checksum fails or the frame does
      not hold ``size`` bytes.
  """
  frame = value[:-_CRC.size]
  if (len(value) < _CRC.size + 16 or
      google_crc32c.extend(google_crc32c.value(key), frame) !=
      _CRC.unpack_from(value, len(value) - _CRC.size)[0]):
    raise BankCorruptedError(f"bank {where}: {key.decode()} fails its crc32c "
                             f"({len(value)} bytes)")
  nbytes, cbytes, _ = blosc.get_cbuffer_sizes(frame[:16])  # the frame's header
  if nbytes != size or cbytes != len(frame):
    raise BankCorruptedError(f"bank {where}: {key.decode()} holds a frame of {nbytes} bytes "
                             f"({cbytes} compressed) in {len(frame)}, expected {size}")
  return frame


# ----------------------------------------------------------------------------------------
# The bank.


class MemoryBank:
  """Compressed memories of ``num_users`` users on TensorStore, by user id (module docstring)."""

  def __init__(self, spec, local: Path | None, kvstore: ts.KvStore, body: dict,
               arrays: dict[str, ts.TensorStore], context: ts.Context):
    """Use :meth:`create` or :meth:`open`."""
    self.spec, self.path, self._kv, self._context = spec, local, kvstore, context
    self._where = str(local) if local is not None else _describe(spec)
    self.num_users = int(body["num_users"])
    self.specs = [LeafSpec.from_json(d, METADATA_KEY) for d in body["leaves"]]
    self._paths = [s.path for s in self.specs]
    self._arrays = arrays
    template = _decode_tree(body["tree"], "<root>")
    self.treedef = jax.tree.structure(template)
    if jax.tree.leaves(template) != list(range(len(self.specs))):
      raise BankCorruptedError(f"{self._where} {METADATA_KEY}: the structure's leaves "
                               f"{jax.tree.leaves(template)} do not match the leaf table")
    self._shared = {}
    for s in self.specs:
      if s.axis is None:
        self._shared[s.path] = self._run(lambda s=s: self._arrays[s.array].read().result(),
                                         s.path)
    self._user_leaves = [s for s in self.specs if s.axis is not None]
    self._offsets, self.record_bytes = record_layout(self._user_leaves)

  # -- creation and opening --------------------------------------------------------------

  @classmethod
  def create(cls, where: Storage, example: Any, *, num_users: int,
             user_axes: UserAxes = None, fsync: bool = True) -> MemoryBank:
    """Creates an empty bank for memories shaped like ``example`` (a batch of any size).

    Args:
      where: a local directory (an OCDBT database over ``file://``; it may exist if empty),
        a TensorStore kvstore URL (``"memory://"``), or a kvstore spec dict (e.g.
        ``{"driver": "ocdbt", "base": "gs://bucket/path/"}``).
      example: a batch of memories; fixes the structure, static fields, per-user shapes and
        dtypes, and the shared leaves (stored once, from this example).
      num_users: user ids are 0 .. num_users - 1.
      user_axes: each leaf's user axis: {leaf path: axis or None (shared)}, a function
        ``(path, leaf) -> axis``, or None for :func:`default_user_axes`.
      fsync: a local directory's files are fsync'ed at each commit (durable against power
        loss, not only crashes).

    Returns:
      The open bank.
    """
    if num_users < 1:
      raise ValueError(f"num_users={num_users} must be >= 1")
    spec, local = _storage_spec(where)
    if local is not None and local.exists() and (not local.is_dir() or any(local.iterdir())):
      raise FileExistsError(f"{local} exists and is not an empty directory")
    leaves = _resolve_axes(example, user_axes)
    tree = _encode_tree(example, "<root>", [0])
    if (jax.tree.structure(_decode_tree(tree, "<root>")) != jax.tree.structure(example)):
      raise ValueError("the example memory's structure does not survive a JSON round trip")
    context = cls._context(fsync)
    kv = cls._open_kv(spec, context)
    if kv.list().result():
      raise FileExistsError(f"the bank location {_describe(spec)} is not empty")
    specs, users, arrays = [], None, {}
    for i, (name, arr, axis) in enumerate(leaves):
      if axis is None:
        specs.append(LeafSpec(name, f"s{i:03d}", arr.shape, arr.dtype, None))
        continue
      if users is None:
        users = (name, arr.shape[axis])
      elif arr.shape[axis] != users[1]:
        raise ValueError(f"leaf '{name}' has {arr.shape[axis]} users on axis {axis} but leaf "
                         f"'{users[0]}' has {users[1]}: pass user_axes explicitly")
      specs.append(LeafSpec(name, RECORDS, arr.shape[:axis] + arr.shape[axis + 1:],
                            arr.dtype, axis))
    if users is None:
      raise ValueError("the example memory has no per-user leaves to store")
    for s in specs:
      if s.dtype.name not in _DTYPES:
        raise ValueError(f"leaf '{s.path}' has dtype {s.dtype}, expected one of "
                         f"{sorted(_DTYPES)}")
    for s, (_, arr, _) in zip(specs, leaves):
      if s.axis is None:
        arrays[s.array] = ts.open(cls._array_spec(spec, s, num_users), create=True,
                                  context=context).result()
        arrays[s.array].write(arr).result()
    digests = {a: _sha256(kv.read(f"{a}/zarr.json").result().value) for a in arrays}
    body = dict(num_users=num_users, tree=tree, leaves=[s.to_json() for s in specs],
                records=_RECORD_CODEC, zarr_json_sha256=digests)
    text = json.dumps(body, sort_keys=True)
    doc = dict(format=FORMAT, format_version=FORMAT_VERSION, sha256=_sha256(text.encode()),
               body=text)
    kv.write(METADATA_KEY, json.dumps(doc, indent=1).encode()).result()  # the bank exists now
    return cls(spec, local, kv, body, arrays, context)

  @classmethod
  def open(cls, where: Storage, *, fsync: bool = True) -> MemoryBank:
    """Opens an existing bank, verifying every piece of its metadata.

    Args:
      where: as for :meth:`create`.
      fsync: as for :meth:`create`.

    Returns:
      The open bank.

    Raises:
      FileNotFoundError: no bank there.
      BankCorruptedError: metadata missing, malformed, or failing its checksum (names the key).
      ValueError: another format or format version.
    """
    spec, local = _storage_spec(where)
    where_s = str(local) if local is not None else _describe(spec)
    context = cls._context(fsync)
    kv = cls._open_kv(spec, context)
    meta = f"{where_s} {METADATA_KEY}"
    try:
      got = kv.read(METADATA_KEY).result()
    except ValueError as e:
      raise BankCorruptedError(f"bank {where_s}: cannot read {METADATA_KEY}: {e}") from e
    if got.state != "value":
      raise FileNotFoundError(f"{meta} does not exist: not a memory bank")
    try:
      doc = json.loads(got.value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BankCorruptedError(f"{meta} is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or set(doc) != {"format", "format_version", "sha256", "body"}:
      raise BankCorruptedError(f"{meta} is malformed: expected the members format, "
                               f"format_version, sha256, body")
    if doc["format"] != FORMAT:
      raise ValueError(f"{meta}: format {doc['format']!r}, expected {FORMAT!r}")
    if doc["format_version"] != FORMAT_VERSION:
      raise ValueError(f"{meta}: format version {doc['format_version']!r}, this code reads "
                       f"version {FORMAT_VERSION}")
    if not isinstance(doc["body"], str) or _sha256(doc["body"].encode()) != doc["sha256"]:
      raise BankCorruptedError(f"{meta} checksum mismatch")
    try:
      body = json.loads(doc["body"])
    except json.JSONDecodeError as e:
      raise BankCorruptedError(f"{meta}: body is not valid JSON ({e})") from e
    if (not isinstance(body, dict) or
        set(body) != {"num_users", "tree", "leaves", "records", "zarr_json_sha256"} or
        not isinstance(body["num_users"], int) or body["num_users"] < 1 or
        not isinstance(body["leaves"], list) or not isinstance(body["zarr_json_sha256"], dict)):
      raise BankCorruptedError(f"{meta}: malformed body")
    specs = [LeafSpec.from_json(d, meta) for d in body["leaves"]]
    if set(body["zarr_json_sha256"]) != {s.array for s in specs if s.axis is None}:
      raise BankCorruptedError(f"{meta}: the checksums do not list the arrays of the shared "
                               f"leaves")
    if not any(s.axis is not None for s in specs):
      raise BankCorruptedError(f"{meta}: no per-user leaves")
    if body["records"] != _RECORD_CODEC:
      raise BankCorruptedError(f"{meta}: records stored as {json.dumps(body['records'])[:300]}, "
                               f"this code reads {json.dumps(_RECORD_CODEC)}")
    arrays = {}
    for s in specs:
      if s.axis is not None:
        continue
      key = f"{s.array}/zarr.json"
      try:
        got = kv.read(key).result()
      except ValueError as e:
        raise BankCorruptedError(f"bank {where_s}: cannot read {key}: {e}") from e
      if got.state != "value":
        raise BankCorruptedError(f"bank {where_s}: {key} is missing")
      if _sha256(got.value) != body["zarr_json_sha256"][s.array]:
        raise BankCorruptedError(f"bank {where_s}: {key} checksum mismatch (leaf '{s.path}')")
      want = cls._array_spec(spec, s, body["num_users"])
      try:
        arrays[s.array] = ts.open(want, open=True, context=context).result()
      except ValueError as e:
        raise BankCorruptedError(f"bank {where_s}: {key} does not describe leaf '{s.path}': "
                                 f"{e}") from e
    return cls(spec, local, kv, body, arrays, context)

  @staticmethod
  def _context(fsync: bool) -> ts.Context:
    return ts.Context({"file_io_sync": bool(fsync)}, parent=_ROOT_CONTEXT)

  @staticmethod
  def _open_kv(spec, context: ts.Context) -> ts.KvStore:
    try:
      return ts.KvStore.open(spec, context=context).result()
    except ValueError as e:
      raise BankCorruptedError(f"bank {_describe(spec)}: cannot open the key-value store: "
                               f"{e}") from e

  @staticmethod
  def _zarr_spec(spec, array: str, shape: list[int], chunk: list[int], dtype: str,
                 codecs: list[dict]) -> dict:
    kvstore = (dict(spec) if isinstance(spec, dict) else ts.KvStore.Spec(spec).to_json())
    kvstore["path"] = kvstore.get("path", "") + f"{array}/"
    return {"driver": "zarr3", "kvstore": kvstore, "cache_pool": _DATA_CACHE,
            "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True,
            "metadata": {"shape": shape, "data_type": dtype,
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": chunk}},
                         "codecs": codecs, "fill_value": 0}}

  @classmethod
  def _array_spec(cls, spec, leaf: LeafSpec, num_users: int) -> dict:
    """The zarr3 spec of a shared leaf's array: its whole shape in one chunk."""
    del num_users
    return cls._zarr_spec(spec, leaf.array, list(leaf.shape), [max(1, n) for n in leaf.shape],
                          leaf.dtype.name, _SHARED_CODECS)

  def close(self) -> None:
    """Releases the arrays (a bank holds no locks; committed writes are already durable)."""
    self._arrays = {}

  def __enter__(self) -> MemoryBank:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- sizes -------------------------------------------------------------------------------

  @property
  def bytes_per_user(self) -> int:
    """In-memory bytes of one user's per-user leaves (shared leaves excluded), as
    ``compressors.bytes_per_user`` counts them (the static capacity, empty slots included)."""
    return sum(s.nbytes for s in self._user_leaves)

  def bytes_on_disk(self) -> int:
    """Bytes of every file of a bank in a local directory."""
    if self.path is None:
      raise ValueError(f"bank {self._where} is not in a local directory")
    total = 0
    for root, _, files in os.walk(self.path):
      total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total

  def _written(self) -> np.ndarray:
    """int64 ids of the users written so far (the records' keys)."""
    users = ts.KvStore.KeyRange(f"{RECORDS}/".encode(), f"{RECORDS}0".encode())
    keys = self._run(lambda: self._kv.list(users).result(), RECORDS)
    return np.asarray(sorted(int(k[len(RECORDS) + 1:]) for k in keys), np.int64)

  def __len__(self) -> int:
    """Number of users written so far (lists the keys of one leaf: O(users))."""
    return len(self._written())

  def contains(self, user_ids) -> np.ndarray:
    """bool [n]: whether each id has been written (lists the keys of one leaf: O(users))."""
    return np.isin(self._ids(user_ids), self._written())

  def __repr__(self) -> str:
    return f"MemoryBank({self._where}, users={self.num_users}, leaves={len(self.specs)})"

  # -- reading -----------------------------------------------------------------------------

  @staticmethod
  def _ids(user_ids) -> np.ndarray:
    ids = np.asarray(user_ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"user ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64)

  def _run(self, fn, path: str):
    """fn(), with TensorStore's errors turned into KeyError / BankCorruptedError."""
    try:
      return fn()
    except ValueError as e:
      message = str(e)
      raise BankCorruptedError(f"bank {self._where}: {path}: {message}") from e

  def _read_records(self, ids: np.ndarray) -> np.ndarray:
    """uint8 [n, record_bytes]: the records of ``ids`` (in range), each checked and decoded.

    One read of the store per id, all issued before any is awaited; then, per user, its
    crc32c is checked and its blosc frame decoded into its row (no intermediate copy).
    """
    keys = [record_key(u) for u in ids.tolist()]
    futures = self._run(lambda: [self._kv.read(k) for k in keys], RECORDS)
    out = np.empty((len(ids), self.record_bytes), np.uint8)  # [n, bytes]
    address, size = out.ctypes.data, self.record_bytes
    for i, (key, future) in enumerate(zip(keys, futures)):
      got = self._run(future.result, key.decode())
      if got.state != "value":
        raise KeyError(f"user {ids[i]} was never written to the bank {self._where}")
      frame = decode_record(key, got.value, size, self._where)
      blosc.decompress_ptr(frame, address + i * size)
    return out

  def read(self, user_ids) -> Any:
    """Reads the memories of ``user_ids`` (any order, repeats allowed).

    Args:
      user_ids: int ids [n].

    Each user is one key of the store, read as of one commit, so each user is entirely old
    or new while other processes write (users of one call may come from different commits).

    Returns:
      A memory pytree of the bank's structure holding n users (NumPy leaves, user axes as
      written; shared leaves as stored).

    Raises:
      KeyError: an id was never written (or is out of range), naming it.
      BankCorruptedError: a chunk fails its crc32c or cannot be decoded (naming its key).
    """
    ids = self._ids(user_ids)
    bad = np.flatnonzero((ids < 0) | (ids >= self.num_users))
    if len(bad):
      raise KeyError(f"user {ids[bad[0]]} is not in the bank {self._where} (ids are "
                     f"0..{self.num_users - 1})")
    n = len(ids)
    records = self._read_records(ids)  # [n, bytes]
    leaves, offsets = [], iter(self._offsets)
    for s in self.specs:
      if s.axis is None:
        leaves.append(self._shared[s.path].copy())
        continue
      start = next(offsets)
      x = records[:, start:start + s.nbytes].view(s.dtype).reshape((n,) + s.shape)  # [n, *shape]
      if not _LITTLE_ENDIAN:
        x = x.byteswap()
      leaves.append(np.ascontiguousarray(np.moveaxis(x, 0, s.axis)))  # a copy: records freed
    return jax.tree.unflatten(self.treedef, leaves)

  # -- writing -----------------------------------------------------------------------------

  def _check(self, memory) -> tuple[list[np.ndarray], int]:
    """Checks ``memory`` against the bank; returns per-user leaves [B, *shape] and B."""
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
    batch, out = None, []
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
      else:
        out.append(np.moveaxis(arr, spec.axis, 0))  # [B, *shape]
    return out, batch

  def write(self, user_ids, memory) -> None:
    """Writes (or overwrites) the memories of ``user_ids`` in one atomic transaction.

    Args:
      user_ids: int ids [B], distinct, in 0 .. num_users - 1 (B = 0: nothing happens).
      memory: a batch of B users, of the bank's structure, static fields, shapes and dtypes
        (JAX or NumPy leaves); shared leaves must equal the bank's.

    Raises:
      ValueError: the memory does not match the bank (naming the leaf), or bad ids.
    """
    ids = self._ids(user_ids)
    rows, batch = self._check(memory)
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
    records = np.zeros((len(ids), self.record_bytes), np.uint8)  # [B, bytes]
    for x, s, start in zip(rows, self._user_leaves, self._offsets):
      dest = records[:, start:start + s.nbytes].view(s.dtype).reshape((len(ids),) + s.shape)
      np.copyto(dest, x if _LITTLE_ENDIAN else x.byteswap())  # one copy per leaf, [B, *shape]
    size, address = self.record_bytes, records.ctypes.data
    txn = ts.Transaction(atomic=True)
    try:
      kv = self._kv.with_transaction(txn)

      def stage():  # one write per user; they complete with the commit
        return [kv.write(key, encode_record(key, address + i * size, size))
                for i, key in enumerate(map(record_key, ids.tolist()))]

      futures = self._run(stage, RECORDS)
      self._run(lambda: txn.commit_async().result(), "<commit>")
      for future in futures:
        self._run(future.result, "<commit>")
    except BaseException:
      if not txn.commit_started:
        txn.abort()
      raise
