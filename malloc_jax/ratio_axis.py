"""The ratio axis 2x..128x: a method's (or an eviction-then-quantization chain's) parameters
that reach a target memory reduction within a tolerance, or "out of reach".

Bytes come from :func:`malloc_jax.compressors.budget.memory_bytes` (the memory built
abstractly with ``jax.eval_shape``, nothing computed), so whatever that function counts, the
ratios here follow. A ratio is *reached* when the achieved reduction ``native / bytes`` lies
in ``[ratio, ratio * (1 + tol)]``: never more bytes than the budget, and not so few that the
cell really sits at another ratio (a 4-bit code is ~7x, not "2x").

  spec = cache_spec(num_layers=2, heads=1, capacity=200, dk=50)
  reach_ratio("snapkv", spec, 32)                 # {"params": {...}, "ratio": 32.4, ...}
  reach_ratio("kivi", spec, 32)                   # None: out of reach alone
  chain_for_ratio("snapkv", "kivi", spec, 32, {"bits": 2, "group": 25, "residual": 25})

References: the MALLOC benchmark (Yu et al., arXiv 2601.20234, 2026) reports methods at
matched memory; chains of eviction and quantization as in its "any post-hoc methods chain".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.cache import Signals
from malloc_jax.compressors.base import chain, stored_bytes
from malloc_jax.compressors.budget import _abstract, budget_bytes, full_user, memory_bytes
from malloc_jax.compressors.registry import make_compressor

RATIOS = (2, 4, 8, 16, 32, 64, 128)
TOL = 0.05


def _within(achieved: float, ratio: float, tol: float) -> bool:
  return ratio * (1 - 1e-9) <= achieved <= ratio * (1 + tol)


def reach_ratio(method: str, spec, ratio: float, tol: float = TOL, **fixed) -> dict | None:
  """The largest setting of ``method`` whose memory is at most native / ``ratio``.

  Args:
    method: a registry name. spec: an (abstract) Cache (``budget.cache_spec``).
    ratio: target reduction. tol: allowed overshoot of the achieved ratio.
    **fixed: parameters held fixed (see ``budget.budget_bytes``).

  Returns:
    {"params", "bytes", "ratio" (achieved)}, or None when no setting fits or the largest
    that fits lands beyond ``ratio * (1 + tol)`` (out of reach).
  """
  native = memory_bytes("native", spec)
  try:
    params = budget_bytes(method, spec, native / ratio, **fixed)
  except ValueError as e:
    if "needs at least" not in str(e):
      raise
    return None
  b = memory_bytes(method, spec, **params)
  return ({"params": params, "bytes": b, "ratio": native / b}
          if _within(native / b, ratio, tol) else None)


def _abstract_signals(spec, window: int = 0) -> Signals:
  L, B, H, T, _ = spec.k.shape
  W = max(T, int(window), 64)  # abstract: any W >= the window will do
  return Signals(acc_attn=jax.ShapeDtypeStruct((L, B, H, T), jnp.float32),
                 window_attn=jax.ShapeDtypeStruct((L, B, H, W, T), jnp.float32),
                 window_valid=jax.ShapeDtypeStruct((B, W), jnp.bool_))


def chain_bytes(evict: str, eparams: dict, quant: str, qparams: dict, spec) -> float:
  """Stored bytes per full user (n = capacity) of ``chain(evict, quant)``: the quantizer's
  memory of the evicted cache (a chain stores its last step's memory) plus every step's
  per-user state (H2O's accumulated attention), exactly as ``memory_bytes`` counts a method
  (``compressors.stored_bytes`` of the abstract memory and state)."""
  spec = _abstract(spec)
  comp = chain(make_compressor(evict, **eparams), make_compressor(quant, **qparams))
  memory, state = jax.eval_shape(lambda c, s: comp.compress(c, comp.init(c), s), spec,
                                 _abstract_signals(spec, eparams.get("window", 0)))
  return float(np.mean(stored_bytes(full_user(memory, spec.k.shape[3]), state)))


@functools.lru_cache(maxsize=64)
def _chain_sizes(evict: str, quant: str, qkey: tuple, ekey: tuple, shape: tuple) -> tuple:
  """(eviction params, chain bytes) of every eviction candidate, in candidate order."""
  from malloc_jax.compressors.budget import _candidates, cache_spec
  L, B, H, T, dk, dv = shape
  spec = cache_spec(L, H, T, dk, dv, batch=B)
  qparams, efixed = dict(qkey), dict(ekey)
  out = []
  for ep in _candidates(evict, spec, efixed):
    try:
      out.append((ep, chain_bytes(evict, ep, quant, qparams, spec), kept_slots(evict, ep, spec)))
    except ValueError:  # e.g. the quantizer cannot encode so few events
      continue
  return tuple(out)


def kept_slots(evict: str, eparams: dict, spec) -> int:
  """Slots per layer and head that eviction ``evict(**eparams)`` keeps of the cache ``spec``
  (the static slot count of its materialized memory)."""
  spec = _abstract(spec)
  comp = make_compressor(evict, **eparams)
  kept = jax.eval_shape(lambda c, s: comp.compress(c, comp.init(c), s)[0].materialize(), spec,
                        _abstract_signals(spec, eparams.get("window", 0)))
  return int(kept.k.shape[3])


def quantizes_nothing(quant: str, qparams: dict, kept: int) -> bool:
  """Whether ``quant`` leaves every one of ``kept`` events exact: KIVI keeps the newest
  ``residual`` values exact and quantizes a key block only when it fills, so with fewer
  kept events than its residual the chain would be the eviction alone."""
  return quant == "kivi" and kept < int(qparams.get("residual", 128))


def chain_for_ratio(evict: str, quant: str, spec, ratio: float, qparams: dict,
                    tol: float = TOL, **efixed) -> dict | None:
  """Eviction parameters so that ``chain(evict, quant(**qparams))`` reaches ``ratio``.

  The eviction budget (kept events) is the tuned parameter. A chain's bytes are not
  monotone in it (KIVI's exact residual is the incomplete last block of keys, so one more
  kept event can remove a whole block's residual), so every budget is measured once (cached
  per chain and cache shape) and the largest budget whose reduction lies in
  ``[ratio, ratio * (1 + tol)]`` is chosen.

  Args:
    evict: an eviction method (h2o, snapkv, streaming, random, merge_evicted).
    quant: a quantizer (kivi, uniform, intactkv) with fixed ``qparams``.
    spec: abstract Cache. ratio, tol: as :func:`reach_ratio`. **efixed: eviction parameters
      held fixed (e.g. ``window=8``).

  Returns:
    {"steps": [(evict, eparams), (quant, qparams)], "bytes", "ratio"}, or None when no budget
    reaches the ratio within the tolerance (out of reach), or when every budget that does
    keeps fewer events than KIVI's exact residual (the quantizer would encode nothing:
    :func:`quantizes_nothing`).
  """
  spec = _abstract(spec)
  native = memory_bytes("native", spec)
  L, B, H, T, dk = spec.k.shape
  sizes = _chain_sizes(evict, quant, tuple(sorted(qparams.items())),
                       tuple(sorted(efixed.items())), (L, B, H, T, dk, spec.v.shape[-1]))
  # A budget that keeps fewer events than KIVI's exact residual quantizes nothing: the chain
  # would be its eviction alone under the chain's name, so that budget is not a candidate.
  ok = [(ep, b) for ep, b, kept in sizes
        if _within(native / b, ratio, tol) and not quantizes_nothing(quant, qparams, kept)]
  if not ok:
    return None
  ep, b = ok[-1]  # candidates are in increasing budget order
  return {"steps": [(evict, dict(ep)), (quant, dict(qparams))], "bytes": b,
          "ratio": native / b}
