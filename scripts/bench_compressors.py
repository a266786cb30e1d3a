r"""Compressor throughput as a fraction of the machine's copy bandwidth, measured in one run.

  python scripts/bench_compressors.py [--batch 16] [--repeats 10]

A batch of caches (history 1024, 4 layers, 4 heads, 64 dims, float32: 8 MiB of K and V per
user) is compressed by each jitted compressor; its throughput (cache bytes per second) is
divided by the throughput of a donated, jitted elementwise copy of the same buffers, timed in
the same process. Every round runs the copy and then each method right after it, and a
method's figure is the median over rounds of (copy time / method time), so both sides of a
ratio see the same machine load. Targets (issue 7): quantization (uniform, KIVI) >= 25% of
the copy, eviction (H2O, SnapKV, StreamingLLM) >= 10%. Exits non-zero if a target is missed;
the last line is the smallest fraction against its target.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from malloc_jax import compressors as C
from malloc_jax import logging_setup
from malloc_jax.cache import Cache, Signals

_BATCH = flags.DEFINE_integer("batch", 16, "Users per compressed batch.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds (median reported).")
L, H, T, D, W = 4, 4, 1024, 64, 8


def make_cache(batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = (L, batch, H, T)
  lengths = np.full(batch, T, np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy()
  cache = Cache(k=jnp.asarray(rng.normal(size=shape + (D,)), jnp.float32),
                v=jnp.asarray(rng.normal(size=shape + (D,)), jnp.float32),
                pos=jnp.asarray(pos), ts=jnp.asarray(pos * 60), length=jnp.asarray(lengths))
  signals = Signals(acc_attn=jnp.asarray(rng.random(shape), jnp.float32),
                    window_attn=jnp.asarray(rng.random((L, batch, H, W, T)), jnp.float32),
                    window_valid=jnp.ones((batch, W), bool))
  return cache, signals


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  B, reps = _BATCH.value, _REPEATS.value
  cache, signals = make_cache(B)
  cache_bytes = cache.k.nbytes + cache.v.nbytes
  print(f"device: {jax.devices()[0].device_kind}; cache batch: {B} users x "
        f"{cache_bytes / B / 2**20:.1f} MiB (K+V) = {cache_bytes / 2**20:.0f} MiB")

  # Copy reference: a donated jitted pass that reads and writes every K/V byte.
  # (The scale is an argument so XLA cannot fold the pass away.)
  copy = jax.jit(lambda k, v, s: (k * s, v * s), donate_argnums=(0, 1))
  buffers = [jnp.copy(cache.k), jnp.copy(cache.v)]
  one = jnp.float32(1.0)

  def copy_once() -> float:
    t0 = time.perf_counter()
    buffers[:] = jax.block_until_ready(copy(*buffers, one))
    return time.perf_counter() - t0

  budget = T // 4
  methods = {
      "uniform(8)": ("quant", C.uniform(bits=8)),
      "uniform(4)": ("quant", C.uniform(bits=4)),
      "kivi(2)": ("quant", C.kivi(bits=2, group=32, residual=128)),
      "kivi(4)": ("quant", C.kivi(bits=4, group=32, residual=128)),
      "h2o": ("evict", C.h2o(heavy=budget // 2, recent=budget // 2)),
      "snapkv": ("evict", C.snapkv(budget=budget, window=W)),
      "streaming": ("evict", C.streaming(sinks=4, recent=budget - 4)),
  }
  target = {"quant": 0.25, "evict": 0.10}
  fns = {name: jax.jit(lambda c, s, comp=comp: comp.compress(c, comp.init(c), s)[0])
         for name, (_, comp) in methods.items()}
  copy_once()
  for fn in fns.values():  # compile + warm up
    jax.block_until_ready(fn(cache, signals))

  # Interleaved: every round times each method right after a copy, so both see the same
  # machine load; a method's figure is the median over rounds of copy time / method time.
  ratios = {name: [] for name in fns}
  times = {name: [] for name in fns}
  copies = []
  for _ in range(reps):
    for name, fn in fns.items():
      t_copy = copy_once()
      t0 = time.perf_counter()
      jax.block_until_ready(fn(cache, signals))
      t = time.perf_counter() - t0
      copies.append(t_copy)
      times[name].append(t)
      ratios[name].append(t_copy / t)
  copy_t = statistics.median(copies)
  print(f"copy: {cache_bytes / copy_t / 1e9:.2f} GB/s of K/V read (and as many written), "
        f"median {copy_t * 1e3:.2f} ms over {len(copies)} runs")

  worst = None
  for name, (kind, _) in methods.items():
    frac = statistics.median(ratios[name])
    t = statistics.median(times[name])
    ok = frac >= target[kind]
    print(f"{name:12s} {cache_bytes / t / 1e9:7.2f} GB/s  {t * 1e3:8.2f} ms  {frac:6.1%} of copy  "
          f"(target {target[kind]:.0%}) {'ok' if ok else 'MISSED'}")
    if worst is None or frac / target[kind] < worst[2]:
      worst = (name, frac, frac / target[kind], target[kind])
  name, frac, rel, tgt = worst
  print(f"lowest: {name} at {frac:.1%} of copy bandwidth (target {tgt:.0%}): "
        f"{'PASS' if rel >= 1 else 'FAIL'}")
  sys.exit(0 if rel >= 1 else 1)


if __name__ == "__main__":
  app.run(main)
