"""Token-merge variants, learned: Longformer-style window + global tokens, Activation Beacon.

Both store a :class:`~malloc_jax.cache.Cache` with ``contiguous=False`` whose slots are laid
out by the model (the native compressor and quantizers apply; eviction compressors would
break the layout):

* Longformer (``HSTULongformer``): capacity ``num_global + window``. Slots
  ``[0, num_global)`` hold the global tokens' key and value (``pos = -1``: not events);
  slot ``num_global + j`` holds event ``length - window + j`` (``pos = -1`` while the
  history is shorter). Bytes per user, whatever the history length:
  ``L * H * (G + w) * ((Dqk + Dv) * 4 + 8) + 4`` (float32 keys and values, int32 pos and ts
  per slot, int32 length).
* Activation Beacon (``HSTUBeacon``): one slot per beacon of every complete chunk plus the
  raw events of the current incomplete chunk (at most ``chunk - 1``), in position order, then
  empty padding. A beacon slot has ``pos`` = the position of its chunk's last event and that
  event's ``ts``. About ``beacons / chunk`` of the native slots; per slot
  ``L * H * ((Dqk + Dv) * 4 + 8)`` bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from malloc_jax import flops
from malloc_jax.cache import Cache
from malloc_jax.models.base import Events, attention_mask, concat_keys, dropout
from malloc_jax.models.hstu import HSTULayer
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants.common import (
  BlockRecommender,
  block_inputs,
  hstu_output,
  init_backbone,
  split_heads,
)


def _hstu_uvqk(layer: HSTULayer, x: jax.Array):
  """HSTU projections of x [B, m, d]: u [B, m, H·dv]; v, q, k [B, H, m, .]."""
  H, dqk, dv = layer.heads, layer.dqk, layer.dv
  h = nnx.silu(layer.uvqk(layer.ln(x)))
  u, v, q, k = jnp.split(h, [H * dv, 2 * H * dv, 2 * H * dv + H * dqk], axis=-1)
  return u, split_heads(v, H, dv), split_heads(q, H, dqk), split_heads(k, H, dqk)


def _stack_cache(ks, vs, pos, ts, length) -> Cache:
  """Cache from per-layer k, v [B, H, T, .] lists and per-layer pos, ts [B, H, T] lists."""
  return Cache(k=jnp.stack(ks), v=jnp.stack(vs), pos=jnp.stack(pos), ts=jnp.stack(ts),
               length=length, contiguous=False)


# ------------------------------------------------------------------------------------------
# Longformer


class LongformerLayer(HSTULayer):
  """HSTU layer with a causal sliding window plus learned global summary tokens.

  Query t attends directly (HSTU SiLU attention with rab) to events at positions
  [t - window, t]. Every event that has left the window (position < t - window) is folded
  into ``num_global`` global tokens: token j has a learned query q0_j and initial key k0_j,
  and after the events i it summarizes, K_j = k0_j + Σ_i α_ij k_i, V_j = Σ_i α_ij v_i with
  α_ij = SiLU(q0_j·k_i + b_j) / N. Query t reads token j with weight
  SiLU(q_t·K_j(t) + c_j) / N. Since α does not depend on the query, K_j, V_j are running
  sums: the memory holds them plus the last ``window`` events' K, V.

  Deviations from Longformer: causal, appendable global tokens (the paper's global tokens
  are input positions with symmetric full attention, which cannot be served from a bounded
  memory); HSTU's pointwise attention instead of softmax; training computes the window and
  global masks densely (O(N²)), serving reads O(window + num_global) slots.

  References: Beltagy et al., "Longformer: The Long-Document Transformer", 2020.
  """

  def __init__(self, dim, heads, dqk, dv, max_len, num_time_buckets, dropout_rate, window,
               num_global, *, rngs):
    super().__init__(dim, heads, dqk, dv, max_len, num_time_buckets, dropout_rate, rngs=rngs)
    self.window, self.num_global = window, num_global
    init = nnx.initializers.normal(stddev=dqk ** -0.5)
    self.global_q = nnx.Param(init(rngs.params(), (heads, num_global, dqk)))
    self.global_k = nnx.Param(init(rngs.params(), (heads, num_global, dqk)))
    self.global_in_bias = nnx.Param(jnp.zeros((heads, num_global), jnp.float32))
    self.global_out_bias = nnx.Param(jnp.zeros((heads, num_global), jnp.float32))

  def step(self, x, q_pos, q_ts, q_valid, mem_k, mem_v, mem_pos, mem_ts, count, rng=None):
    """One layer over m new events against [global tokens | window] slots.

    Args:
      x: [B, m, d]; q_pos, q_ts, q_valid: [B, m]; mem_k [B, H, G + w, Dqk], mem_v
        [B, H, G + w, Dv], mem_pos, mem_ts [B, H, G + w]: this layer's memory slots;
      count: [B] number of valid new events; rng: dropout key or None.

    Returns:
      (y [B, m, d], k [B, H, G + w, Dqk], v, pos, ts [B, H, G + w]): the updated slots.
    """
    G, W, N = self.num_global, self.window, self.max_len
    u, v, q, k = _hstu_uvqk(self, x)
    gk, gv = mem_k[:, :, :G], mem_v[:, :, :G]  # [B, H, G, .]
    kk, vv, kpos, kts = concat_keys(mem_k[:, :, G:], mem_v[:, :, G:], mem_pos[:, :, G:],
                                    mem_ts[:, :, G:], k, v, q_pos, q_ts)  # [B, H, w+m, .]
    kvalid = kpos >= 0
    rel = q_pos[:, None, :, None] - kpos[:, :, None, :]  # [B, H, m, w+m]
    direct = attention_mask(q_pos, q_valid, kpos) & (rel <= W)
    old = kvalid[:, :, None, :] & (rel > W) & q_valid[:, None, :, None]  # in global tokens
    alpha = nnx.silu(jnp.einsum("bhtd,hgd->bhtg", kk, self.global_q[...]) +
                     self.global_in_bias[...][None, :, None, :]) / N
    alpha = alpha * kvalid[..., None]  # [B, H, w+m, G]
    qk = jnp.einsum("bhmd,bhtd->bhmt", q, kk)
    a = jnp.where(direct, nnx.silu(qk + self.bias(q_pos, q_ts, kpos, kts)), 0.0) / N
    s_g = (jnp.einsum("bhmd,bhgd->bhmg", q, gk) +
           jnp.einsum("bhmt,bhtg->bhmg", jnp.where(old, qk, 0.0), alpha) +
           self.global_out_bias[...][None, :, None, :])  # q_t · K_j(t) + c_j
    a_g = nnx.silu(s_g) / N * q_valid[:, None, :, None]  # [B, H, m, G]
    w_tok = a + jnp.where(old, jnp.einsum("bhmg,bhtg->bhmt", a_g, alpha), 0.0)
    o = jnp.einsum("bhmt,bhtd->bhmd", w_tok, vv) + jnp.einsum("bhmg,bhgd->bhmd", a_g, gv)
    y = hstu_output(self, x, u, o, rng)
    # Slot i of [window | new] holds position length - w + i, so the first ``count`` slots
    # leave the window (into the global tokens) and slots [count, count + w) stay.
    leave = (jnp.arange(kk.shape[2])[None] < count[:, None])[:, None, :, None]  # [B,1,w+m,1]
    gk = gk + jnp.einsum("bhtg,bhtd->bhgd", alpha * leave, kk)
    gv = gv + jnp.einsum("bhtg,bhtd->bhgd", alpha * leave, vv)
    keep = jax.vmap(lambda a, c: jax.lax.dynamic_slice_in_dim(a, c, W, axis=1))
    B, H = kpos.shape[:2]
    gpos = jnp.full((B, H, G), -1, jnp.int32)
    return (y, jnp.concatenate([gk, keep(kk, count)], axis=2),
            jnp.concatenate([gv, keep(vv, count)], axis=2),
            jnp.concatenate([gpos, keep(kpos, count)], axis=2),
            jnp.concatenate([jnp.zeros_like(gpos), keep(kts, count)], axis=2))


class HSTULongformer(BlockRecommender):
  """HSTU with a sliding window of ``window`` events plus ``num_global`` global tokens.

  The memory is a Cache of constant capacity ``num_global + window`` (see module docstring).

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    window: w, number of recent events attended directly (and stored).
    num_global: G, number of global summary tokens per layer and head.

  References: Beltagy et al., "Longformer: The Long-Document Transformer", 2020.
  """

  def __init__(self, num_items, *, dim=50, heads=1, window=16, num_global=4, dqk=None, dv=None,
               num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.window, self.num_global = window, num_global
    self.layers = nnx.List([
        LongformerLayer(dim, heads, dqk, dv, max_len, num_time_buckets, dropout, window,
                        num_global, rngs=rngs) for _ in range(num_layers)])

  def empty_memory(self, batch: int) -> Cache:
    H, dqk, dv = self._kv
    G, W = self.num_global, self.window
    ks = [jnp.concatenate([jnp.broadcast_to(layer.global_k[...][None], (batch, H, G, dqk)),
                           jnp.zeros((batch, H, W, dqk), jnp.float32)], axis=2)
          for layer in self.layers]
    vs = [jnp.zeros((batch, H, G + W, dv), jnp.float32)] * len(self.layers)
    pos = [jnp.full((batch, H, G + W), -1, jnp.int32)] * len(self.layers)
    ts = [jnp.zeros((batch, H, G + W), jnp.int32)] * len(self.layers)
    return _stack_cache(ks, vs, pos, ts, jnp.zeros((batch,), jnp.int32))

  def _block(self, memory: Cache, events: Events, train_rng=None):
    x, q_pos, q_ts, q_valid, rngs = block_inputs(self, memory.length, events, train_rng)
    out = ([], [], [], [])
    for i, layer in enumerate(self.layers):
      x, *slots = layer.step(x, q_pos, q_ts, q_valid, memory.k[i], memory.v[i], memory.pos[i],
                             memory.ts[i], events.length, rngs[i])
      for lst, s in zip(out, slots):
        lst.append(s)
    return self.output(x), _stack_cache(*out, memory.length + events.length)


# ------------------------------------------------------------------------------------------
# Activation Beacon


class BeaconLayer(HSTULayer):
  """HSTU layer over events and beacon tokens with a mask given by the model.

  References: Zhang et al., "Long Context Compression with Activation Beacon", 2024.
  """

  def step(self, x, q_pos, q_ts, ck, cv, cpos, cts, mask, rng=None):
    """One layer over Q tokens (events and beacons) against the cached slots.

    Args:
      x: [B, Q, d]; q_pos, q_ts: [B, Q] (-1 / 0 for padding); ck [B, H, T, Dqk], cv, cpos,
        cts: the cached slots; mask: [B, Q, T + Q] bool, who may read whom;
      rng: dropout key or None.

    Returns:
      (y [B, Q, d], k [B, H, Q, Dqk], v [B, H, Q, Dv]).
    """
    u, v, q, k = _hstu_uvqk(self, x)
    kk, vv, kpos, kts = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) + self.bias(q_pos, q_ts, kpos, kts)
    a = jnp.where(mask[:, None], nnx.silu(s), 0.0) / self.max_len
    o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
    return hstu_output(self, x, u, o, rng), k, v


class HSTUBeacon(BlockRecommender):
  """HSTU with Activation Beacon: each chunk of events is condensed into beacon tokens.

  Events are split into chunks of ``chunk`` consecutive positions. When a chunk completes,
  ``beacons`` beacon tokens (learned embeddings + the position embedding of the chunk's last
  event) are appended after it and run through every layer; beacon j of chunk c reads the
  beacons of earlier chunks, all events of chunk c and beacons 0..j of chunk c. An event of
  chunk c reads the beacons of earlier chunks and the earlier events of chunk c only. After
  a chunk completes, only its beacons' K, V are kept, so the memory holds
  ``beacons · complete chunks + (length mod chunk)`` slots. Beacons carry the position and
  timestamp of their chunk's last event, so HSTU's relative biases apply to them.

  Deviations from Activation Beacon: beacons share the layer's projections (the paper trains
  separate beacon projections); a fixed chunk size and beacon count (no sampled ratios);
  trained from scratch with the recommender rather than added to a frozen model.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    chunk: events per chunk. beacons: beacon tokens per chunk.

  References: Zhang et al., "Long Context Compression with Activation Beacon", 2024
    (arXiv 2401.03462).
  """

  def __init__(self, num_items, *, dim=50, heads=1, chunk=16, beacons=2, dqk=None, dv=None,
               num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.chunk, self.beacons = chunk, beacons
    self.beacon_emb = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (beacons, dim)))
    self.layers = nnx.List([
        BeaconLayer(dim, heads, dqk, dv, max_len, num_time_buckets, dropout, rngs=rngs)
        for _ in range(num_layers)])

  def empty_memory(self, batch: int) -> Cache:
    H, dqk, dv = self._kv
    L = len(self.layers)
    return Cache(k=jnp.zeros((L, batch, H, 0, dqk)), v=jnp.zeros((L, batch, H, 0, dv)),
                 pos=jnp.zeros((L, batch, H, 0), jnp.int32),
                 ts=jnp.zeros((L, batch, H, 0), jnp.int32),
                 length=jnp.zeros((batch,), jnp.int32), contiguous=False)

  def _block(self, memory: Cache, events: Events, train_rng=None):
    C, nbeac = self.chunk, self.beacons
    B, m = events.items.shape
    T = memory.capacity
    n = memory.length  # [B]
    groups = -(-m // C)  # at most this many chunks complete within the block
    r_emb, r_layers = (None, None) if train_rng is None else jax.random.split(train_rng)
    x, q_pos, q_ts, q_valid, rngs = block_inputs(self, n, events, r_layers)
    # Beacon groups: group g condenses chunk n // C + g if it completes within the block.
    anchor = (n[:, None] // C + jnp.arange(groups)[None] + 1) * C - 1  # [B, groups]
    g_valid = anchor < (n + events.length)[:, None]
    a_ts = jnp.take_along_axis(events.ts, jnp.clip(anchor - n[:, None], 0, m - 1), axis=1)
    b_pos = jnp.repeat(jnp.where(g_valid, anchor, -1), nbeac, axis=1)  # [B, groups·beacons]
    b_ts = jnp.repeat(jnp.where(g_valid, a_ts, 0), nbeac, axis=1)
    b_idx = jnp.tile(jnp.arange(nbeac), groups)[None]  # [1, groups·beacons]
    xb = self.beacon_emb[...][b_idx] * (self.dim ** 0.5) + self.pos_emb(
        jnp.minimum(jnp.maximum(b_pos, 0), self.max_len - 1))
    xb = dropout(xb, self.dropout_rate, r_emb)
    x = jnp.concatenate([x, xb], axis=1)  # [B, Q = m + groups·beacons, d]
    t_pos = jnp.concatenate([q_pos, b_pos], axis=1)  # [B, Q]
    t_ts = jnp.concatenate([q_ts, b_ts], axis=1)
    t_beacon = jnp.concatenate([jnp.zeros((B, m), bool), jnp.ones(b_pos.shape, bool)], 1)
    t_idx = jnp.concatenate([jnp.zeros((B, m), jnp.int32),
                             jnp.broadcast_to(b_idx, b_pos.shape)], axis=1)
    # Keys: cached slots then the block's tokens. Cached slots before the current chunk's
    # start are beacons (raw events of complete chunks are never kept).
    c_pos = memory.pos[0, :, 0]  # [B, T]
    c_beacon = (c_pos >= 0) & (c_pos < ((n // C) * C)[:, None])
    k_pos = jnp.concatenate([c_pos, t_pos], axis=1)  # [B, T + Q]
    k_beacon = jnp.concatenate([c_beacon, t_beacon], axis=1)
    k_idx = jnp.concatenate([jnp.zeros((B, T), jnp.int32), t_idx], axis=1)
    qc, kc = (t_pos // C)[:, :, None], (k_pos // C)[:, None, :]  # chunk ids
    kb = k_beacon[:, None, :]
    earlier_beacon = kb & (kc < qc)
    same_chunk_event = ~kb & (kc == qc)
    event_rule = earlier_beacon | (same_chunk_event & (k_pos[:, None, :] <= t_pos[:, :, None]))
    beacon_rule = (earlier_beacon | same_chunk_event |
                   (kb & (kc == qc) & (k_idx[:, None, :] <= t_idx[:, :, None])))
    mask = jnp.where(t_beacon[:, :, None], beacon_rule, event_rule)
    mask = mask & (k_pos >= 0)[:, None, :] & (t_pos >= 0)[:, :, None]  # [B, Q, T + Q]
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      x, k, v = layer.step(x, t_pos, t_ts, memory.k[i], memory.v[i], memory.pos[i],
                           memory.ts[i], mask, rngs[i])
      ks.append(jnp.concatenate([memory.k[i], k], axis=2))  # [B, H, T + Q, Dqk]
      vs.append(jnp.concatenate([memory.v[i], v], axis=2))
    # New memory: all beacons, plus raw events of the (new) current chunk, in position order.
    new_len = n + events.length
    keep = (k_pos >= 0) & (k_beacon | (k_pos >= ((new_len // C) * C)[:, None]))
    cap = T + groups * nbeac + min(m, C - 1)
    order = jnp.argsort(jnp.where(keep, k_pos, jnp.iinfo(jnp.int32).max), axis=1,
                        stable=True)[:, :cap]  # [B, cap]
    kept = jnp.take_along_axis(keep, order, axis=1)
    k_ts = jnp.concatenate([memory.ts[0, :, 0], t_ts], axis=1)
    H = memory.k.shape[2]
    pos = jnp.where(kept, jnp.take_along_axis(k_pos, order, axis=1), -1)
    ts = jnp.where(kept, jnp.take_along_axis(k_ts, order, axis=1), 0)
    pos = jnp.broadcast_to(pos[:, None], (B, H, cap))
    ts = jnp.broadcast_to(ts[:, None], (B, H, cap))
    idx = order[:, None, :, None]
    gather = lambda a: jnp.where(kept[:, None, :, None],
                                 jnp.take_along_axis(a, idx, axis=2), 0.0)
    L = len(self.layers)
    new = _stack_cache([gather(k) for k in ks], [gather(v) for v in vs], [pos] * L, [ts] * L,
                       new_len)
    return self.output(x[:, :m]), new


__all__ = ["BeaconLayer", "HSTUBeacon", "HSTULongformer", "LongformerLayer"]


SPECS = (
    VariantSpec(name="hstu_longformer", model=HSTULongformer, granularity="token",
                flops=flops.longformer_flops, test_options={"window": 4, "num_global": 2},
                reference="Beltagy et al., Longformer: The Long-Document Transformer, 2020"),
    VariantSpec(name="hstu_beacon", model=HSTUBeacon, granularity="token",
                flops=flops.beacon_flops, test_options={"chunk": 4, "beacons": 2},
                reference="Zhang et al., Long Context Compression with Activation Beacon, "
                "2024"),
)
