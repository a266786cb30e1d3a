r"""HSTU training throughput, jitted vs eager, and compilations per shape, measured in one run.

  python scripts/bench_training.py [--steps 24] [--eager_steps 3]

The ML-100K configuration (HSTU, 2 layers, 1 head, 50 dims, max_len 200, batch 128, 128
sampled negatives, AdamW through ``train.make_optimizer``) on synthetic data of that shape
(1,682 items, windows of 201 events, a random length of 2..201 per user, so every batch has
different contents and a different number of events). The jitted update
(:class:`malloc_jax.train.Trainer`, donated state) runs ``--steps`` steps; the same update
runs eagerly under ``jax.disable_jit()`` for ``--eager_steps`` steps, interleaved with the
jitted ones (each round: a block of jitted steps, then one eager step). Throughput is
training events (predicted next events) per second of each step; the figure is the median
jitted throughput over the median eager throughput. Targets (issue 7): >= 1.5x, and the
jitted update compiles once for the shape: ``Trainer.compiles`` is 1 after all steps and no
backend compilation happens in the jitted steps after the first (counted through
``jax.monitoring``; eager steps compile their primitives and are not counted).

Exits non-zero if a target is missed; the last line is the jit / eager throughput ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from malloc_jax import logging_setup
from malloc_jax.models import make_model
from malloc_jax.train import Trainer, make_optimizer

_STEPS = flags.DEFINE_integer("steps", 24, "Jitted training steps (>= 20).")
_EAGER_STEPS = flags.DEFINE_integer("eager_steps", 3, "Eager training steps.")
_BATCH = flags.DEFINE_integer("batch", 128, "Users per batch.")

NUM_ITEMS, MAX_LEN, NEGATIVES = 1682, 200, 128  # ML-100K
SPEEDUP_TARGET = 1.5

_backend_compiles = [0]


def _on_event(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _backend_compiles[0] += 1


def synthetic_batch(rng: np.random.Generator, batch: int):
  """(items, ts [B, MAX_LEN + 1], length [B]) like a TrainSet batch, right-padded with 0."""
  n = MAX_LEN + 1
  length = rng.integers(2, n + 1, batch).astype(np.int32)
  valid = np.arange(n)[None, :] < length[:, None]
  items = np.where(valid, rng.integers(1, NUM_ITEMS + 1, (batch, n)), 0).astype(np.int32)
  ts = np.where(valid, np.cumsum(rng.integers(1, 3600, (batch, n)), axis=1), 0).astype(np.int32)
  return jnp.asarray(items), jnp.asarray(ts), jnp.asarray(length)


def events_in(batch) -> int:
  """Predicted next events of a batch (what ``sampled_softmax_loss`` averages over)."""
  return int(np.maximum(np.asarray(batch[2]) - 1, 0).sum())


def new_trainer() -> Trainer:
  model = make_model("hstu", NUM_ITEMS, seed=0, dim=50, heads=1, num_layers=2,
                     max_len=MAX_LEN, dropout=0.2)
  return Trainer(model, make_optimizer(1e-3, 0.0), NEGATIVES)


def main(argv):
  del argv
  logging_setup.setup()  # quiet by default; --verbosity=0 for INFO
  if _STEPS.value < 20:
    raise ValueError(f"--steps={_STEPS.value}: the compile check needs >= 20 steps")
  print(f"device: {jax.devices()[0].device_kind}; HSTU ML-100K config: 2 layers, 1 head, "
        f"dim 50, max_len {MAX_LEN}, batch {_BATCH.value}, {NEGATIVES} negatives; "
        f"synthetic data")
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  batches = [synthetic_batch(rng, _BATCH.value)
             for _ in range(_STEPS.value + _EAGER_STEPS.value)]

  jit_tr, eager_tr = new_trainer(), new_trainer()
  jit_state, eager_state = jit_tr.init_state, eager_tr.init_state

  t0 = time.perf_counter()
  jit_state, loss, _ = jit_tr.step(jit_state, batches[0], jax.random.fold_in(key, 0))
  jax.block_until_ready(loss)
  first = time.perf_counter() - t0

  jit_rates, eager_rates, new_compiles = [], [], 0
  eager_batches = batches[_STEPS.value:]
  per_round = max(1, (_STEPS.value - 1) // max(_EAGER_STEPS.value, 1))
  step = 1
  while step < _STEPS.value or eager_batches:
    for _ in range(per_round):
      if step >= _STEPS.value:
        break
      batch = batches[step]
      before = _backend_compiles[0]
      t0 = time.perf_counter()
      jit_state, loss, _ = jit_tr.step(jit_state, batch, jax.random.fold_in(key, step))
      jax.block_until_ready(loss)
      jit_rates.append(events_in(batch) / (time.perf_counter() - t0))
      new_compiles += _backend_compiles[0] - before
      step += 1
    if eager_batches:
      batch = eager_batches.pop(0)
      with jax.disable_jit():
        t0 = time.perf_counter()
        eager_state, loss, _ = eager_tr.step(eager_state, batch, jax.random.fold_in(key, 0))
        jax.block_until_ready(loss)
        eager_rates.append(events_in(batch) / (time.perf_counter() - t0))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"eager training loss is {float(loss)}")

  jit_rate, eager_rate = statistics.median(jit_rates), statistics.median(eager_rates)
  ratio = jit_rate / eager_rate
  compile_ok = jit_tr.compiles == 1 and new_compiles == 0
  speed_ok = ratio >= SPEEDUP_TARGET
  print(f"jitted: {len(jit_rates) + 1} steps, first step (compile) {first:.1f} s, then median "
        f"{jit_rate:,.0f} events/s")
  print(f"eager (jax.disable_jit): {len(eager_rates)} steps, median {eager_rate:,.0f} events/s")
  print(f"compilations: Trainer.compiles = {jit_tr.compiles} over {_STEPS.value} steps of "
        f"varying batches, backend compiles in the jitted steps after the first = {new_compiles} "
        f"{'ok' if compile_ok else 'MISSED'}")
  ok = compile_ok and speed_ok
  print(f"jit / eager throughput: {ratio:.1f}x (target >= {SPEEDUP_TARGET}x) "
        f"{'ok' if speed_ok else 'MISSED'}; compiled once: {'yes' if compile_ok else 'no'}: "
        f"{'PASS' if ok else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
