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

Memory forms (issue 21), ``--mode=forms``::

  python scripts/bench_serving.py --mode=forms [--histories 1024,4096,8192] \
      [--requests 1,16,16+100] [--forms native,lowrank4,...] [--rounds 3]

serves one batch (64 users) from each memory form, read in its own form by
``model.encode(memory, request)`` (malloc_jax.reads: no dense cache of full capacity), next to
``native``: the dense Cache path that every form took before (``encode(cache)``), which is the
reference of every ratio. Histories are synthetic caches (random keys and values, increasing
positions and timestamps; prefilling 8,192 events at batch 64 would need a [B, H, T, T] score
tensor), attention signals for H2O / SnapKV are random. Forms: native (dense path),
native_read (the same cache as a DenseMemory through the read), lowrank4 / lowrank8 (rank
D/4, D/8, bases fitted on the cache), kivi2 / kivi4 (G=32, R=128), uniform8 / uniform4, h2o8 /
snapkv8 (budget T/8), chain (snapkv8 then kivi2). Requests: ``m`` new events, or ``m+C``: m
events plus C ranking candidates scored as extra query events (the candidates' keys join the
request's own keys; ``model.rank``'s candidate block mask needs the materialized memory, which
the compressed reads exist to avoid, so here candidates are not isolated from each other: the
same reads of the memory, a few more new keys). All forms are timed interleaved in one
process (every round calls every form once; medians over rounds). Peak memory: XLA's temp
bytes of the compiled request (``memory_analysis``) and VmHWM after one call (reset through
/proc/self/clear_refs before it). Bytes read: every stored leaf of the memory once, per user.
Where a target of issue 21 is missed the roofline estimate is printed: bytes read / measured
copy bandwidth and closed-form FLOPs / measured matmul rate (:func:`closed_form_read`; XLA's
cost analysis counts the body of a scanned read once, so its GFLOP column undercounts them).
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
from malloc_jax.models import HSTU, Events, SASRec

_BATCH = flags.DEFINE_integer("batch", 64, "Users per batch.")
_HISTORY = flags.DEFINE_integer("history", 1024, "History events per user (T).")
_NEW = flags.DEFINE_integer("new", 16, "New candidate events per user (m).")
_LAYERS = flags.DEFINE_integer("layers", 2, "HSTU layers.")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads.")
_DIM = flags.DEFINE_integer("dim", 64, "Model dimension.")
_ITEMS = flags.DEFINE_integer("items", 3000, "Item vocabulary (synthetic ids 1..items).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median reported).")
_MEMORY_CALLS = flags.DEFINE_integer("memory_calls", 5, "Memory-path calls per round.")
_MODE = flags.DEFINE_enum("mode", "recompute", ["recompute", "forms"],
                          "recompute: memory vs recompute (issue 7); forms: memory forms (21).")
_HISTORIES = flags.DEFINE_list("histories", ["1024", "4096", "8192"], "forms: history lengths.")
_REQUESTS = flags.DEFINE_list("requests", ["1", "16", "16+100"],
                              "forms: request events, or events+candidates.")
_FORMS = flags.DEFINE_list("forms", ["native", "native_read", "lowrank4", "lowrank8", "kivi2",
                                     "kivi4", "uniform8", "uniform4", "h2o8", "snapkv8",
                                     "chain"], "forms: memory forms.")
_CHUNK = flags.DEFINE_integer("chunk", 512, "forms: slots per chunk of the blocked reads.")
_BACKBONE = flags.DEFINE_enum("backbone", "hstu", ["hstu", "sasrec"], "forms: backbone.")

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
  if _MODE.value == "forms":
    sys.exit(run_forms(batch=_BATCH.value, histories=[int(h) for h in _HISTORIES.value],
                       requests=_REQUESTS.value, forms=_FORMS.value, layers=_LAYERS.value,
                       heads=_HEADS.value, dim=_DIM.value, items=_ITEMS.value,
                       rounds=_ROUNDS.value, chunk=_CHUNK.value, backbone=_BACKBONE.value))
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


