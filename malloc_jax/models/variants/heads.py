"""Head-level variants: multi-query (MQA), grouped-query (GQA) and multi-head latent (MLA).

All three store a :class:`~malloc_jax.cache.Cache` (one slot per event) and reuse the native
serving code, so every post-hoc compressor applies to their memories:

* GQA: ``k [L, B, H_kv, T, Dqk]``, ``v [L, B, H_kv, T, Dv]``; query head h reads kv head
  ``h // (H / H_kv)``. Bytes per event: ``L * H_kv * (Dqk + Dv) * 4`` (float32).
* MQA: GQA with ``H_kv = 1``.
* MLA: ``k [L, B, 1, T, kv_rank]`` holds the joint latent c = LN(x)·W_dkv, ``v [L, B, 1, T,
  rope_dim]`` the decoupled rotary key (an empty ``[..., 0]`` array when rope_dim = 0). Bytes
  per event: ``L * (kv_rank + rope_dim) * 4``.

Every cache also stores its index: 4 bytes (int32 timestamp) per event plus 4 bytes
(length) per user for a contiguous cache. Attention signals (``acc_attn``, ``window_attn``)
are per *stored* head: the mean over the query heads that read it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from malloc_jax import flops
from malloc_jax.models.base import attention_mask, concat_keys
from malloc_jax.models.hstu import HSTU, HSTULayer
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants.common import (
  hstu_output,
  init_backbone,
  rope,
  split_heads,
)


def _last_rows(rows, x, u, q, q_pos, q_ts, mask):
  """The last ``rows`` query tokens of a layer's step (every token keeps its key and value):
  x, u [B, m, .], q [B, H, m, .], q_pos, q_ts [B, m], mask [B, H, m, T]."""
  sl = slice(x.shape[1] - rows, x.shape[1])
  return x[:, sl], u[:, sl], q[:, :, sl], q_pos[:, sl], q_ts[:, sl], mask[:, :, sl]


class GQALayer(HSTULayer):
  """HSTU layer with ``kv_heads`` key/value heads shared by groups of query heads.

  With ``kv_heads == heads`` the parameters have the native HSTULayer's shapes and order
  (U, V, Q, K columns of ``uvqk``), and the layer computes exactly the native layer.

  References: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", EMNLP 2023; Shazeer, "Fast Transformer Decoding: One Write-Head
    is All You Need", 2019 (MQA).
  """

  def __init__(self, dim, heads, kv_heads, dqk, dv, max_len, num_time_buckets, dropout_rate,
               *, rngs):
    if kv_heads < 1 or heads % kv_heads:
      raise ValueError(f"kv_heads={kv_heads}: expected a divisor of heads={heads}")
    self.heads, self.kv_heads, self.dqk, self.dv = heads, kv_heads, dqk, dv
    self.max_len, self.num_time_buckets = max_len, num_time_buckets
    self.dropout_rate = dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uvqk = nnx.Linear(dim, heads * (dv + dqk) + kv_heads * (dv + dqk), rngs=rngs)
    self.rab_pos = nnx.Param(jnp.zeros((heads, max_len), jnp.float32))
    self.rab_time = nnx.Param(jnp.zeros((heads, num_time_buckets), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None,
           rows: int | None = None):
    """One layer over m new events; the cache holds ``kv_heads`` heads.

    Args:
      x: [B, m, d]; q_pos, q_ts, q_valid: [B, m]; ck [B, G, T, Dqk], cv [B, G, T, Dv],
        cpos, cts [B, G, T] (G = kv_heads); rng: dropout key or None. rows: as
        ``HSTULayer.step`` (only the last ``rows`` tokens are queries).

    Returns:
      (y [B, m, d], k [B, G, m, Dqk], v [B, G, m, Dv], attn [B, G, m, T + m]); with
      ``rows``, y and attn have ``rows`` rows.
    """
    H, G, dqk, dv = self.heads, self.kv_heads, self.dqk, self.dv
    h = nnx.silu(self.uvqk(self.ln(x)))
    u, v, q, k = jnp.split(h, [H * dv, H * dv + G * dv, H * dv + G * dv + H * dqk], axis=-1)
    q, k, v = split_heads(q, H, dqk), split_heads(k, G, dqk), split_heads(v, G, dv)
    kk, vv, kpos, kts = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)  # [B, G, T+m, .]
    rep = H // G
    kk, vv = jnp.repeat(kk, rep, axis=1), jnp.repeat(vv, rep, axis=1)  # [B, H, T+m, .]
    kpos_h, kts_h = jnp.repeat(kpos, rep, axis=1), jnp.repeat(kts, rep, axis=1)
    mask = attention_mask(q_pos, q_valid, kpos_h, isolated)
    if rows is not None:
      x, u, q, q_pos, q_ts, mask = _last_rows(rows, x, u, q, q_pos, q_ts, mask)
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) + self.bias(q_pos, q_ts, kpos_h, kts_h)
    a = jnp.where(mask, nnx.silu(s), 0.0) / self.max_len  # [B, H, m, T+m]
    o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
    y = hstu_output(self, x, u, o, rng)
    B, _, m, T = a.shape
    attn = jnp.abs(a).reshape(B, G, rep, m, T).mean(axis=2)  # [B, G, m, T+m]
    return y, k, v, attn


class HSTUGQA(HSTU):
  """HSTU with grouped-query attention: the cache holds ``kv_heads`` heads.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    kv_heads: H_kv, a divisor of ``heads`` (1: MQA; ``heads``: the native HSTU).

  References: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", EMNLP 2023.
  """

  def __init__(self, num_items, *, dim=50, heads=1, kv_heads=1, dqk=None, dv=None,
               num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self._kv = (kv_heads, dqk, dv)
    self.layers = nnx.List([
        GQALayer(dim, heads, kv_heads, dqk, dv, max_len, num_time_buckets, dropout, rngs=rngs)
        for _ in range(num_layers)])


class HSTUMQA(HSTUGQA):
  """HSTU with multi-query attention: one key/value head shared by all query heads.

  Args: as ``HSTUGQA`` without ``kv_heads`` (fixed to 1).

  References: Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019.
  """

  def __init__(self, num_items, *, kv_heads=1, **kwargs):
    if kv_heads != 1:
      raise ValueError(f"hstu_mqa: kv_heads={kv_heads}: MQA has exactly 1 (use hstu_gqa)")
    super().__init__(num_items, kv_heads=1, **kwargs)


class MLALayer(HSTULayer):
  """HSTU layer with multi-head latent attention (MLA).

  Per event it stores the latent c = LN(x)·W_dkv [kv_rank] and a decoupled rotary key
  k_r = RoPE(LN(x)·W_kr) [rope_dim] shared by all heads. At read time head h uses
  K_h = c·W_uk^h and V_h = c·W_uv^h; since both are linear in c, W_uk^h is absorbed into the
  query (q_h·K_hᵀ = (q_h·W_uk^hᵀ)·cᵀ) and W_uv^h is applied after the attention-weighted sum of
  latents, so a read costs O(T · kv_rank) per head. The score is
  q_h·K_h + q_r,h·k_r + rab (HSTU's relative position and time bias, which needs only the
  stored index), A = SiLU(score) / N.

  Deviation from HSTU: K and V are linear in the latent (no SiLU), as in DeepSeek-V2; U and
  Q keep HSTU's SiLU. Deviation from DeepSeek-V2: no low-rank query compression and no norm
  on the latent (queries are not stored, and HSTU's LayerNorm precedes the projection).

  References: DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient
    Mixture-of-Experts Language Model", 2024.
  """

  def __init__(self, dim, heads, dqk, dv, kv_rank, rope_dim, max_len, num_time_buckets,
               dropout_rate, *, rngs):
    if rope_dim % 2:
      raise ValueError(f"rope_dim={rope_dim}: expected an even number (rotary pairs)")
    self.heads, self.dqk, self.dv = heads, dqk, dv
    self.kv_rank, self.rope_dim = kv_rank, rope_dim
    self.max_len, self.num_time_buckets = max_len, num_time_buckets
    self.dropout_rate = dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uq = nnx.Linear(dim, heads * (dv + dqk), rngs=rngs)
    self.dkv = nnx.Linear(dim, kv_rank, rngs=rngs)
    self.q_rope = nnx.Linear(dim, heads * rope_dim, rngs=rngs) if rope_dim else None
    self.k_rope = nnx.Linear(dim, rope_dim, rngs=rngs) if rope_dim else None
    init = nnx.initializers.normal(stddev=kv_rank ** -0.5)
    self.w_uk = nnx.Param(init(rngs.params(), (heads, kv_rank, dqk)))
    self.w_uv = nnx.Param(init(rngs.params(), (heads, kv_rank, dv)))
    self.rab_pos = nnx.Param(jnp.zeros((heads, max_len), jnp.float32))
    self.rab_time = nnx.Param(jnp.zeros((heads, num_time_buckets), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None,
           rows: int | None = None):
    """One layer over m new events against the latent cache.

    Args:
      x: [B, m, d]; q_pos, q_ts, q_valid: [B, m]; ck [B, 1, T, kv_rank] latents,
        cv [B, 1, T, rope_dim] rotary keys, cpos, cts [B, 1, T]; rng: dropout key or None.
        rows: as ``HSTULayer.step`` (only the last ``rows`` tokens are queries).

    Returns:
      (y [B, m, d], c [B, 1, m, kv_rank], k_r [B, 1, m, rope_dim], attn [B, 1, m, T + m]);
      with ``rows``, y and attn have ``rows`` rows.
    """
    B, m, _ = x.shape
    H, dqk, dv, R = self.heads, self.dqk, self.dv, self.rope_dim
    xh = self.ln(x)
    u, q = jnp.split(nnx.silu(self.uq(xh)), [H * dv], axis=-1)
    q = split_heads(q, H, dqk)  # [B, H, m, dqk]
    c = self.dkv(xh)[:, None]  # [B, 1, m, r]
    if R:
      kr = rope(self.k_rope(xh), q_pos)[:, None]  # [B, 1, m, R]
      qr = rope(split_heads(self.q_rope(xh), H, R), q_pos[:, None])  # [B, H, m, R]
    else:
      kr = jnp.zeros((B, 1, m, 0), x.dtype)
      qr = jnp.zeros((B, H, m, 0), x.dtype)
    cc, krr, kpos, kts = concat_keys(ck, cv, cpos, cts, c, kr, q_pos, q_ts)  # [B, 1, T+m, .]
    kpos_h = jnp.broadcast_to(kpos, (B, H, kpos.shape[-1]))
    kts_h = jnp.broadcast_to(kts, kpos_h.shape)
    mask = attention_mask(q_pos, q_valid, kpos_h, isolated)
    if rows is not None:
      x, u, q, q_pos, q_ts, mask = _last_rows(rows, x, u, q, q_pos, q_ts, mask)
      qr = qr[:, :, -rows:]
    q_lat = jnp.einsum("bhmd,hrd->bhmr", q, self.w_uk[...])  # W_uk absorbed into the query
    s = (jnp.einsum("bhmr,btr->bhmt", q_lat, cc[:, 0]) +
         jnp.einsum("bhmR,btR->bhmt", qr, krr[:, 0]) + self.bias(q_pos, q_ts, kpos_h, kts_h))
    a = jnp.where(mask, nnx.silu(s), 0.0) / self.max_len  # [B, H, m, T+m]
    o_lat = jnp.einsum("bhmt,btr->bhmr", a, cc[:, 0])  # weighted sum of latents
    o = jnp.einsum("bhmr,hrd->bhmd", o_lat, self.w_uv[...])  # [B, H, m, dv]
    y = hstu_output(self, x, u, o, rng)
    return y, c, kr, jnp.abs(a).mean(axis=1, keepdims=True)


class HSTUMLA(HSTU):
  """HSTU with multi-head latent attention: the cache stores a latent and a rotary key.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    kv_rank: size of the stored latent c per event and layer.
    rope_dim: size of the stored decoupled rotary key (even; 0 for none).

  References: DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient
    Mixture-of-Experts Language Model", 2024.
  """

  def __init__(self, num_items, *, dim=50, heads=1, kv_rank=16, rope_dim=4, dqk=None,
               dv=None, num_layers=2, max_len=200, num_time_buckets=128, dropout=0.2,
               temperature=0.05, rngs: nnx.Rngs):
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self._kv = (1, kv_rank, rope_dim)
    self.layers = nnx.List([
        MLALayer(dim, heads, dqk, dv, kv_rank, rope_dim, max_len, num_time_buckets, dropout,
                 rngs=rngs) for _ in range(num_layers)])


__all__ = ["GQALayer", "HSTUGQA", "HSTUMLA", "HSTUMQA", "MLALayer"]


SPECS = (
    VariantSpec(name="hstu_mqa", model=HSTUMQA, granularity="head", flops=flops.gqa_flops,
                reference="Shazeer, Fast Transformer Decoding: One Write-Head is All You "
                "Need, 2019"),
    VariantSpec(name="hstu_gqa", model=HSTUGQA, granularity="head", flops=flops.gqa_flops,
                test_options={"heads": 4, "kv_heads": 2},
                reference="Ainslie et al., GQA, EMNLP 2023"),
    VariantSpec(name="hstu_mla", model=HSTUMLA, granularity="head", flops=flops.mla_flops,
                test_options={"kv_rank": 6, "rope_dim": 4},
                reference="DeepSeek-AI, DeepSeek-V2 (multi-head latent attention), 2024"),
)
