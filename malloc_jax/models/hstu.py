"""HSTU: Hierarchical Sequential Transduction Units.

References: Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential
  Transducers for Generative Recommendations", ICML 2024.

Per layer: x̂ = LayerNorm(x); U, V, Q, K = SiLU(x̂·W); A = SiLU(Q·Kᵀ + rab) / N (causal, no
softmax); y = x + W_o·(U ⊙ LayerNorm(A·V)). rab is a learned relative-position bias plus a
bucketed time-gap bias, bucket = floor(ln(max(|Δt|, 1)) / 0.301), clamped. N is a static
normalizer (the configured maximum length), so scores do not depend on how many events a
cache happens to hold. The time gap of a query and a key is ts(query event) - ts(key event).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from malloc_jax import flops, reads
from malloc_jax.models.base import (
  SequenceRecommender,
  attention_mask,
  concat_keys,
  dropout,
  select_slots,
)
from malloc_jax.models.spec import VariantSpec


def time_bucket(dt: jax.Array, num_buckets: int) -> jax.Array:
  """floor(ln(max(|dt|, 1)) / 0.301), clamped to [0, num_buckets - 1]."""
  x = jnp.maximum(jnp.abs(dt), 1).astype(jnp.float32)
  return jnp.clip(jnp.floor(jnp.log(x) / 0.301), 0, num_buckets - 1).astype(jnp.int32)


def rab_index(q_pos, q_ts, kpos, kts, max_len: int, num_buckets: int):
  """Indices of HSTU's relative attention bias of queries against key slots.

  Args:
    q_pos, q_ts [B, m] int32; kpos, kts [B, Hk, T] int32 (Hk = 1 when every head shares the
      slots' index). max_len: position table size; num_buckets: time-bucket table size.

  Returns:
    (rel, bucket) int32 [B, Hk, m, T]: clip(q_pos - kpos, 0, max_len - 1) and
    time_bucket(q_ts - kts).

  References: Zhai et al., HSTU (ICML 2024), relative attention bias (rab).
  """
  rel = jnp.clip(q_pos[:, None, :, None] - kpos[:, :, None, :], 0, max_len - 1)
  return rel, time_bucket(q_ts[:, None, :, None] - kts[:, :, None, :], num_buckets)


class HSTULayer(nnx.Module):
  """One HSTU layer. Cached per event: K [H, Dqk] and V [H, Dv] (after SiLU)."""

  def __init__(self, dim, heads, dqk, dv, max_len, num_time_buckets, dropout_rate, *, rngs):
    self.heads, self.dqk, self.dv = heads, dqk, dv
    self.max_len, self.num_time_buckets = max_len, num_time_buckets
    self.dropout_rate = dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uvqk = nnx.Linear(dim, heads * (2 * dv + 2 * dqk), rngs=rngs)
    self.rab_pos = nnx.Param(jnp.zeros((heads, max_len), jnp.float32))
    self.rab_time = nnx.Param(jnp.zeros((heads, num_time_buckets), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def bias(self, q_pos, q_ts, kpos, kts):
    """rab [B, H, m, T]: relative position plus time-gap bias.

    kpos, kts [B, H, T], or [B, 1, T] when every head shares the slots' index (a DenseIndex
    memory read by malloc_jax.reads): the bucket indices are then computed once for all
    heads. A cache's [B, H, T] index is bucketed per head: a runtime check that its heads
    agree (the native cache of a prefilled history) costs more on CPU than it saves, as the
    shared branch's bias is materialized instead of fused into the scores (BENCHMARKS.md).
    """
    return self.rab(*self.rab_index(q_pos, q_ts, kpos, kts))

  def rab_index(self, q_pos, q_ts, kpos, kts):
    """See :func:`rab_index` (this layer's table sizes)."""
    return rab_index(q_pos, q_ts, kpos, kts, self.max_len, self.num_time_buckets)

  def rab(self, rel, bucket):
    """rab [B, H, m, T] of the indices (rel, bucket) [B, H or 1, m, T] of :func:`rab_index`.

    Two gathers from the flattened [H · max_len] and [H · buckets] tables with one index
    component each (the indices are in range by construction, so no normalization).
    """
    H = self.heads
    h = jnp.arange(H, dtype=jnp.int32)[None, :, None, None]
    pos = self.rab_pos[...].reshape(-1).at[h * self.max_len + rel].get(
        mode="promise_in_bounds")
    tim = self.rab_time[...].reshape(-1).at[h * self.num_time_buckets + bucket].get(
        mode="promise_in_bounds")
    return pos + tim

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None,
           rows: int | None = None, slot_select=None):
    """One layer over m new tokens against the cache (see ``models.base``).

    ``rows`` (static int, materialized cache only): only the last ``rows`` tokens are
    queries; every token still contributes its key and value. Returns y [B, rows, d] and
    attn [B, H, rows, T + m] (k, v of all m tokens), equal to the last ``rows`` rows of the
    full step: a top layer whose other outputs are discarded (ranking candidates,
    ``train.ranking_logits``) skips the history's m x m attention. ``slot_select`` (or
    None): the cached slots each query may read (``models.base.select_slots``).
    """
    B, m, _ = x.shape
    H, dqk, dv = self.heads, self.dqk, self.dv
    h = nnx.silu(self.uvqk(self.ln(x)))
    u, v, q, k = jnp.split(h, [H * dv, 2 * H * dv, 2 * H * dv + H * dqk], axis=-1)
    heads = lambda t, d: t.reshape(B, t.shape[1], H, d).transpose(0, 2, 1, 3)  # [B, H, m, d]
    q, k, v = heads(q, dqk), heads(k, dqk), heads(v, dv)
    if reads.is_view(ck):
      if isolated is not None or rows is not None:
        raise ValueError("a candidate block mask needs the materialized memory")  # compressed memory: memory part + new part, summed exactly
      attn = reads.Attention("pointwise", norm=self.max_len, bias=self.bias)
      o, a = reads.attend_memory(attn, ck, q, k, v, q_pos, q_ts, q_valid), None
    else:
      kk, vv, kpos, kts = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
      mask = attention_mask(q_pos, q_valid, kpos, isolated)
      if rows is not None:  # queries: the last `rows` tokens only
        sl = slice(m - rows, m)
        x, u, q, q_pos, q_ts, mask = x[:, sl], u[:, sl], q[:, :, sl], q_pos[:, sl], q_ts[:, sl], \
            mask[:, :, sl]
        m = rows
      rab = self.bias(q_pos, q_ts, kpos, kts)  # [B, H, m, T + m]
      # A per-query slot selection sees the bias of the cached slots (Quest bounds the whole
      # pre-activation score q.k + rab, see quest_pages.quest_slot_select).
      mask = select_slots(mask, q, slot_select, bias=rab[..., :ck.shape[2]])
      s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) + rab
      a = jnp.where(mask, nnx.silu(s), 0.0) / self.max_len  # [B, H, m, T+m]
      o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
      a = jnp.abs(a)
    o = o.transpose(0, 2, 1, 3).reshape(B, m, H * dv)
    y = self.out(u * self.ln_attn(o))
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    y = x + dropout(y, self.dropout_rate, r1)
    del r2
    return y, k, v, a, q


