"""Data: raw-file parsers (the only code that reads raw data files), splits, padded datasets.

Importing this package loads NumPy and these modules only (no JAX, model or storage code);
the synthetic generator and the TFDS / grain loader are imported from their modules.
"""

from malloc_jax.data.dataset import EvalSet, SequenceDataset, TrainSet, build_dataset
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
  "EvalSet",
  "SequenceDataset",
  "TrainSet",
  "build_dataset",
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
