"""The README's Python example runs as written, and its chain really quantizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # compiles a 256-event HSTU; run by .ci/run's -m slow pass
def test_readme_serving_example_runs_and_quantizes():
  block = re.search(r"```python\n(import jax\n.*?)```", README.read_text(), re.S).group(1)
  scope: dict = {}
  exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own documentation
  from malloc_jax import compressors

  memory, native = scope["memory"], scope["native"]
  assert type(memory).__name__ == "KiviMemory"
  # SnapKV keeps 64 of 256 events (4x) and 2-bit codes shrink them again: the printed numbers.
  assert compressors.bytes_per_user(native) == 263172.0
  assert compressors.bytes_per_user(memory) == 30724.0
  assert scope["logits"].shape == (4, 1001)
