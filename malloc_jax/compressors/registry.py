"""Compressors by name, for configs: ``make_compressor("snapkv", budget=64, window=8)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from malloc_jax.compressors.base import Compressor, identity
from malloc_jax.compressors.eviction import h2o, random, snapkv, streaming
from malloc_jax.compressors.lowrank import LowRankBases, lowrank
from malloc_jax.compressors.merging import merge_evicted
from malloc_jax.compressors.quantization import intactkv, kivi, uniform


def _native() -> Compressor:
  """The native cache (no compression)."""
  return identity()


def _lowrank(bases: LowRankBases | None = None, dtype=None) -> Compressor:
  if bases is None:
    raise ValueError("lowrank: needs bases= (fit them with fit_lowrank(caches, rank) on "
                     "training histories)")
  return lowrank(bases, dtype=dtype)


FACTORIES: dict[str, Callable[..., Compressor]] = {
    "native": _native,
    "lowrank": _lowrank,
    "h2o": h2o,
    "snapkv": snapkv,
    "streaming": streaming,
    "random": random,
    "merge_evicted": merge_evicted,
    "kivi": kivi,
    "intactkv": intactkv,
    "uniform": uniform,
}


def method_parameters(name: str) -> tuple[str, ...]:
  """Names of the parameters ``make_compressor(name, ...)`` accepts."""
  _check_name(name)
  return tuple(inspect.signature(FACTORIES[name]).parameters)


def _check_name(name: str) -> None:
  if name not in FACTORIES:
    raise ValueError(f"compressor method {name!r} is unknown; valid methods: "
                     f"{', '.join(sorted(FACTORIES))}")


def make_compressor(name: str, **params) -> Compressor:
  """Builds the compressor ``name`` with keyword hyperparameters.

  Args:
    name: one of "native", "lowrank", "h2o", "snapkv", "streaming", "random",
      "merge_evicted", "kivi", "intactkv", "uniform".
    **params: the factory's keyword arguments ("lowrank" takes ``bases=``).

  Returns:
    The Compressor.

  Raises:
    ValueError: unknown method, unknown or missing parameter, or an invalid value (the
      message names the parameter).
  """
  _check_name(name)
  sig = inspect.signature(FACTORIES[name])
  unknown = sorted(set(params) - set(sig.parameters))
  if unknown:
    raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; expected "
                     f"{', '.join(sig.parameters) or 'none'}")
  missing = [p.name for p in sig.parameters.values()
             if p.default is inspect.Parameter.empty and p.name not in params]
  if missing:
    raise ValueError(f"{name}: missing parameter(s) {', '.join(missing)}")
  return FACTORIES[name](**params)