# ----------------------------------------------------------------------------------------
# Memory forms (issue 21).

TARGETS = {"lowrank8": (0.35, None), "h2o8": (0.30, None), "snapkv8": (0.30, None),
           "kivi2": (0.70, 0.5)}  # form: (latency ratio, peak-memory ratio) to native
TARGET_CELL = (4096, "16")


def synthetic_cache(L, B, H, T, D, seed=0):
  """A contiguous native Cache of T events per user with random K, V (HSTU: after SiLU)."""
  from malloc_jax.cache import Cache  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  k = jax.nn.silu(jnp.asarray(rng.normal(size=(L, B, H, T, D)), jnp.float32))
  v = jax.nn.silu(jnp.asarray(rng.normal(size=(L, B, H, T, D)), jnp.float32))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L, B, H, T))
  ts = np.cumsum(rng.integers(1, 3600, (B, T)), axis=1).astype(np.int32)
  ts = jnp.broadcast_to(jnp.asarray(ts)[None, :, None], (L, B, H, T))
  return Cache(k=k, v=v, pos=pos, ts=ts, length=jnp.full((B,), T, jnp.int32))


def synthetic_signals(L, B, H, T, window=8, seed=1):
  from malloc_jax.cache import Signals  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  acc = jnp.asarray(rng.random((L, B, H, T)), jnp.float32)
  win = jnp.asarray(rng.random((L, B, H, window, T)), jnp.float32)
  return Signals(acc_attn=acc, window_attn=win, window_valid=jnp.ones((B, window), bool))


