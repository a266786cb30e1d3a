"""Streaming protocol: the history arrives in r requests and the memory is kept between them.

One-shot serving (``malloc_jax.serving``) prefills the whole history and compresses once.
In production the history arrives over time: after each request the memory is extended with
the new events (``model.extend(memory.materialize(), chunk)``) and re-compressed, threading
the compressor's state, so compression error accumulates as it would in a real system. The
held-out target(s) are scored at the end, exactly as in the one-shot protocol.

Chunks: user b's prefix of n_b events (the history minus the request, see
``serving.split_request``) is cut into r consecutive pieces, piece j holding events
floor(j n_b / r) .. floor((j + 1) n_b / r) - 1, so every user sees r requests whatever its
length (short users may get empty pieces). Pieces are right-padded to the static width
w = ceil(N / r).

Static shapes: for Cache models the dense memory is kept at a fixed capacity C = N (the
history window) between steps, so the r steps run as one ``jax.lax.scan`` that compiles once.
``extend`` returns capacity C + w; since occupied slots are a prefix and a user never holds
more than the n_b <= N events it has seen, the last w slots are empty and are dropped before
compressing (signals likewise), which changes nothing; the materialized memory is padded or
trimmed back to C the same way. Eviction compressors bring the capacity to their budget and
the native compressor keeps every event, which is correct. The final memory therefore has the
capacity of the one-shot memory (bytes are comparable). Models with their own memory layout
(``BlockRecommender`` variants: fixed states, Longformer, Beacon) run the r steps unrolled.

Invariants (tested): with the native compressor streaming equals one-shot to float tolerance
(``extend`` from a native cache equals the full forward pass); with r = 1 it equals one-shot
for every compressor.

The pipeline that runs it over users (batches, sharding, the non-finite guard) is
``malloc_jax.serving.stream_stage``; ``evaluate.evaluate_streaming`` reports its metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from malloc_jax import compressors as comp_lib
from malloc_jax.cache import Cache, Signals, pad_capacity
from malloc_jax.models.base import Events


def split_chunks(prefix: Events, requests: int) -> Events:
  """Cuts each user's events into ``requests`` consecutive pieces.

  Args:
    prefix: Events [B, N] (right-padded, length [B]).
    requests: r >= 1.

  Returns:
    Events with items, ts [r, B, w] and length [r, B], w = ceil(N / r); piece j of user b
    holds events floor(j n_b / r) .. floor((j + 1) n_b / r) - 1.
  """
  B, N = prefix.items.shape
  r = int(requests)
  if r < 1:
    raise ValueError(f"split_chunks: requests={requests} must be >= 1")
  w = max(1, -(-N // r))
  j = jnp.arange(r + 1, dtype=jnp.int32)[:, None]  # [r + 1, 1]
  bounds = (j * prefix.length[None, :]) // r  # [r + 1, B]
  start, stop = bounds[:-1], bounds[1:]  # [r, B]
  col = jnp.arange(w, dtype=jnp.int32)[None, None, :]  # [1, 1, w]
  src = start[..., None] + col  # [r, B, w]
  valid = src < stop[..., None]
  src = jnp.clip(src, 0, N - 1)
  take = lambda x: jnp.where(valid, jnp.take_along_axis(
      jnp.broadcast_to(x[None], (r, B, N)), src, axis=2), 0)
  return Events(take(prefix.items), take(prefix.ts), (stop - start).astype(jnp.int32))


def _fit(cache: Cache, capacity: int) -> Cache:
  """Pads or trims the slot axis of a cache to ``capacity`` (trimmed slots must be empty)."""
  if cache.capacity < capacity:
    return pad_capacity(cache, capacity)
  if cache.capacity == capacity:
    return cache
  cut = lambda x: x[:, :, :, :capacity]
  return cache.replace(k=cut(cache.k), v=cut(cache.v), pos=cut(cache.pos), ts=cut(cache.ts))


def _fit_signals(signals: Signals, capacity: int) -> Signals:
  return signals.replace(acc_attn=signals.acc_attn[..., :capacity],
                         window_attn=signals.window_attn[..., :capacity])


def stream_memory(model, prefix: Events, compressor: comp_lib.Compressor, requests: int,
                  window: int = 8):
  """Builds the memory of ``prefix`` request by request (pure; jit it with the model).

  Args:
    model: backbone. prefix: Events [B, N], the events before the scored request.
    compressor: applied after every request, its state threaded from one to the next.
    requests: r, the number of requests the prefix arrives in.
    window: attention rows of the last ``window`` queries of each request (SnapKV signals).

  Returns:
    (memory after the last request, compressor state).
  """
  chunks = split_chunks(prefix, requests)
  B, N = prefix.items.shape
  piece = lambda j: Events(chunks.items[j], chunks.ts[j], chunks.length[j])
  if hasattr(model, "empty_memory"):  # a model with its own memory layout: unrolled steps
    memory, state = None, None
    for j in range(requests):
      cache = model.empty_memory(B) if memory is None else memory.materialize()
      cache, signals = model.extend(cache, piece(j), window)
      if state is None:
        state = compressor.init(cache)
      memory, state = compressor.compress(cache, state, signals)
    return memory, state

  def step(dense, state, chunk):
    cache, signals = model.extend(dense, chunk, window)  # capacity N + w
    cache, signals = _fit(cache, N), _fit_signals(signals, N)  # the last w slots are empty
    return compressor.compress(cache, state, signals)

  def body(carry, chunk):
    memory, state = step(*carry, Events(*chunk))
    return (_fit(memory.materialize(), N), state), None

  dense = model.empty_cache(B, N)
  state = compressor.init(dense)
  if requests > 1:
    # The carried dense view must keep one static layout flag: that of a materialized memory.
    out = jax.eval_shape(lambda d, s: body((d, s), (chunks.items[0], chunks.ts[0],
                                                    chunks.length[0]))[0][0], dense, state)
    dense = dense.replace(contiguous=out.contiguous)
    rest = (chunks.items[:-1], chunks.ts[:-1], chunks.length[:-1])
    (dense, state), _ = jax.lax.scan(body, (dense, state), rest)
  return step(dense, state, piece(requests - 1))
