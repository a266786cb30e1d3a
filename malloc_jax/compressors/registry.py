"""Compressors by name, for configs: ``make_compressor("snapkv", budget=64, window=8)``.

Methods are not listed here: every module of ``malloc_jax.compressors`` that ends with
``SPECS = (MethodSpec(...), ...)`` (see :mod:`malloc_jax.compressors.spec`) is registered the
first time a name is looked up. Adding a method is adding one module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable

from malloc_jax.cache import Cache
from malloc_jax.compressors.base import Compressor
from malloc_jax.compressors.spec import CacheShape, MethodSpec


@functools.cache
def specs() -> dict[str, MethodSpec]:
  """Every registered method: ``{name: MethodSpec}``, in module then declaration order."""
  import malloc_jax.compressors as package

  out: dict[str, MethodSpec] = {}
  for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
    if info.name == "registry":
      continue
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    for spec in getattr(module, "SPECS", ()):
      if not isinstance(spec, MethodSpec):
        raise TypeError(f"{module.__name__}.SPECS holds {spec!r}; expected MethodSpec")
      if spec.name in out:
        raise ValueError(f"compressor method {spec.name!r} is registered twice "
                         f"({module.__name__})")
      out[spec.name] = spec
  return out


def get_spec(name: str) -> MethodSpec:
  """The spec of method ``name``; ValueError listing the valid names if it is unknown."""
  all_specs = specs()
  if name not in all_specs:
    raise ValueError(f"compressor method {name!r} is unknown; valid methods: "
                     f"{', '.join(sorted(all_specs))}")
  return all_specs[name]


def __getattr__(name: str):
  if name == "FACTORIES":  # {name: factory}, derived from the specs
    return {n: s.factory for n, s in specs().items()}
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_parameters(name: str) -> tuple[str, ...]:
  """Names of the parameters ``make_compressor(name, ...)`` accepts."""
  return tuple(inspect.signature(get_spec(name).factory).parameters)


def make_compressor(name: str, **params) -> Compressor:
  """Builds the compressor ``name`` with keyword hyperparameters.

  Args:
    name: a registered method (``sorted(specs())``: "native", "h2o", "snapkv", "kivi", ...).
    **params: the factory's keyword arguments ("lowrank" takes ``bases=``; from a config
      use :func:`build_compressor`, which fits them).

  Returns:
    The Compressor.

  Raises:
    ValueError: unknown method, unknown or missing parameter, or an invalid value (the
      message names the parameter).
  """
  spec = get_spec(name)
  sig = inspect.signature(spec.factory)
  unknown = sorted(set(params) - set(sig.parameters))
  if unknown:
    raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; expected "
                     f"{', '.join(sig.parameters) or 'none'}")
  missing = [p.name for p in sig.parameters.values()
             if p.default is inspect.Parameter.empty and p.name not in params]
  if missing:
    hint = (" (a calibrated method: build it from config parameters with build_compressor)"
            if spec.calibrate else "")
    raise ValueError(f"{name}: missing parameter(s) {', '.join(missing)}{hint}")
  return spec.factory(**params)


def resolve_auto(name: str, params: dict, shape: CacheShape) -> dict:
  """``params`` with every ``"auto"`` value replaced by the spec's choice for ``shape``."""
  spec = get_spec(name)
  out = {}
  for key, value in params.items():
    if isinstance(value, str) and value == "auto":
      if key not in spec.auto:
        raise ValueError(f"{name}: {key}='auto' is not supported; 'auto' is accepted for "
                         f"{sorted(spec.auto) or 'no parameter'}")
      value = spec.auto[key](shape)
    out[key] = value
  return out


def factory_params(name: str, params: dict, shape: CacheShape,
                   caches: Callable[[], Iterable[Cache]] | None = None) -> dict:
  """The factory's keyword arguments for config ``params`` of method ``name``.

  For a calibrated method (``spec.calibrate``, e.g. low rank) the spec's hook fits what it
  needs on ``caches()`` (calibration caches), or returns abstract arguments when ``caches``
  is None; for the others, ``params`` with ``"auto"`` values resolved.
  """
  spec = get_spec(name)
  params = resolve_auto(name, params, shape)
  if spec.calibrate is None or _complete(spec, params):
    return params
  return spec.calibrate(params, shape, caches)


def _complete(spec: MethodSpec, params: dict) -> bool:
  """Whether ``params`` are already the factory's arguments (e.g. lowrank's ``bases=``)."""
  sig = inspect.signature(spec.factory).parameters
  required = {p.name for p in sig.values() if p.default is inspect.Parameter.empty}
  return set(params) <= set(sig) and required <= set(params)


def build_compressor(name: str, params: dict, shape: CacheShape,
                     caches: Callable[[], Iterable[Cache]] | None = None) -> Compressor:
  """``make_compressor`` from config parameters (calibrated on ``caches()`` when needed)."""
  return make_compressor(name, **factory_params(name, params, shape, caches))


def check_params(name: str, params: dict, shape: CacheShape) -> None:
  """Validates config ``params`` of ``name`` against a model's cache shape, without data.

  Raises:
    ValueError: naming the parameter (unknown, missing, out of range, larger than the
      history window or the head dimension).
  """
  spec = get_spec(name)
  bound = {"capacity": f"at most data.max_len={shape.capacity} (the cache capacity)",
           "head_dim": f"at most the head dimension {shape.head_dim}"}
  for key, kind in spec.limits.items():
    value = params.get(key)
    limit = shape.capacity if kind == "capacity" else shape.head_dim
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
      raise ValueError(f"{name}: {key}={value} must be {bound[kind]}")
  build_compressor(name, params, shape, caches=None)
