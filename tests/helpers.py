"""Small shared builders for tests (random models and histories)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from malloc_jax.models import VARIANT_SPECS, Events, make_model

# Every trained variant with small, valid options (dim 16 or more, max_len 32 or more), from
# the variants' specs: shared by the variant and cost tests, so a new variant joins both.
VARIANT_OPTIONS = {name: dict(spec.test_options) for name, spec in VARIANT_SPECS.items()}


def random_model(name: str, num_items: int = 40, *, dim: int = 16, heads: int = 2,
                 num_layers: int = 2, max_len: int = 32, seed: int = 0, **options):
  """A backbone with dropout off and its position/time biases randomized (non-zero);
  ``options`` go to the model (a variant's own arguments, e.g. CLA's ``share``)."""
  model = make_model(name, num_items, dim=dim, heads=heads, num_layers=num_layers,
                     max_len=max_len, dropout=0.0, seed=seed, **options)
  rng = np.random.default_rng(seed + 1)
  for layer in model.layers:
    for attr in ("rab_pos", "rab_time"):
      if hasattr(layer, attr):
        p = getattr(layer, attr)
        p[...] = jnp.asarray(rng.normal(0, 0.5, p[...].shape), jnp.float32)
  return model


def random_events(batch: int, n: int, lengths, num_items: int = 40, seed: int = 0) -> Events:
  """Right-padded random histories with increasing timestamps and the given lengths."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  items = rng.integers(1, num_items + 1, (batch, n)).astype(np.int32)
  ts = np.cumsum(rng.integers(0, 5000, (batch, n)), axis=1).astype(np.int32)
  valid = np.arange(n)[None] < lengths[:, None]
  return Events(jnp.asarray(np.where(valid, items, 0)), jnp.asarray(np.where(valid, ts, 0)),
                jnp.asarray(lengths))


def take(events: Events, start, stop) -> Events:
  """Per-user slice [start_b, stop_b) of each history, right-padded to a static width."""
  start = np.asarray(start)
  stop = np.asarray(stop)
  width = int(max(1, (stop - start).max()))
  items = np.asarray(events.items)
  ts = np.asarray(events.ts)
  B = items.shape[0]
  out_i = np.zeros((B, width), np.int32)
  out_t = np.zeros((B, width), np.int32)
  for b in range(B):
    n = stop[b] - start[b]
    out_i[b, :n] = items[b, start[b]:stop[b]]
    out_t[b, :n] = ts[b, start[b]:stop[b]]
  return Events(jnp.asarray(out_i), jnp.asarray(out_t), jnp.asarray(stop - start, np.int32))


jit_forward = jax.jit(lambda m, e: m(e))
jit_prefill = jax.jit(lambda m, e: m.prefill(e, 4))
jit_extend = jax.jit(lambda m, c, e: m.extend(c, e, 4))
jit_encode = jax.jit(lambda m, c, e: m.encode(c, e))
jit_score = jax.jit(lambda m, c, e: m.score(c, e))


@functools.cache
def jitted_compress(name: str, params: tuple):
  """(compressor, jax.jit(compressor.compress)) of ``make_compressor(name, **dict(params))``,
  built once per setting, so the hypothesis examples of one setting share one compile (a
  new compressor per example is a new function to trace and compile)."""
  from malloc_jax.compressors import make_compressor  # noqa: PLC0415

  comp = make_compressor(name, **dict(params))
  return comp, jax.jit(comp.compress)
