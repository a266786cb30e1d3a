"""Sequence-level variants: Linformer (projected along time) and Reformer-style LSH attention.

* Linformer: keys and values are projected along time by learned E, F to ``k_proj`` rows.
  For appendable serving the memory holds the running sums P_K = Σ_i E[:, pos_i] k_iᵀ and
  P_V = Σ_i F[:, pos_i] v_iᵀ over the events seen so far, a :class:`LinformerMemory`:
  ``ek [L, B, H, k_proj, Dqk]``, ``fv [L, B, H, k_proj, Dv]`` float32 plus ``length [B]``
  int32, i.e. ``L * H * k_proj * (Dqk + Dv) * 4 + 4`` bytes per user whatever the history
  length.
* LSH: a :class:`~malloc_jax.cache.Cache` with one slot per event holding the shared
  query/key and the value (bytes per event as the native HSTU with ``Dqk`` keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from malloc_jax import flops
from malloc_jax.models.base import Events, attention_mask, concat_keys
from malloc_jax.models.hstu import HSTU, HSTULayer
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants.common import (
  BlockRecommender,
  FixedState,
  StateIndex,
  block_inputs,
  hstu_output,
  init_backbone,
  split_heads,
)

# ------------------------------------------------------------------------------------------
# Linformer


@struct.dataclass
class LinformerMemory(FixedState):
  """Running projected keys and values of a Linformer HSTU (constant size per user).

  index.length [B]; ek [L, B, H, k_proj, Dqk] = Σ_i E[:, pos_i] k_iᵀ;
  fv [L, B, H, k_proj, Dv] = Σ_i F[:, pos_i] v_iᵀ.
  """

  index: StateIndex
  ek: jax.Array
  fv: jax.Array


def linformer_block(q, k, v, e, f, row_bias, ek, fv, valid):
  """Causal Linformer attention (HSTU pointwise form) of a block against running sums.

  For query t: P_K(t) = ek + Σ_{i≤t} e[:, i] k_iᵀ, P_V(t) = fv + Σ_{i≤t} f[:, i] v_iᵀ;
  A_t = SiLU(q_t·P_K(t)ᵀ + row_bias) / k_proj; o_t = A_t·P_V(t). Formed without
  materializing P_K(t) per query: O(m² k_proj) instead of O(m k_proj D).

  Args:
    q, k: [B, H, m, Dqk]; v: [B, H, m, Dv]; e, f: [B, k_proj, m] projection columns of the
      new events (zero for padding); row_bias: [H, k_proj]; ek [B, H, k_proj, Dqk],
      fv [B, H, k_proj, Dv]: sums over earlier events; valid: [B, m].

  Returns:
    (o [B, H, m, Dv], ek, fv including the block).

  References: Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020.
  """
  m, kp = q.shape[2], e.shape[1]
  tri = jnp.tril(jnp.ones((m, m), bool))
  causal = (tri[None] & valid[:, None, :])[:, None]  # [B, 1, m(t), m(i)]
  qk = jnp.where(causal, jnp.einsum("bhtd,bhid->bhti", q, k), 0.0)  # [B, H, m, m]
  s = (jnp.einsum("bhtd,bhrd->bhtr", q, ek) + jnp.einsum("bhti,bri->bhtr", qk, e) +
       row_bias[None, :, None, :])  # [B, H, m, k]
  a = nnx.silu(s) * valid[:, None, :, None] / kp
  w = jnp.where(causal, jnp.einsum("bhtr,bri->bhti", a, f), 0.0)  # [B, H, m, m]
  o = jnp.einsum("bhtr,bhrd->bhtd", a, fv) + jnp.einsum("bhti,bhid->bhtd", w, v)
  ek = ek + jnp.einsum("bri,bhid->bhrd", e, k)
  fv = fv + jnp.einsum("bri,bhid->bhrd", f, v)
  return o, ek, fv


class LinformerLayer(HSTULayer):
  """HSTU layer whose keys and values are projected along time to ``k_proj`` rows.

  For query t (causal): P_K(t) = Σ_{i≤t} E[:, pos_i] k_iᵀ [k_proj, Dqk], likewise P_V(t) with
  F; A_t = SiLU(q_t·P_K(t)ᵀ + b) / k_proj [k_proj]; o_t = A_t·P_V(t). E, F [k_proj, max_len]
  are defined per absolute position and shared by the heads of a layer; events at positions
  >= max_len use the last column. See ``linformer_block``.

  Deviations from Linformer: causal prefix sums (the paper projects the whole, non-causal
  sequence); HSTU's pointwise SiLU instead of softmax; the relative position and time-gap
  biases cannot apply to projected rows, so a learned bias per (head, row) replaces them
  (absolute positions enter through E, F and the position embedding); E, F are initialized
  N(0, 1/max_len) so that a full-length projection has the scale of one key.

  References: Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020.
  """

  def __init__(self, dim, heads, dqk, dv, k_proj, max_len, dropout_rate, *, rngs):
    self.heads, self.dqk, self.dv, self.k_proj = heads, dqk, dv, k_proj
    self.max_len, self.dropout_rate = max_len, dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uvqk = nnx.Linear(dim, heads * (2 * dv + 2 * dqk), rngs=rngs)
    init = nnx.initializers.normal(stddev=max_len ** -0.5)
    self.proj_e = nnx.Param(init(rngs.params(), (k_proj, max_len)))
    self.proj_f = nnx.Param(init(rngs.params(), (k_proj, max_len)))
    self.row_bias = nnx.Param(jnp.zeros((heads, k_proj), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def step(self, x, q_pos, q_valid, ek, fv, rng=None):
    """One layer over m new events against the projected memory.

    Args:
      x: [B, m, d]; q_pos, q_valid: [B, m]; ek [B, H, k, Dqk], fv [B, H, k, Dv]: the sums
        over earlier events; rng: dropout key or None.

    Returns:
      (y [B, m, d], ek [B, H, k, Dqk], fv [B, H, k, Dv] including the new events).
    """
    H, dqk, dv = self.heads, self.dqk, self.dv
    h = nnx.silu(self.uvqk(self.ln(x)))
    u, v, q, k = jnp.split(h, [H * dv, 2 * H * dv, 2 * H * dv + H * dqk], axis=-1)
    q, k, v = split_heads(q, H, dqk), split_heads(k, H, dqk), split_heads(v, H, dv)
    col = jnp.clip(q_pos, 0, self.max_len - 1)
    e = self.proj_e[...][:, col].transpose(1, 0, 2) * q_valid[:, None]  # [B, k, m]
    f = self.proj_f[...][:, col].transpose(1, 0, 2) * q_valid[:, None]
    o, ek, fv = linformer_block(q, k, v, e, f, self.row_bias[...], ek, fv, q_valid)
    return hstu_output(self, x, u, o, rng), ek, fv


class HSTULinformer(BlockRecommender):
  """HSTU with Linformer attention; the memory is a constant-size :class:`LinformerMemory`.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, dropout, temperature: as ``HSTU``.
    k_proj: number of projected rows k. num_time_buckets: accepted and unused (no time bias).

  References: Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020.
  """

  def __init__(self, num_items, *, dim=50, heads=1, k_proj=16, dqk=None, dv=None,
               num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    del num_time_buckets
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.k_proj = k_proj
    self.layers = nnx.List([LinformerLayer(dim, heads, dqk, dv, k_proj, max_len, dropout,
                                           rngs=rngs) for _ in range(num_layers)])

  def empty_memory(self, batch: int) -> LinformerMemory:
    H, dqk, dv = self._kv
    L = len(self.layers)
    return LinformerMemory(index=StateIndex(length=jnp.zeros((batch,), jnp.int32)),
                           ek=jnp.zeros((L, batch, H, self.k_proj, dqk), jnp.float32),
                           fv=jnp.zeros((L, batch, H, self.k_proj, dv), jnp.float32))

  def _block(self, memory: LinformerMemory, events: Events, train_rng=None):
    x, q_pos, _, q_valid, rngs = block_inputs(self, memory.index.length, events, train_rng)
    eks, fvs = [], []
    for i, layer in enumerate(self.layers):
      x, ek, fv = layer.step(x, q_pos, q_valid, memory.ek[i], memory.fv[i], rngs[i])
      eks.append(ek)
      fvs.append(fv)
    new = LinformerMemory(index=StateIndex(length=memory.index.length + events.length),
                          ek=jnp.stack(eks), fv=jnp.stack(fvs))
    return self.output(x), new


# ------------------------------------------------------------------------------------------
# Reformer-style LSH attention


class LSHRotations(nnx.Variable):
  """Fixed random rotations of the LSH hash (not trained)."""


class LSHLayer(HSTULayer):
  """HSTU layer with Reformer's shared-QK LSH attention.

  Queries and keys share one projection (k = q, as in Reformer, so that a query and its
  own key hash alike). Each event's key is hashed ``num_hashes`` times by random rotations
  R [Dqk, num_buckets / 2]: bucket = argmax([xR; -xR]). Query t attends (HSTU pointwise
  SiLU attention with rab) only to earlier keys that share a bucket with it in at least one
  hash round.

  Compute, honestly: this implementation forms the dense [m, T + m] score matrix and masks
  it, so attention costs what native HSTU costs plus the hashing, O((T + m) · Dqk ·
  num_buckets / 2 · num_hashes) per head and layer (cached keys are re-hashed at every read
  from the stored keys, which yields the stored bucket ids exactly: hashing is
  deterministic). Reformer's sort-and-chunk schedule, which would reduce the attention to
  O(T · chunk), is not implemented. Memory: full K, V per event; bucket ids are recomputed,
  not stored. Also unlike Reformer, a query may attend to its own key (HSTU's pointwise
  attention has no softmax in which the self term would dominate) and keys are not
  normalized.

  References: Kitaev et al., "Reformer: The Efficient Transformer", ICLR 2020.
  """

  def __init__(self, dim, heads, dqk, dv, max_len, num_time_buckets, dropout_rate,
               num_buckets, num_hashes, *, rngs):
    if num_buckets < 2 or num_buckets % 2:
      raise ValueError(f"num_buckets={num_buckets}: expected an even number >= 2")
    self.heads, self.dqk, self.dv = heads, dqk, dv
    self.max_len, self.num_time_buckets = max_len, num_time_buckets
    self.dropout_rate = dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uvq = nnx.Linear(dim, heads * (2 * dv + dqk), rngs=rngs)
    self.rotations = LSHRotations(jax.random.normal(
        rngs.params(), (num_hashes, heads, dqk, num_buckets // 2), jnp.float32))
    self.rab_pos = nnx.Param(jnp.zeros((heads, max_len), jnp.float32))
    self.rab_time = nnx.Param(jnp.zeros((heads, num_time_buckets), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def buckets(self, x: jax.Array) -> jax.Array:
    """Bucket ids [B, H, T, num_hashes] int32 of keys x [B, H, T, Dqk]."""
    r = jnp.einsum("bhtd,nhdk->bhtnk", x, self.rotations[...])
    return jnp.argmax(jnp.concatenate([r, -r], axis=-1), axis=-1).astype(jnp.int32)

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None,
           rows: int | None = None):
    """One layer over m new events (signature, ``rows`` and returns as ``HSTULayer.step``)."""
    H, dqk, dv = self.heads, self.dqk, self.dv
    h = nnx.silu(self.uvq(self.ln(x)))
    u, v, q = jnp.split(h, [H * dv, 2 * H * dv], axis=-1)
    q, v = split_heads(q, H, dqk), split_heads(v, H, dv)
    k = q  # shared QK
    kk, vv, kpos, kts = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
    mask = attention_mask(q_pos, q_valid, kpos, isolated)
    if rows is not None:  # queries: the last `rows` tokens only (keys: every token)
      sl = slice(x.shape[1] - rows, x.shape[1])
      x, u, q, q_pos, q_ts, mask = x[:, sl], u[:, sl], q[:, :, sl], q_pos[:, sl], \
          q_ts[:, sl], mask[:, :, sl]
    bq, bk = self.buckets(q), self.buckets(kk)  # [B, H, m, n], [B, H, T+m, n]
    same = jnp.any(bq[:, :, :, None, :] == bk[:, :, None, :, :], axis=-1)  # [B, H, m, T+m]
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) + self.bias(q_pos, q_ts, kpos, kts)
    mask = mask & same
    a = jnp.where(mask, nnx.silu(s), 0.0) / self.max_len
    o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
    y = hstu_output(self, x, u, o, rng)
    return y, k, v, jnp.abs(a)


class HSTULSH(HSTU):
  """HSTU with Reformer-style LSH attention; the cache is native-shaped (full K, V).

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    num_buckets: buckets per hash round (even). num_hashes: hash rounds.

  References: Kitaev et al., "Reformer: The Efficient Transformer", ICLR 2020.
  """

  def __init__(self, num_items, *, dim=50, heads=1, num_buckets=4, num_hashes=1, dqk=None,
               dv=None, num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2,
               temperature=0.05, rngs: nnx.Rngs):
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.layers = nnx.List([
        LSHLayer(dim, heads, dqk, dv, max_len, num_time_buckets, dropout, num_buckets,
                 num_hashes, rngs=rngs) for _ in range(num_layers)])


__all__ = ["HSTULSH", "HSTULinformer", "LSHLayer", "LinformerLayer", "LinformerMemory",
           "linformer_block"]


SPECS = (
    VariantSpec(name="hstu_linformer", model=HSTULinformer, granularity="sequence",
                flops=flops.linformer_flops, test_options={"k_proj": 5},
                reference="Wang et al., Linformer: Self-Attention with Linear Complexity, "
                "2020"),
    VariantSpec(name="hstu_lsh", model=HSTULSH, granularity="sequence", flops=flops.lsh_flops,
                test_options={"num_buckets": 4, "num_hashes": 2},
                reference="Kitaev et al., Reformer: The Efficient Transformer, ICLR 2020"),
)