class HSTU(SequenceRecommender):
  """HSTU backbone with the cache serving API (see ``SequenceRecommender``).

  Args:
    num_items: V; item ids are 1..V, 0 is padding.
    dim: embedding dimension d. heads: H. dqk, dv: per-head query/key and value dims.
    num_layers: L. max_len: position table size and attention normalizer N.
    num_time_buckets: size of the time-gap bias table. dropout: rate in training.
    temperature: softmax temperature of the cosine logits.
  """

  def __init__(self, num_items, *, dim=50, heads=1, dqk=None, dv=None, num_layers=2,
               max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    self.num_items, self.dim, self.temperature = num_items, dim, temperature
    self.max_len, self.dropout_rate = max_len, dropout
    self._kv = (heads, dqk or dim // heads, dv or dim // heads)
    init = nnx.initializers.normal(stddev=0.02)
    self.item_emb = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.pos_emb = nnx.Embed(max_len, dim, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([
        HSTULayer(dim, heads, self._kv[1], self._kv[2], max_len, num_time_buckets, dropout,
                  rngs=rngs) for _ in range(num_layers)])
    self.rank_head = nnx.Linear(dim, 1, rngs=rngs)  # ranking head (see rank_logits)

  def head_dims(self):
    return self._kv

  def embed(self, items, pos, train_rng=None):
    x = self.item_emb(items) * (self.dim ** 0.5)
    x = x + self.pos_emb(jnp.minimum(pos, self.max_len - 1))
    return dropout(x, self.dropout_rate, train_rng)


SPECS = (VariantSpec(name="hstu", model=HSTU, granularity="none", flops=flops.hstu_flops,
                     reference="Zhai et al., Actions Speak Louder than Words (HSTU), ICML 2024"),)
