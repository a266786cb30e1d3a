r"""Serving from a native memory vs recomputing the history, and the serving memory footprint.

  python scripts/bench_serving.py [--batch 64] [--history 1024] [--new 16] [--heads 2] \
      [--dim 64] [--layers 2] [--rounds 3] [--memory_calls 5]

HSTU (2 layers, 2 heads, 64 dims by default, float32), a batch of 64 users with 1024 history
events each and 16 new candidate events per user (synthetic ids and timestamps):

* memory:    ``model.encode(cache, new)`` with the native cache prefilled beforehand;
* recompute: ``model.encode(model.prefill(history)[0], new)``, the whole history re-encoded.

Both are jitted with the model as an argument and timed in one process, interleaved: every
round times one recompute call and then ``memory_calls`` memory calls, and the speedup is the
median over rounds of (recompute time / median memory time of the round). Target (issue 7):
speedup >= 0.5 x the closed-form FLOP ratio (F_recompute + F_encode) / F_encode, from
:func:`malloc_jax.costs.request_flops` (the implementation's dense masked attention: every query
is computed against all T + m key slots; ``num_items=0`` because ``encode`` returns hidden
states and scores no items).

F_recompute is the work the recompute path must do, not a full forward pass: rebuilding the
memory needs every layer's keys and values of the history, i.e. all layers in full except the
top one, whose attention over the history feeds nothing (its outputs are never read, and XLA
removes it as dead code). So F_recompute = F_prefill(L layers) - the top layer's attention,
gating and output projection over the T history events. XLA's cost analysis of both compiled
paths is printed next to the closed forms as the cross-check (they agree within a few %); the
ratio against a full L-layer prefill is printed too, for reference.

Memory (issue 7): the peak resident memory the run adds (VmHWM of /proc/self/status, reset
through /proc/self/clear_refs after compiling, minus the resident size at that point) must
stay within 1.5x of the bytes the benchmark has to hold: parameters + events + the batch's
memories (the prefilled cache) + the largest activations of one batch (XLA's temp and output
bytes of the executables it runs, from ``memory_analysis()``). On an accelerator the device's
``peak_bytes_in_use`` is compared instead.

Exits non-zero if a target is missed; the last line is the speedup / FLOP-ratio quotient.
"""

from __future__ import annotations

import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from malloc_jax import costs, logging_setup
from malloc_jax.models import HSTU, Events

_BATCH = flags.DEFINE_integer("batch", 64, "Users per batch.")
_HISTORY = flags.DEFINE_integer("history", 1024, "History events per user (T).")
_NEW = flags.DEFINE_integer("new", 16, "New candidate events per user (m).")
_LAYERS = flags.DEFINE_integer("layers", 2, "HSTU layers.")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads.")
_DIM = flags.DEFINE_integer("dim", 64, "Model dimension.")
_ITEMS = flags.DEFINE_integer("items", 3000, "Item vocabulary (synthetic ids 1..items).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median reported).")
_MEMORY_CALLS = flags.DEFINE_integer("memory_calls", 5, "Memory-path calls per round.")

SPEEDUP_TARGET = 0.5  # of the FLOP ratio
MEMORY_TARGET = 1.5  # peak / bytes held


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def synthetic_events(batch: int, history: int, new: int, items: int, seed: int = 0):
  """(history Events [B, T], new Events [B, m]) with increasing timestamps (seconds)."""
  rng = np.random.default_rng(seed)
  n = history + new
  ids = rng.integers(1, items + 1, (batch, n)).astype(np.int32)
  ts = np.cumsum(rng.integers(1, 3600, (batch, n)), axis=1).astype(np.int32)
  hist = Events(jnp.asarray(ids[:, :history]), jnp.asarray(ts[:, :history]),
                jnp.full((batch,), history, jnp.int32))
  req = Events(jnp.asarray(ids[:, history:]), jnp.asarray(ts[:, history:]),
               jnp.full((batch,), new, jnp.int32))
  return hist, req


def _nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _activation_bytes(compiled) -> int:
  ma = compiled.memory_analysis()
  return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)


