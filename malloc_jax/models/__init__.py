"""Backbones with the cache serving API: ``prefill``, ``extend``, ``score``."""

from malloc_jax.models import hstu as _hstu
from malloc_jax.models import sasrec as _sasrec
from malloc_jax.models.base import Events, SequenceRecommender
from malloc_jax.models.hstu import HSTU
from malloc_jax.models.sasrec import SASRec
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants import VARIANT_SPECS, VARIANTS

# Every backbone's spec (native HSTU, SASRec and the trained variants), and its class.
BACKBONE_SPECS = {s.name: s for s in (*_hstu.SPECS, *_sasrec.SPECS, *VARIANT_SPECS.values())}
BACKBONES = {name: spec.model for name, spec in BACKBONE_SPECS.items()}


def backbone_spec(model_or_name) -> VariantSpec | None:
  """The spec of a backbone, by config name or by the exact class of a model (None: none)."""
  if isinstance(model_or_name, str):
    return BACKBONE_SPECS.get(model_or_name)
  cls = type(model_or_name)
  return next((s for s in BACKBONE_SPECS.values() if s.model is cls), None)


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


__all__ = ["BACKBONES", "BACKBONE_SPECS", "Events", "HSTU", "SASRec", "SequenceRecommender", "VARIANTS", "VARIANT_SPECS", "VariantSpec", "backbone_spec", "extend",
           "make_model", "prefill", "score"]
