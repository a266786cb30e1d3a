"""Data: raw-file parsers (the only code that reads raw data files) and splits."""

from malloc_jax.data.parsers import (
  FORMATS,
  Interactions,
  Split,
  leave_one_out,
  load,
  parse_movielens_1m,
  parse_movielens_100k,
  parse_recbole_inter,
  parse_sasrec_text,
  popularity,
)

__all__ = [
  "FORMATS",
  "Interactions",
  "Split",
  "leave_one_out",
  "load",
  "parse_movielens_100k",
  "parse_movielens_1m",
  "parse_recbole_inter",
  "parse_sasrec_text",
  "popularity",
]
