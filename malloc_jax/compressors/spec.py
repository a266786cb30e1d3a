"""What the runner needs to know about a post-hoc method, declared once next to its factory.

A compressor module ends with ``SPECS = (MethodSpec(...), ...)``; the registry
(:mod:`malloc_jax.compressors.registry`) finds every module of this package that has one, so a
new method is one file: its factory and its spec. Name the module after what it does, not
exactly after its factory (``keynorm.py`` defines ``knorm``): importing a submodule binds its
name on the package, which would hide the factory ``compressors.<name>``. Budget search, the sweep's method axis,
config validation and the report read the specs; nothing else lists methods by hand::

  SPECS = (MethodSpec(
      name="knorm", factory=knorm, granularity="token", tuned="budget",
      candidates=lambda shape, fixed: [{**fixed, "budget": b} for b in range(1, shape.capacity + 1)],
      limits={"budget": "capacity", "recent": "capacity"},
      reference="Devoto et al., 2024"),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from malloc_jax.cache import Cache

GRANULARITIES = ("none", "token", "precision", "low rank", "head", "layer", "sequence",
                 "architecture")
LIMITS = ("capacity", "head_dim")


class CacheShape(NamedTuple):
  """The static shape of a model's native cache: what a method's candidates depend on."""

  num_layers: int
  heads: int
  capacity: int
  dk: int
  dv: int

  @classmethod
  def of(cls, cache: Cache) -> CacheShape:
    """The shape of a Cache or an abstract one (``k`` [L, B, H, T, Dk], ``v`` [..., Dv])."""
    L, _, H, T, dk = cache.k.shape
    return cls(L, H, T, dk, cache.v.shape[-1])

  @property
  def head_dim(self) -> int:
    return min(self.dk, self.dv)


# calibrate(params, shape, caches) -> factory keyword arguments. ``caches`` is a callable
# returning an iterable of calibration Caches (prefilled training histories), or None: then
# the hook returns abstract arguments (jax.ShapeDtypeStruct leaves) of the right shapes, for
# byte counting and validation without data.
Calibrate = Callable[[dict, CacheShape, "Callable[[], Iterable[Cache]] | None"], dict]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """Everything the runner needs about one post-hoc method.

  Attributes:
    name: the registry name (``make_compressor(name, ...)``, config ``name:`` fields).
    factory: the compressor factory (keyword hyperparameters -> Compressor).
    granularity: what it compresses, one of :data:`GRANULARITIES` (DESIGN.md's catalogue).
    reference: the paper it implements (shown by the report and the docs).
    tuned: the parameter a byte budget moves (None: a fixed memory, e.g. native).
    candidates: ``(shape, fixed) -> [params, ...]`` in increasing order of stored bytes, for
      :func:`~malloc_jax.compressors.budget.budget_bytes`; ``fixed`` holds the parameters the
      caller pins. None when ``tuned`` is None.
    needs_signals: compress reads the attention signals of prefill / extend (so it must come
      first in a chain).
    calibrate: for methods fitted on data (low rank's bases): turns the config's parameters
      into the factory's (see :data:`Calibrate`). None: config parameters are the factory's.
    calibration_signals: the calibration hook reads attention signals: its ``caches()``
      yields (Cache, Signals) pairs (``evaluate.calibration_caches(..., signals=True)``).
    limits: ``{parameter: "capacity" | "head_dim"}``, upper bounds checked against the
      model before training (e.g. a budget larger than the history window is refused).
    auto: ``{parameter: shape -> value}`` for parameters a config may give as ``"auto"``.
    example: small valid config parameters for a cache of 8 or more slots and head dimension
      4 or more: what the registry tests build every method with.
  """

  name: str
  factory: Callable[..., Any]
  granularity: str
  reference: str
  tuned: str | None = None
  candidates: Callable[[CacheShape, dict], list[dict]] | None = None
  needs_signals: bool = False
  calibrate: Calibrate | None = None
  calibration_signals: bool = False
  limits: Mapping[str, str] = dataclasses.field(default_factory=dict)
  auto: Mapping[str, Callable[[CacheShape], Any]] = dataclasses.field(default_factory=dict)
  example: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"MethodSpec {self.name}: granularity={self.granularity!r}; expected "
                       f"one of {GRANULARITIES}")
    if (self.tuned is None) != (self.candidates is None):
      raise ValueError(f"MethodSpec {self.name}: give both tuned and candidates, or neither")
    bad = {k: v for k, v in self.limits.items() if v not in LIMITS}
    if bad:
      raise ValueError(f"MethodSpec {self.name}: limits {bad}; expected values in {LIMITS}")


def budget_range(shape: CacheShape, fixed: dict, lo: int = 1, key: str = "budget"):
  """``[{**fixed, key: b} for b in lo..capacity]``: the candidates of a kept-events budget."""
  return [{**fixed, key: b} for b in range(lo, shape.capacity + 1)]
