"""Serving costs: FLOPs per request (XLA and a closed form), latency, throughput, bytes.

A *serving request* is what a production system runs when a user comes back: read the
stored memory (``memory.materialize()``: dequantize, re-project, ...), encode the request's m
events against it, and score the full item corpus::

  serve_request(model, memory, request) = model.score(memory.materialize(), request)

The *recompute reference* stores nothing but the raw events and re-encodes the whole history
plus the request every time (``model.score(empty cache, history + request)``).

FLOPs come from XLA: ``jax.jit(fn).lower(...).compile().cost_analysis()["flops"]`` of the
batch, divided by the batch size. For the native HSTU and SASRec request they are cross-checked
against :func:`request_flops`, a closed form derived from the layer code below (matrix
multiplies counted as 2 flops per multiply-add; elementwise ops 1 flop per output element,
SiLU 4, GELU 8, softmax 4, LayerNorm 7 per element, as XLA's cost model counts them;
transcendentals such as log and exp are counted by XLA separately and not here). Every
trained variant of :mod:`malloc_jax.models.variants` has its own closed form
(:mod:`malloc_jax.flops`: :func:`gqa_flops` ... :func:`sasrec_gqa_flops`), same conventions,
named by the variant's spec; :func:`closed_form_flops` reads it from the spec, so this module
imports no model class.

Latency is measured on the compiled executable after warm-up: p50 / p99 over ``iters``
calls of one batch (``block_until_ready`` after each), and users per second = batch / mean.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax.flops import (  # noqa: F401 - the closed forms, re-exported
  ARGMAX_FLOPS,
  ATTN_ENTRY_FLOPS,
  BEACON_MASK_FLOPS,
  GELU_FLOPS,
  HSTU_ENTRY_NO_MASK,
  LAYERNORM_FLOPS,
  SIGMOID_FLOPS,
  SILU_FLOPS,
  SOFTPLUS_FLOPS,
  WKV_STEP_FLOPS,
  beacon_flops,
  gqa_flops,
  linear_flops,
  linformer_flops,
  longformer_flops,
  lsh_flops,
  mla_flops,
  request_flops,
  rwkv_flops,
  sasrec_gqa_flops,
)
from malloc_jax.models import backbone_spec
from malloc_jax.models.base import Events


def _xla_numbers(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older JAX: one dict per device program
    ca = ca[0]
  return {"flops": float(ca.get("flops", 0.0)),
          "transcendentals": float(ca.get("transcendentals", 0.0)),
          "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def xla_cost(fn, *args):
  """Compiles ``fn(*args)`` and reads XLA's cost analysis.

  Returns:
    ({"flops", "transcendentals", "bytes_accessed"} of the whole call, compiled executable).
  """
  compiled = jax.jit(fn).lower(*args).compile()
  return _xla_numbers(compiled), compiled


def model_kind(model) -> str | None:
  """"hstu" / "sasrec" for the native backbones, else None (from the backbone's spec)."""
  spec = backbone_spec(model)
  return spec.name if spec is not None and spec.name in ("hstu", "sasrec") else None


def closed_form_flops(model, *, batch: int, cached: int, request: int) -> dict | None:
  """Closed-form FLOPs of a serving request of ``model`` (None for a model without one).

  The formula is the ``flops`` of the model's backbone spec
  (:func:`malloc_jax.models.backbone_spec`): for the native HSTU / SASRec
  :func:`request_flops` with the dimensions read from ``model``; for a trained variant its
  own closed form (:mod:`malloc_jax.flops`), whose result also has ``xla_uncounted``, the
  flops it counts that XLA's cost model does not.
  ``cached`` is the memory's static slot count (``memory.materialize().capacity``); the
  fixed-state variants (Linformer, RWKV, linear attention) and Longformer read their memory
  size from the model instead.
  """
  spec = backbone_spec(model)
  if spec is None or spec.flops is None:
    return None
  return spec.flops(model, batch=batch, cached=cached, request=request)


def flops_cross_check(model, prefix: Events, request: Events):
  """XLA's FLOPs of a serving request against the closed form, without running anything.

  The native memory of ``prefix`` (``model.prefill`` then the native compressor, as the
  sweep serves it) is traced with ``jax.eval_shape``, never computed: FLOPs depend on shapes
  only. ``costs.serve_request`` on ``request`` [B, m] is then compiled.

  Returns:
    (XLA's numbers of the batch as :func:`xla_cost` gives them, the compiled executable,
    :func:`closed_form_flops` of the batch or None for a model without one).
  """
  memory = jax.eval_shape(
      lambda mdl, e: comp_lib.native().compress(mdl.prefill(e)[0], None)[0], model, prefix)
  numbers, compiled = xla_cost(serve_request, model, memory, request)
  cached = jax.eval_shape(lambda mem: mem.materialize(), memory).capacity
  B, m = request.items.shape
  return numbers, compiled, closed_form_flops(model, batch=B, cached=cached, request=m)


def serve_request(model, memory, request: Events):
  """One serving request batch: logits [B, V + 1] of the request read against the memory."""
  return model.score(memory.materialize(), request)


def recompute_request(model, events: Events):
  """The recompute reference: re-encodes history + request [B, N] from nothing."""
  return model.score(model.empty_cache(events.items.shape[0]), events)


def time_compiled(compiled, args, *, warmup: int = 2, iters: int = 20) -> np.ndarray:
  """Seconds of each of ``iters`` calls of a compiled function, after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return np.asarray(times)


@dataclasses.dataclass(frozen=True)
class RequestCosts:
  """Costs of one request batch; FLOPs are per request (per user)."""

  batch: int
  flops: float
  transcendentals: float
  bytes_accessed: float
  p50_ms: float
  p99_ms: float
  users_per_s: float
  flops_closed_form: float | None = None

  @property
  def flops_ratio(self) -> float | None:
    """XLA / closed-form FLOPs (None without a closed form)."""
    return None if not self.flops_closed_form else self.flops / self.flops_closed_form

  def row(self, prefix: str = "") -> dict:
    out = {f"{prefix}flops_per_request": self.flops,
           f"{prefix}transcendentals_per_request": self.transcendentals,
           f"{prefix}bytes_accessed_per_request": self.bytes_accessed,
           f"{prefix}latency_p50_ms": self.p50_ms, f"{prefix}latency_p99_ms": self.p99_ms,
           f"{prefix}users_per_s": self.users_per_s, f"{prefix}cost_batch": self.batch}
    if self.flops_closed_form is not None:
      out[f"{prefix}flops_closed_form"] = self.flops_closed_form
      out[f"{prefix}flops_xla_over_closed_form"] = self.flops_ratio
    return out


def _measure(fn, args, batch, closed, warmup, iters) -> RequestCosts:
  numbers, compiled = xla_cost(fn, *args)
  times = time_compiled(compiled, args, warmup=warmup, iters=iters)
  return RequestCosts(
      batch=batch, flops=numbers["flops"] / batch,
      transcendentals=numbers["transcendentals"] / batch,
      bytes_accessed=numbers["bytes_accessed"] / batch,
      p50_ms=float(np.percentile(times, 50) * 1e3), p99_ms=float(np.percentile(times, 99) * 1e3),
      users_per_s=float(batch / times.mean()),
      flops_closed_form=None if closed is None else closed["per_request"])


def serving_costs(model, memory, request: Events, *, closed_form: bool = False,
                  warmup: int = 2, iters: int = 20) -> RequestCosts:
  """FLOPs, latency and throughput of serving ``request`` [B, m] from ``memory`` (B users).

  Args:
    model: backbone. memory: a compressor's memory of B users. request: Events [B, m].
    closed_form: also compute :func:`closed_form_flops` (the native HSTU / SASRec and every
      trained variant; None for other models), over the materialized memory's slots. Exact
      in scope for the native compressor's memory; for other compressors it leaves out the
      memory's own ``materialize()`` work (dequantization, re-projection, ...).
    warmup, iters: timing calls (see :func:`time_compiled`).
  """
  B, m = request.items.shape
  closed = None
  if closed_form:
    cached = getattr(memory.materialize(), "capacity", 0)  # a fixed state has no slots
    closed = closed_form_flops(model, batch=B, cached=cached, request=m)
  return _measure(serve_request, (model, memory, request), B, closed, warmup, iters)


def recompute_costs(model, events: Events, *, warmup: int = 2, iters: int = 20) -> RequestCosts:
  """Costs of the recompute reference on histories + requests ``events`` [B, N]."""
  B, N = events.items.shape
  closed = closed_form_flops(model, batch=B, cached=0, request=N)
  return _measure(recompute_request, (model, events), B, closed, warmup, iters)


def bytes_per_user(memory) -> float:
  """Stored per-user bytes of a memory (see :func:`malloc_jax.compressors.bytes_per_user`)."""
  return comp_lib.bytes_per_user(memory)


def events_bytes_per_user(events: Events) -> float:
  """Bytes per user of raw events (items, timestamps, length): what recompute must store."""
  return sum(x.nbytes for x in (events.items, events.ts, events.length)) / events.items.shape[0]


def compression_ratio(native_bytes: float, method_bytes: float) -> float:
  """Native bytes per user / method bytes per user."""
  if method_bytes <= 0:
    raise ValueError(f"compression_ratio: method_bytes={method_bytes} must be > 0")
  return float(native_bytes / method_bytes)


def projection(bytes_per_user: float, users: float = 1e9) -> str:
  """Human-readable bytes for ``users`` users, e.g. ``"160.8 TB"`` (decimal units)."""
  total = bytes_per_user * users
  for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if total >= scale:
      return f"{total / scale:.1f} {unit}"
  return f"{total:.0f} B"
