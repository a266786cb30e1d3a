"""Data: raw-file parsers (the only code that reads raw data files) and splits."""

from malloc_jax.data.parsers import (
  FORMATS,
  CTRData,
  CTRSamples,
  Interactions,
  Split,
  leave_one_out,
  load,
  parse_fuxictr_csv,
  parse_movielens_1m,
  parse_movielens_100k,
  parse_recbole_inter,
  parse_sasrec_text,
  popularity,
)

__all__ = [
  "CTRData",
  "CTRSamples",
  "FORMATS",
  "Interactions",
  "Split",
  "leave_one_out",
  "load",
  "parse_fuxictr_csv",
  "parse_movielens_100k",
  "parse_movielens_1m",
  "parse_recbole_inter",
  "parse_sasrec_text",
  "popularity",
]
