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
transcendentals such as log and exp are counted by XLA separately and not here).

Latency is measured on the compiled executable after warm-up: p50 / p99 over ``iters``
calls of one batch (``block_until_ready`` after each), and users per second = batch / mean.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from malloc_jax import compressors as comp_lib
from malloc_jax.models.base import Events
from malloc_jax.models.hstu import HSTU
from malloc_jax.models.sasrec import SASRec

# Elementwise flops per attention entry (head, query, key slot), as the compiled program runs
# them (read off the layer code and checked against XLA's HLO):
#   HSTU (28): relative position q - k clipped (3); time gap (1); log bucket: abs, max, / 0.301,
#     floor, clip (6); jnp's index normalization of the two bias-table gathers (compare, add,
#     select per index: 6); the two biases added to the scores (2); causal / validity mask:
#     >=, <=, and, and (4); SiLU (4); mask select (1); / N (1).
#   SASRec (15): / sqrt(Dh) (1); mask (4); masked fill (1); softmax: max-reduce, subtract,
#     sum-reduce, divide (4); select (1); and the 4 elementwise ops XLA's CPU softmax rewrite
#     adds (reduce-window partial max and sum, their broadcasts).
ATTN_ENTRY_FLOPS = {"hstu": 28, "sasrec": 15}
LAYERNORM_FLOPS = 7  # per element: mean, centre, square, variance, normalize, scale, shift
SILU_FLOPS = 4
GELU_FLOPS = 8


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


def request_flops(kind: str, *, batch: int, num_layers: int, dim: int, heads: int,
                  dqk: int, dv: int, cached: int, request: int, num_items: int) -> dict:
  """Closed-form FLOPs of a native serving request batch (dense compute, as executed).

  Every one of the ``cached`` memory slots is computed against (masked, not skipped), so the
  count depends on the memory's capacity T, not on how many slots are filled.

  Per user, per layer, with m = ``request`` query events and K = T + m key slots:

  * HSTU: x̂ = LN(x) (7d); U,V,Q,K = SiLU(x̂ W + b): 2 m d W + 5 m W with W = H (2 Dv + 2 Dqk);
    scores Q Kᵀ: 2 m H K Dqk; bias, mask, SiLU, / N: 28 m H K; A V: 2 m H K Dv;
    LN(A V) ⊙ U: 8 m H Dv; W_o + bias + residual: 2 m H Dv d + 2 m d.
  * SASRec: LN (7d); QKV = x̂ W + b: 6 m d² + 3 m d; scores: 2 m H K Dh; mask and softmax:
    15 m H K; A V: 2 m H K Dh; W_o + bias + residual: 2 m d² + 2 m d; LN (7d);
    FFN d -> d -> d with GELU, biases and residual: 4 m d² + 11 m d (final LayerNorm once:
    7 m d).

  Shared by both: the embedding (scale, position add: 2 m d); the memory's index expanded to
  slot positions (2 L H T); the user state normalized (3 d) and scored against every item
  (2 d (V + 1) + (V + 1)); and, once per batch, the item table normalized (3 d (V + 1)).

  Args:
    kind: "hstu" or "sasrec". batch: B users. num_layers: L. dim: d. heads: H.
    dqk, dv: per-head key and value dims (SASRec: both d / H). cached: T, the memory's
    capacity. request: m. num_items: V.

  Returns:
    {"total": flops of the batch, "per_request": total / B, "matmul": the matrix-multiply
    part of the total}.

  References: Zhai et al., "Actions Speak Louder than Words" (HSTU), ICML 2024; Kang &
    McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
  """
  if kind not in ATTN_ENTRY_FLOPS:
    raise ValueError(f"request_flops: kind={kind!r}; expected 'hstu' or 'sasrec'")
  d, H, m, T, L, V1 = dim, heads, request, cached, num_layers, num_items + 1
  K = T + m
  if kind == "hstu":
    W = H * (2 * dv + 2 * dqk)
    mm = 2 * m * d * W + 2 * m * H * K * (dqk + dv) + 2 * m * H * dv * d
    ew = (LAYERNORM_FLOPS * m * d + (1 + SILU_FLOPS) * m * W
          + ATTN_ENTRY_FLOPS["hstu"] * m * H * K + (LAYERNORM_FLOPS + 1) * m * H * dv
          + 2 * m * d)
    final = 0
  else:
    mm = 6 * m * d * d + 2 * m * H * K * (dqk + dv) + 2 * m * d * d + 4 * m * d * d
    ew = (LAYERNORM_FLOPS * m * d + 3 * m * d + ATTN_ENTRY_FLOPS["sasrec"] * m * H * K
          + 2 * m * d + LAYERNORM_FLOPS * m * d + (GELU_FLOPS + 3) * m * d)
    final = LAYERNORM_FLOPS * m * d
  per_user_mm = L * mm + 2 * d * V1
  per_user = per_user_mm + L * ew + final + 2 * m * d + 2 * L * H * T + 3 * d + V1
  total = batch * per_user + 3 * d * V1
  return {"total": float(total), "per_request": float(total / batch),
          "matmul": float(batch * per_user_mm)}


def model_kind(model) -> str | None:
  """"hstu" / "sasrec" for the native backbones (the closed form's scope), else None."""
  if type(model) is HSTU:
    return "hstu"
  if type(model) is SASRec:
    return "sasrec"
  return None


def closed_form_flops(model, *, batch: int, cached: int, request: int) -> dict | None:
  """:func:`request_flops` with the dimensions read from ``model`` (None for other models)."""
  kind = model_kind(model)
  if kind is None:
    return None
  heads, dqk, dv = model.head_dims()
  return request_flops(kind, batch=batch, num_layers=len(model.layers), dim=model.dim,
                       heads=heads, dqk=dqk, dv=dv, cached=cached, request=request,
                       num_items=model.num_items)


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
    closed_form: also compute :func:`request_flops` (meaningful for a native memory of the
      native HSTU / SASRec; None for other models).
    warmup, iters: timing calls (see :func:`time_compiled`).
  """
  B, m = request.items.shape
  closed = None
  if closed_form:
    cached = memory.materialize().capacity
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
