"""Shared pytest fixtures (the persistent XLA compilation cache is off unless you set it)."""

import os
from pathlib import Path

import pytest

# JAX's persistent compilation cache is OFF for the test run unless you set
# JAX_COMPILATION_CACHE_DIR yourself (set through the environment before any test module
# imports jax, so subprocesses inherit the choice). With it on, the whole-suite process
# crashed twice in XLA's CPU executable (de)serialization (a segfault in
# compilation_cache.put_executable_and_time on a cold cache, an abort in
# get_executable_and_time on a warm one), both late in the run at the same test, which passes
# alone: see BENCHMARKS.md "Test-suite time".
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The development copies of real data sets (``../shared/data``); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not available: {SHARED_DATA} does not exist (development-only "
                "copies of ML-100K and Amazon Beauty, see DESIGN.md 'Data')")
  return SHARED_DATA
