"""Shared pieces of the trained memory-efficient HSTU variants.

Two kinds of variants live in this package:

* **Cache variants** (GQA, MQA, MLA, LSH) store a :class:`~malloc_jax.cache.Cache` with one
  slot per event and reuse ``SequenceRecommender``'s ``prefill`` / ``extend`` / ``score``;
  only the layer's ``step`` and ``head_dims`` change. Every post-hoc compressor applies.
* **Block variants** (Linformer, Longformer, Activation Beacon, RWKV, gated linear
  attention) own their memory layout. They subclass :class:`BlockRecommender` and implement
  ``empty_memory(batch)`` and ``_block(memory, events, train_rng) -> (hidden, memory)``:
  the full forward pass is one block from the empty memory, ``prefill`` is ``extend`` of the
  empty memory, and ``encode`` is a block whose new memory is dropped. Their ``extend``
  returns ``signals=None`` (there is no per-event attention row to report).

Fixed-size memories (Linformer sums, RWKV and linear-attention states) are
:class:`FixedState` dataclasses: their leaves are exactly what is stored, an ``index`` field
holds ``length [B]`` (so ``compressors.nbytes`` / ``bytes_per_user`` work) and
``materialize()`` returns the state itself. They also expose a *Cache view* (``k``, ``v``,
``pos``, ``ts``, ``length``, ``contiguous=False``: the state packed into ``k [L, B, 1, 1, S]``
with empty ``v``, ``pos``, ``ts``), so that today's ``compressors.native()`` passes them
through unchanged, bytes included; the model reads such a view back with ``from_view``.
Other post-hoc compressors (eviction, quantization, low rank) do not apply to fixed states.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from malloc_jax.cache import Cache
from malloc_jax.models.base import Events, SequenceRecommender, dropout, request_time
from malloc_jax.models.hstu import HSTU


@struct.dataclass
class StateIndex:
  """Index of a fixed-size state: only the number of events folded into it.

  length [B] int32.
  """

  length: jax.Array


class FixedState:
  """Mixin of fixed-size per-user memories (flax.struct dataclasses with an ``index``).

  Subclasses declare ``index: StateIndex`` first and then their state arrays, each
  ``[L, B, ...]`` float. ``materialize()`` is the state itself.
  """

  shared_fields: ClassVar[tuple[str, ...]] = ()

  def materialize(self):
    return self

  def _state_fields(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self) if f.name != "index"]

  # --- Cache view, read by compressors.index_of / identity --------------------------------
  @property
  def contiguous(self) -> bool:
    return False

  @property
  def length(self) -> jax.Array:
    return self.index.length

  @property
  def k(self) -> jax.Array:
    """All state arrays flattened and concatenated: [L, B, 1, 1, S]."""
    parts = [getattr(self, n) for n in self._state_fields()]
    L, B = parts[0].shape[:2]
    flat = jnp.concatenate([p.reshape(L, B, -1) for p in parts], axis=-1)
    return flat[:, :, None, None, :]

  @property
  def v(self) -> jax.Array:  # [L, B, 1, 1, 0]
    x = getattr(self, self._state_fields()[0])
    return jnp.zeros(x.shape[:2] + (1, 1, 0), x.dtype)

  @property
  def pos(self) -> jax.Array:  # [L, B, 1, 0]
    x = getattr(self, self._state_fields()[0])
    return jnp.zeros(x.shape[:2] + (1, 0), jnp.int32)

  ts = pos

  @classmethod
  def from_view(cls, view: Cache, like):
    """Unpacks a Cache view (``k [L, B, 1, 1, S]``) into a state shaped like ``like``."""
    flat = view.k[:, :, 0, 0, :]
    out, start = {}, 0
    for name in like._state_fields():
      shape = getattr(like, name).shape
      size = 1
      for s in shape[2:]:
        size *= s
      out[name] = flat[..., start:start + size].reshape(shape)
      start += size
    return cls(index=StateIndex(length=view.length), **out)


def split_heads(t: jax.Array, heads: int, d: int) -> jax.Array:
  """[B, m, heads * d] -> [B, heads, m, d]."""
  B, m, _ = t.shape
  return t.reshape(B, m, heads, d).transpose(0, 2, 1, 3)


def merge_heads(o: jax.Array) -> jax.Array:
  """[B, H, m, d] -> [B, m, H * d]."""
  B, H, m, d = o.shape
  return o.transpose(0, 2, 1, 3).reshape(B, m, H * d)


def hstu_output(layer, x: jax.Array, u: jax.Array, o: jax.Array, rng) -> jax.Array:
  """HSTU's layer output x + Dropout(W_o·(U ⊙ LayerNorm(o))), o [B, H, m, Dv].

  The rng is split as in ``HSTULayer.step`` so the dropout masks agree with the native model.
  """
  y = layer.out(u * layer.ln_attn(merge_heads(o)))
  r1 = None if rng is None else jax.random.split(rng)[0]
  return x + dropout(y, layer.dropout_rate, r1)


def rope(x: jax.Array, pos: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of x [..., m, R] (R even) at positions pos [..., m].

  References: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
    2021.
  """
  R = x.shape[-1]
  if R == 0:
    return x
  half = R // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = jnp.maximum(pos, 0).astype(jnp.float32)[..., None] * freq  # [..., m, R/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def init_backbone(model, num_items, *, dim, max_len, dropout, temperature, heads, dqk, dv,
                  rngs: nnx.Rngs):
  """Sets HSTU's embeddings and hyperparameters on ``model`` (layers are the caller's)."""
  model.num_items, model.dim, model.temperature = num_items, dim, temperature
  model.max_len, model.dropout_rate = max_len, dropout
  model._kv = (heads, dqk or dim // heads, dv or dim // heads)
  init = nnx.initializers.normal(stddev=0.02)
  model.item_emb = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
  model.pos_emb = nnx.Embed(max_len, dim, embedding_init=init, rngs=rngs)
  model.rank_head = nnx.Linear(dim, 1, rngs=rngs)  # ranking head (see rank_logits)
  return model._kv


def block_inputs(model, start: jax.Array, events: Events, train_rng):
  """Embeds a block of new events; returns (x [B,m,d], q_pos, q_ts, q_valid, layer rngs)."""
  m = events.items.shape[1]
  q_valid = events.valid
  q_pos = jnp.where(q_valid, start[:, None] + jnp.arange(m, dtype=jnp.int32)[None], -1)
  q_ts = jnp.where(q_valid, events.ts, 0)
  rngs = [None] * (len(model.layers) + 1)
  if train_rng is not None:
    rngs = list(jax.random.split(train_rng, len(model.layers) + 1))
  x = model.embed(events.items, jnp.maximum(q_pos, 0), rngs[0])
  return x, q_pos, q_ts, q_valid, rngs[1:]


class BlockRecommender(HSTU):
  """HSTU-based recommender whose memory layout is its own (see module docstring).

  Subclasses implement ``empty_memory(batch)`` and ``_block(memory, events, train_rng)``.
  """

  def empty_memory(self, batch: int):
    raise NotImplementedError

  def _block(self, memory, events: Events, train_rng=None):
    raise NotImplementedError

  def _as_memory(self, memory):
    """Accepts the model's memory or a Cache view of a fixed state (after ``native()``)."""
    if isinstance(memory, Cache):
      like = self.empty_memory(memory.length.shape[0])
      if isinstance(like, FixedState):
        return type(like).from_view(memory, like)
    return memory

  def empty_cache(self, batch: int, capacity: int = 0):
    del capacity
    return self.empty_memory(batch)

  def __call__(self, events: Events, train_rng=None) -> jax.Array:
    """Full forward pass (causal). Returns hidden states [B, N, d]."""
    x, _ = self._block(self.empty_memory(events.items.shape[0]), events, train_rng)
    return x

  def prefill(self, events: Events, window: int = 8):
    """Encodes histories into the variant's memory. Returns (memory, None)."""
    return self.extend(self.empty_memory(events.items.shape[0]), events, window)

  def extend(self, memory, events: Events, window: int = 8):
    """Folds new events into the memory. Returns (memory, None): no attention signals."""
    del window
    _, memory = self._block(self._as_memory(memory), events)
    return memory, None

  def encode(self, memory, events: Events) -> jax.Array:
    """Hidden states [B, m, d] of new events read against the memory (memory unchanged)."""
    x, _ = self._block(self._as_memory(memory), events)
    return x

  def rank(self, memory, request: Events, candidates: jax.Array,
           candidate_ts: jax.Array | None = None, *, return_attn: bool = False,
           train_rng=None):
    """Target-aware ranking from the variant's own memory (see ``SequenceRecommender.rank``).

    The request is folded into the memory (``extend``); then every candidate is a one-event
    block read against that memory, vmapped over the C candidates, so a candidate sees the
    memory, the request and itself, never the other candidates, and its logit equals the
    full forward pass over history + request + that candidate alone. The memory is shared by
    the C reads (a fixed state, or Longformer's / Beacon's bounded slots), so vmap replaces
    the block mask of the per-event caches.

    Returns:
      logits [B, C]. ``return_attn`` is not supported (no per-slot attention rows).

    References: Zhai et al., "Actions Speak Louder than Words", ICML 2024 (M-FALCON).
    """
    if return_attn:
      raise ValueError(f"{type(self).__name__}.rank: return_attn=True needs per-slot "
                       "attention; this variant's memory has none")
    B, C = candidates.shape
    if candidate_ts is None:
      candidate_ts = request_time(request)
    r1, r2 = (None, None) if train_rng is None else jax.random.split(train_rng)
    _, memory = self._block(self._as_memory(memory), request, r1)
    one = jnp.ones((B,), jnp.int32)

    def read(items):  # [B] -> [B, d]
      ev = Events(items[:, None], candidate_ts[:, None].astype(request.ts.dtype), one)
      x, _ = self._block(memory, ev, r2)
      return x[:, 0]

    h = jax.vmap(read, in_axes=1, out_axes=1)(candidates.astype(request.items.dtype))
    return self.rank_logits(h, candidates)  # [B, C]


__all__ = ["BlockRecommender", "FixedState", "SequenceRecommender", "StateIndex",
           "block_inputs", "hstu_output", "init_backbone", "merge_heads", "rope",
           "split_heads"]
