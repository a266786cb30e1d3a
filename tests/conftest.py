"""Shared pytest fixtures, a persistent XLA compilation cache, and compiled code freed per module."""

import os
import tempfile
from pathlib import Path

import pytest

# Many tests (and the subprocesses that test crashes and resumption) compile the same
# computations; JAX's persistent cache serves a repeated compile from disk. Set through the
# environment before any test module imports jax, so subprocesses inherit it too. Set
# JAX_COMPILATION_CACHE_DIR yourself to choose the directory (or "" to disable).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "malloc_jax_tests_xla_cache_locked"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The default run uses two pytest-xdist workers (pyproject addopts), and other processes (the
# subprocess tests, other checkouts) share the directory. Without a size limit JAX writes an
# entry with a plain write_bytes, which a concurrent reader can see half-written; with a
# limit set, every read and write of the cache takes the directory's file lock (the
# ``filelock`` package, a test dependency), so no process reads a partial executable. 4 GiB
# is far above what the suite writes (~100 MB), so nothing is evicted in practice. (The
# directory is not the unlocked one earlier checkouts wrote: JAX's eviction scan needs the
# access-time file it writes beside each entry when the limit is set.)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The development copies of real data sets (``../shared/data``); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not available: {SHARED_DATA} does not exist (development-only "
                "copies of ML-100K and Amazon Beauty, see DESIGN.md 'Data')")
  return SHARED_DATA


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
  """Drops JAX's in-memory compiled executables after each test module.

  Every XLA:CPU executable keeps its own memory mappings; the whole suite compiles thousands,
  and without this the pytest process crashed late in the run (segfaults and an abort inside
  XLA's compile and cache (de)serialization, at varying tests that pass alone), consistent
  with exhausting the kernel's limit of 65,530 mappings per process (vm.max_map_count). The
  persistent cache above makes the recompiles of a later module cheap.
  """
  yield
  import jax  # noqa: PLC0415 - after the environment above is set

  jax.clear_caches()