def make_form(name, cache, T, D):
  """Compressor of a form name (None for the two native forms)."""
  from malloc_jax import compressors as C  # noqa: PLC0415
  budget = T // 8
  if name == "native":
    return None
  if name == "native_read":
    return C.native()
  if name.startswith("lowrank"):
    sub = cache.replace(k=cache.k[:, :8], v=cache.v[:, :8], pos=cache.pos[:, :8],
                        ts=cache.ts[:, :8], length=cache.length[:8])
    return C.lowrank(C.fit_lowrank([sub], rank=D // int(name[len("lowrank"):])))
  table = {"kivi2": lambda: C.kivi(bits=2, group=32, residual=128),
           "kivi4": lambda: C.kivi(bits=4, group=32, residual=128),
           "uniform8": lambda: C.uniform(8), "uniform4": lambda: C.uniform(4),
           "h2o8": lambda: C.h2o(heavy=budget // 2, recent=budget // 2),
           "snapkv8": lambda: C.snapkv(budget=budget, window=8),
           "chain": lambda: C.chain(C.snapkv(budget=budget, window=8),
                                    C.kivi(bits=2, group=32, residual=128))}
  if name not in table:
    raise ValueError(f"--forms: unknown form {name!r}; expected native, native_read, "
                     f"lowrank<N>, {', '.join(table)}")
  return table[name]()


def _parse_request(spec: str) -> tuple[int, int]:
  m, _, c = spec.partition("+")
  try:
    return int(m), int(c or 0)
  except ValueError:
    raise ValueError(f"--requests: {spec!r} must be 'm' or 'm+C' (integers)") from None


def copy_bandwidth() -> float:
  """Bytes per second of an out-of-place copy of 256 MiB (read + write counted)."""
  x = jnp.ones((64 * 2**20,), jnp.float32)
  f = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(f(x))
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    t.append(time.perf_counter() - t0)
  return 2 * x.nbytes / statistics.median(t)


def matmul_rate() -> float:
  """FLOP/s of a float32 [1024, 1024] x [1024, 1024] matmul."""
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    t.append(time.perf_counter() - t0)
  return 2 * 1024**3 / statistics.median(t)


def _malloc_trim() -> None:
  import ctypes  # noqa: PLC0415
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def _xla_bytes(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("bytes accessed", 0.0))


def closed_form_read(memory, B, L, H, D, n) -> dict:
  """Closed-form cost of reading a memory for n queries: bytes, FLOPs, bias entries.

  bytes: every stored leaf once. FLOPs: scores and weighted values over the memory's
  capacity in the dimension it is read in (D, or r for low rank), plus 4 per stored key and
  value element to decode a quantized memory (convert, scale, offset, select). bias entries:
  L·B·H·n·capacity (HSTU's rab). XLA's cost analysis counts a scanned read's loop body once,
  so it is not used here.
  """
  from malloc_jax import compressors as C  # noqa: PLC0415
  from malloc_jax import reads  # noqa: PLC0415
  from malloc_jax.cache import Cache  # noqa: PLC0415
  if isinstance(memory, Cache):
    cap, dd, decode = memory.capacity, D, 0
  elif isinstance(memory, C.LowRankMemory):
    cap, dd, decode = memory.ck.shape[3], memory.ck.shape[4], 0
  elif isinstance(memory, C.DenseMemory):
    cap, dd, decode = memory.k.shape[3], D, 0
  else:
    cap = memory.spec.capacity if isinstance(memory, C.KiviMemory) else memory.k_codes.shape[3]
    dd, decode = D, 4 * 2 * L * B * H * cap * D
  flops = 2 * 2 * L * B * H * n * cap * dd + decode
  return dict(bytes=float(reads.read_bytes(memory)), flops=float(flops),
              bias=float(L * B * H * n * cap))


def _timed(f, *args, reps=3) -> float:
  jax.block_until_ready(f(*args))
  t = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    t.append(time.perf_counter() - t0)
  return statistics.median(t)


def _old_bias(layer, q_pos, q_ts, kpos, kts):
  """HSTULayer.bias as it was before issue 21 (the profile's reference, same values)."""
  from malloc_jax.models.hstu import time_bucket  # noqa: PLC0415
  heads = jnp.arange(layer.heads)[None, :, None, None]
  rel = jnp.clip(q_pos[:, None, :, None] - kpos[:, :, None, :], 0, layer.max_len - 1)
  dt = q_ts[:, None, :, None] - kts[:, :, None, :]
  return (layer.rab_pos[...][heads, rel]
          + layer.rab_time[...][heads, time_bucket(dt, layer.num_time_buckets)])


def profile_parts(B, H, m, T, D, memories) -> None:
  """Times the parts of one HSTU layer's read at these shapes (where the time goes)."""
  from malloc_jax import reads  # noqa: PLC0415
  from malloc_jax.models.hstu import HSTULayer  # noqa: PLC0415
  layer = HSTULayer(H * D, H, D, D, T + m, 128, 0.0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(B, H, m, D)), jnp.float32)
  q_pos = jnp.broadcast_to(T + jnp.arange(m, dtype=jnp.int32), (B, m))
  q_ts = jnp.full((B, m), 10**9, jnp.int32)
  kpos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, H, T))
  kts = kpos * 1000
  k = jnp.asarray(rng.normal(size=(B, H, T, D)), jnp.float32)
  kpos1, kts1 = kpos[:, :1], kts[:, :1]  # [B, 1, T]: a DenseIndex memory's one index
  rel, bkt = jax.jit(layer.rab_index)(q_pos, q_ts, kpos1, kts1)
  parts = {
      "rab index [B,1,m,T] once for all heads (clip; time-gap log)": (jax.jit(
          lambda a, b, c, d: jnp.sum(jnp.add(*layer.rab_index(a, b, c, d)))), q_pos, q_ts,
          kpos1, kts1),
      "rab gathers [B,H,m,T] from that index (two flat tables)": (jax.jit(
          lambda layer, r, b: jnp.sum(layer.rab(r, b))), layer, rel, bkt),
      "rab bias from a [B,1,T] index (reads: index + gathers)": (jax.jit(
          lambda layer, a, b, c, d: jnp.sum(layer.bias(a, b, c, d))), layer, q_pos, q_ts,
          kpos1, kts1),
      "rab bias from a [B,H,T] index (native cache: per head)": (jax.jit(
          lambda layer, a, b, c, d: jnp.sum(layer.bias(a, b, c, d))), layer, q_pos, q_ts, kpos,
          kts),
      "rab bias as before issue 21 (per head: log + two 2-D gathers)": (jax.jit(
          lambda layer, a, b, c, d: jnp.sum(_old_bias(layer, a, b, c, d))), layer, q_pos,
          q_ts, kpos, kts),
      "scores + A.V matmuls over T (dense K, V)": (jax.jit(
          lambda q, k: jnp.sum(jnp.einsum("bhmt,bhtd->bhmd", jax.nn.silu(
              jnp.einsum("bhmd,bhtd->bhmt", q, k)), k))), q, k),
  }
  if "kivi2" in memories:
    def kivi_decode(mem):
      pos, _ = reads._index_full(mem.index, 0, H, T)
      counts = reads._kivi_split(pos, mem.spec.residual, mem.spec.key_residual)
      k, v = reads._kivi_chunk(mem, 0, 0, T, counts)
      return jnp.sum(k) + jnp.sum(v)
    parts["KIVI-2 decode of one layer (all chunks, no attention)"] = (
        jax.jit(kivi_decode), memories["kivi2"])
  print("profile of one layer's read (median of 3, ms):")
  for name, (f, *args) in parts.items():
    print(f"   {name:64s} {_timed(f, *args) * 1e3:8.1f}")


