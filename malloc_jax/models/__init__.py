"""Backbones with the cache serving API: ``prefill``, ``extend``, ``score``."""

from malloc_jax.models.base import Events, SequenceRecommender
from malloc_jax.models.hstu import HSTU
from malloc_jax.models.sasrec import SASRec
from malloc_jax.models.variants import VARIANTS

BACKBONES = {"hstu": HSTU, "sasrec": SASRec, **VARIANTS}


def make_model(name: str, num_items: int, *, seed: int = 0, **kwargs) -> SequenceRecommender:
  """Builds a backbone by name ("hstu", "sasrec" or a variant such as "hstu_gqa")."""
  if name not in BACKBONES:
    raise ValueError(f"model.name={name!r} is unknown; expected one of {sorted(BACKBONES)}")
  from flax import nnx
  return BACKBONES[name](num_items, rngs=nnx.Rngs(seed), **kwargs)


def prefill(model, events, window: int = 8):
  """Pure-function form of ``model.prefill`` (jit it with the model as an argument)."""
  return model.prefill(events, window)


def extend(model, cache, events, window: int = 8):
  """Pure-function form of ``model.extend``."""
  return model.extend(cache, events, window)


def score(model, cache, queries, candidates=None):
  """Pure-function form of ``model.score``."""
  return model.score(cache, queries, candidates)


__all__ = ["BACKBONES", "Events", "HSTU", "SASRec", "SequenceRecommender", "VARIANTS", "extend",
           "make_model", "prefill", "score"]
