"""The README's method table lists exactly the registered methods."""

from __future__ import annotations

import pathlib
import re

from malloc_jax import compressors as C

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_methods() -> list[str]:
  text = README.read_text()
  section = text.split("### Post-hoc methods", 1)[1].split("\n### ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]


def test_readme_table_counts_the_registry():
  names = readme_methods()
  assert len(names) == len(set(names)), "a method is listed twice"
  assert len(names) == len(C.specs())
  assert set(names) == set(C.specs())
  for name in names:  # the table's granularity starts with the spec's
    row = next(r for r in README.read_text().splitlines() if r.startswith(f"| `{name}` |"))
    assert row.split("|")[2].strip().startswith(C.get_spec(name).granularity), name
