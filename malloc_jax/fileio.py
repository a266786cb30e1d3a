"""Durable small-file writes: the one place that fsyncs and renames (no JAX, no Orbax).

Used by the run results (``experiment``, ``checkpoint``), the sweep's results file and the
memory bank, so that every "written atomically" in this package means the same thing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
  """Makes a directory's entries (a new or renamed file) durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
  """Writes ``data`` to ``path`` (not atomically: for files inside a directory renamed later),
  fsync'ed when ``sync``."""
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    if sync:
      os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Replaces ``path`` with ``data`` atomically: a reader sees the old or the new file whole.

  Written to ``<path>.tmp``, fsync'ed, renamed over ``path``, then the directory fsync'ed.
  """
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  write_bytes(tmp, data, sync=True)
  os.replace(tmp, path)
  fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """:func:`write_atomic` of ``obj`` as indented, key-sorted JSON."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def append_durably(path: str | os.PathLike, data: bytes) -> None:
  """Appends ``data`` with one ``write`` on an O_APPEND descriptor, then fsync.

  A reader sees the file without the record or with all of it unless the process dies inside
  the write; a new file's directory entry is made durable too.
  """
  path = Path(path)
  new = not path.exists()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(data)
    while view:
      n = os.write(fd, view)
      view = view[n:]
    os.fsync(fd)
  finally:
    os.close(fd)
  if new:
    fsync_dir(path.parent)