def run_forms(*, batch, histories, requests, forms, layers, heads, dim, items, rounds,
              chunk, backbone="hstu") -> int:
  """Times every memory form side by side; returns 0 if every checked target is met."""
  import os  # noqa: PLC0415

  from malloc_jax import reads  # noqa: PLC0415
  B, L, H, D = batch, layers, heads, dim // heads
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  bw, rate = copy_bandwidth(), matmul_rate()
  print(f"device: {device.device_kind} ({device.platform}); {backbone} {L} layers, {H} heads x {D} "
        f"dims, float32; batch {B}; load average {os.getloadavg()}")
  print(f"measured copy bandwidth {bw / 1e9:.2f} GB/s, float32 matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s")
  reqs = [_parse_request(r) for r in requests]
  reads.DEFAULT_CHUNK = chunk
  ok = True
  rows = []
  for T in histories:
    cache = synthetic_cache(L, B, H, T, D)
    signals = synthetic_signals(L, B, H, T)
    memories = {}
    for name in forms:
      comp = make_form(name, cache, T, D)
      if comp is None:
        memories[name] = cache
      else:
        memories[name] = jax.block_until_ready(
            jax.jit(lambda c, s, comp=comp: comp.compress(c, comp.init(c), s)[0])(cache,
                                                                                   signals))
    del cache, signals
    for (m, C_), spec in zip(reqs, requests):
      n = m + C_
      if backbone == "hstu":
        model = HSTU(items, dim=dim, heads=H, num_layers=L, max_len=T + n, dropout=0.0,
                     rngs=nnx.Rngs(0))
      else:
        model = SASRec(items, dim=dim, heads=H, num_layers=L, max_len=T + n, dropout=0.0,
                       rngs=nnx.Rngs(0))
      _, req = synthetic_events(B, T, n, items)
      req = req.replace(ts=req.ts + 10**9)  # after every history event
      fn = jax.jit(lambda model, mem, req: model.encode(mem, req))
      compiled, stats = {}, {}
      for name in forms:
        c = fn.lower(model, memories[name], req).compile()
        compiled[name] = c
        stats[name] = dict(cf=closed_form_read(memories[name], B, L, H, D, m + C_),
                           temp=c.memory_analysis().temp_size_in_bytes,
                           flops=_xla_flops(c), xbytes=_xla_bytes(c),
                           read=reads.read_bytes(memories[name]) / B)
        jax.block_until_ready(c(model, memories[name], req))  # warm up
      times = {name: [] for name in forms}
      for _ in range(rounds):
        for name in forms:
          t0 = time.perf_counter()
          jax.block_until_ready(compiled[name](model, memories[name], req))
          times[name].append(time.perf_counter() - t0)
      for name in forms:  # peak resident memory of one call, form by form
        if on_cpu:
          _malloc_trim()  # return freed arenas, so the call's own pages count
        if on_cpu and reset_peak_rss():
          base = _status_kib("VmRSS")
          jax.block_until_ready(compiled[name](model, memories[name], req))
          stats[name]["hwm"] = (_status_kib("VmHWM") - base) * 1024
        else:
          stats[name]["hwm"] = float("nan")
      ref = statistics.median(times["native"]) if "native" in times else float("nan")
      ref_s = stats.get("native")
      print(f"\n== history {T}, batch {B}, request {spec} ({m} events + {C_} candidates as "
            f"extra queries); load average {os.getloadavg()[0]:.2f}")
      print(f"{'form':12s} {'median ms':>10s} {'x native':>9s} {'XLA temp MiB':>13s} "
            f"{'x native':>9s} {'VmHWM+ MiB':>11s} {'read KiB/user':>14s} {'x native':>9s} "
            f"{'GFLOP':>8s}")
      for name in forms:
        t = statistics.median(times[name])
        st = stats[name]
        lat_r = t / ref
        mem_r = st["temp"] / ref_s["temp"] if ref_s else float("nan")
        read_r = st["read"] / ref_s["read"] if ref_s else float("nan")
        print(f"{name:12s} {t * 1e3:10.1f} {lat_r:9.3f} {st['temp'] / 2**20:13.1f} "
              f"{mem_r:9.3f} {st['hwm'] / 2**20:11.1f} {st['read'] / 1024:14.1f} "
              f"{read_r:9.3f} {st['flops'] / 1e9:8.2f}")
        rows.append(dict(history=T, request=spec, form=name, ms=t * 1e3, lat_ratio=lat_r,
                         temp=st["temp"], temp_ratio=mem_r, hwm=st["hwm"], read=st["read"]))
        target = TARGETS.get(name)
        if target and (T, spec) == TARGET_CELL:
          lat_ok = lat_r <= target[0]
          mem_ok = target[1] is None or mem_r <= target[1]
          ok &= lat_ok and mem_ok
          msg = (f"   target {name}: latency {lat_r:.3f}x (<= {target[0]}) "
                 f"{'ok' if lat_ok else 'MISSED'}")
          if target[1] is not None:
            msg += f"; XLA temp {mem_r:.3f}x (<= {target[1]}) {'ok' if mem_ok else 'MISSED'}"
          print(msg)
          if not (lat_ok and mem_ok):
            cf, ref_cf = stats[name]["cf"], ref_s["cf"]
            est = lambda c: max(c["bytes"] / bw, c["flops"] / rate)
            print(f"   roofline (closed form): {name} reads {cf['bytes'] / 1e6:.1f} MB "
                  f"-> {cf['bytes'] / bw * 1e3:.1f} ms, {cf['flops'] / 1e9:.2f} GFLOP -> "
                  f"{cf['flops'] / rate * 1e3:.1f} ms; native {ref_cf['bytes'] / 1e6:.1f} MB "
                  f"-> {ref_cf['bytes'] / bw * 1e3:.1f} ms, {ref_cf['flops'] / 1e9:.2f} GFLOP "
                  f"-> {ref_cf['flops'] / rate * 1e3:.1f} ms; roofline ratio "
                  f"{est(cf) / est(ref_cf):.3f}; both also evaluate "
                  f"{cf['bias'] / 1e6:.1f}M / {ref_cf['bias'] / 1e6:.1f}M rab bias entries "
                  f"(two table gathers each, and a time-gap log per query and slot shared "
                  f"by the heads; neither bytes nor FLOPs)")
      if (T, spec) == TARGET_CELL and backbone == "hstu":
        profile_parts(B, H, m, T, D, memories)
      del compiled
  print(f"\nload average at the end {os.getloadavg()}")
  if TARGET_CELL[0] not in histories or TARGET_CELL[1] not in requests:
    print(f"targets at history {TARGET_CELL[0]}, request {TARGET_CELL[1]}: not measured")
    return 0
  print(f"targets at history {TARGET_CELL[0]}, request {TARGET_CELL[1]}: "
        f"{'PASS' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  app.run(main)