def _xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("flops", 0.0))


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  B, T, m = _BATCH.value, _HISTORY.value, _NEW.value
  L, H, d = _LAYERS.value, _HEADS.value, _DIM.value
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  print(f"device: {device.device_kind} ({device.platform}); HSTU {L} layers, {H} heads, "
        f"dim {d}, float32; batch {B} users x {T} history + {m} new events")

  def make_model():
    return HSTU(_ITEMS.value, dim=d, heads=H, num_layers=L, max_len=T + m, dropout=0.0,
                rngs=nnx.Rngs(0))

  # Compile everything from shapes first, so the memory measured below is the run's own.
  abstract_model = nnx.eval_shape(make_model)
  abstract_hist, abstract_new = jax.eval_shape(
      lambda: synthetic_events(B, T, m, _ITEMS.value))
  prefill = jax.jit(lambda model, hist: model.prefill(hist)[0])
  memory_path = jax.jit(lambda model, cache, new: model.encode(cache, new))
  recompute_path = jax.jit(lambda model, hist, new: model.encode(model.prefill(hist)[0], new))
  prefill_c = prefill.lower(abstract_model, abstract_hist).compile()
  abstract_cache = jax.eval_shape(prefill, abstract_model, abstract_hist)
  memory_c = memory_path.lower(abstract_model, abstract_cache, abstract_new).compile()
  recompute_c = recompute_path.lower(abstract_model, abstract_hist, abstract_new).compile()

  base_rss = _status_kib("VmRSS") * 1024
  peak_reset = on_cpu and reset_peak_rss()

  model = make_model()
  hist, new = synthetic_events(B, T, m, _ITEMS.value)
  cache = jax.block_until_ready(prefill_c(model, hist))
  jax.block_until_ready(memory_c(model, cache, new))  # warm up
  jax.block_until_ready(recompute_c(model, hist, new))

  ratios, t_mem_all, t_rec_all = [], [], []
  for _ in range(_ROUNDS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(recompute_c(model, hist, new))
    t_rec = time.perf_counter() - t0
    t_mem = []
    for _ in range(_MEMORY_CALLS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(memory_c(model, cache, new))
      t_mem.append(time.perf_counter() - t0)
    ratios.append(t_rec / statistics.median(t_mem))
    t_rec_all.append(t_rec)
    t_mem_all.extend(t_mem)

  # --- memory ---------------------------------------------------------------------------
  params_b = _nbytes(nnx.state(model, nnx.Param))
  events_b = _nbytes((hist, new))
  cache_b = _nbytes(cache)
  act_b = max(_activation_bytes(c) for c in (prefill_c, memory_c, recompute_c))
  held = params_b + events_b + cache_b + act_b
  if on_cpu:
    peak = _status_kib("VmHWM") * 1024 - (base_rss if peak_reset else 0)
    how = ("VmHWM - RSS after compiling" if peak_reset
           else "VmHWM of the whole process (clear_refs not allowed)")
  else:
    stats = device.memory_stats() or {}
    peak = int(stats.get("peak_bytes_in_use", 0))
    how = "device peak_bytes_in_use"
  mem_ratio = peak / held
  mem_ok = mem_ratio <= MEMORY_TARGET
  mib = lambda x: f"{x / 2**20:,.1f} MiB"
  print(f"bytes held: {mib(held)} = params {mib(params_b)} + events {mib(events_b)} + "
        f"memories (prefilled cache) {mib(cache_b)} + activations of one batch {mib(act_b)}")
  print(f"peak memory: {mib(peak)} ({how}) = {mem_ratio:.2f}x the bytes held "
        f"(target <= {MEMORY_TARGET}x) {'ok' if mem_ok else 'MISSED'}")

  # --- speed ----------------------------------------------------------------------------
  kw = dict(batch=B, num_layers=L, dim=d, heads=H, dqk=d // H, dv=d // H, num_items=0)
  f_enc = costs.request_flops("hstu", cached=T, request=m, **kw)["total"]
  f_pre = costs.request_flops("hstu", cached=0, request=T, **kw)["total"]
  # The top layer's work after its U, V, Q, K projection, per history event (costs.py terms):
  # scores and A V over the T keys, bias/mask/SiLU entries, LN(A V) * U, W_o, residual.
  dh = d // H
  top_dead = B * T * (2 * H * T * (dh + dh) + costs.ATTN_ENTRY_FLOPS["hstu"] * H * T
                      + (costs.LAYERNORM_FLOPS + 1) * H * dh + 2 * H * dh * d + 2 * d)
  f_rec = f_pre - top_dead
  full_ratio = (f_pre + f_enc) / f_enc
  flop_ratio = (f_rec + f_enc) / f_enc
  speedup = statistics.median(ratios)
  quotient = speedup / flop_ratio
  speed_ok = quotient >= SPEEDUP_TARGET
  print(f"closed-form FLOPs per batch: encode from memory {f_enc:.3e}; recompute "
        f"{f_rec + f_enc:.3e} (full {L}-layer prefill {f_pre:.3e} minus the top layer's dead "
        f"attention {top_dead:.3e}, plus encode)")
  print(f"XLA cost analysis: memory path {_xla_flops(memory_c):.3e} "
        f"({_xla_flops(memory_c) / f_enc:.2f}x closed form), recompute path "
        f"{_xla_flops(recompute_c):.3e} ({_xla_flops(recompute_c) / (f_rec + f_enc):.2f}x "
        f"closed form); ratio against a full-prefill count would be {full_ratio:.1f}x")
  print(f"memory path {statistics.median(t_mem_all) * 1e3:.1f} ms, recompute path "
        f"{statistics.median(t_rec_all) * 1e3:.1f} ms (medians); speedup {speedup:.1f}x "
        f"(rounds: {', '.join(f'{r:.1f}' for r in ratios)}), FLOP ratio {flop_ratio:.1f}x")
  ok = speed_ok and mem_ok
  print(f"speedup / FLOP ratio: {quotient:.2f} (target >= {SPEEDUP_TARGET}) "
        f"{'ok' if speed_ok else 'MISSED'}; peak memory {mem_ratio:.2f}x held "
        f"(target <= {MEMORY_TARGET}x) {'ok' if mem_ok else 'MISSED'}: "
        f"{'PASS' if ok else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
