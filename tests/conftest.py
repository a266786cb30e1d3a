"""Shared pytest fixtures."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The development copies of real data sets (``../shared/data``); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not available: {SHARED_DATA} does not exist (development-only "
                "copies of ML-100K and Amazon Beauty, see DESIGN.md 'Data')")
  return SHARED_DATA
