"""The README's method table lists exactly the registered methods."""

from __future__ import annotations

import pathlib
import re

from malloc_jax import compressors as C
from malloc_jax.models import VARIANT_SPECS

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


def test_readme_variant_table_lists_every_trained_variant():
  """Each row names one or more variants (`a`, `b`); every registered variant appears once,
  and the row's granularity starts with its spec's."""
  text = README.read_text()
  section = text.split("### Trained variants", 1)[1].split("\n### ", 1)[0]
  seen = []
  for row in (r for r in section.splitlines() if r.startswith("| `")):
    names = re.findall(r"`([^`]+)`", row.split("|")[1])
    for name in names:
      assert row.split("|")[2].strip().startswith(VARIANT_SPECS[name].granularity), name
    seen.extend(names)
  assert len(seen) == len(set(seen)), "a variant is listed twice"
  assert set(seen) == set(VARIANT_SPECS)
