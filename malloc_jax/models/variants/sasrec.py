"""SASRec with grouped-query (GQA) or multi-query (MQA) attention.

The cache holds ``kv_heads`` heads: ``k, v [L, B, H_kv, T, d / H]``; bytes per event
``L * H_kv * 2 * (d / H) * 4`` (float32) plus the index. With ``kv_heads == heads`` the
parameters and outputs are the native SASRec's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from malloc_jax import flops
from malloc_jax.models.base import attention_mask, concat_keys, dropout
from malloc_jax.models.sasrec import SASRec, SASRecLayer
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants.common import merge_heads, split_heads


class SASRecGQALayer(SASRecLayer):
  """SASRec block whose ``kv_heads`` key/value heads are shared by groups of query heads.

  References: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", EMNLP 2023; Shazeer, "Fast Transformer Decoding: One Write-Head
    is All You Need", 2019 (MQA).
  """

  def __init__(self, dim, heads, kv_heads, dropout_rate, *, rngs):
    if kv_heads < 1 or heads % kv_heads:
      raise ValueError(f"kv_heads={kv_heads}: expected a divisor of heads={heads}")
    self.heads, self.kv_heads, self.dh = heads, kv_heads, dim // heads
    self.dropout_rate = dropout_rate
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, dim + 2 * kv_heads * self.dh, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ff1 = nnx.Linear(dim, dim, rngs=rngs)
    self.ff2 = nnx.Linear(dim, dim, rngs=rngs)

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None):
    """As ``SASRecLayer.step`` with a cache of G = kv_heads heads.

    Returns:
      (y [B, m, d], k [B, G, m, dh], v [B, G, m, dh], attn [B, G, m, T + m]: mean of the
      group's softmax rows).
    """
    H, G, dh = self.heads, self.kv_heads, self.dh
    q, k, v = jnp.split(self.qkv(self.ln1(x)), [H * dh, H * dh + G * dh], axis=-1)
    q, k, v = split_heads(q, H, dh), split_heads(k, G, dh), split_heads(v, G, dh)
    kk, vv, kpos, _ = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
    rep = H // G
    kk, vv, kpos_h = (jnp.repeat(t, rep, axis=1) for t in (kk, vv, kpos))
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) / (dh ** 0.5)
    mask = attention_mask(q_pos, q_valid, kpos_h, isolated)
    s = jnp.where(mask, s, -1e30)
    a = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)  # [B, H, m, T+m]
    o = merge_heads(jnp.einsum("bhmt,bhtd->bhmd", a, vv))
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    x = x + dropout(self.out(o), self.dropout_rate, r1)
    f = self.ff2(jax.nn.gelu(self.ff1(self.ln2(x))))
    x = x + dropout(f, self.dropout_rate, r2)
    B, _, m, T = a.shape
    return x, k, v, a.reshape(B, G, rep, m, T).mean(axis=2)


class SASRecGQA(SASRec):
  """SASRec with grouped-query attention.

  Args: as ``SASRec``, plus kv_heads (a divisor of heads).

  References: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", EMNLP 2023.
  """

  def __init__(self, num_items, *, dim=50, heads=1, kv_heads=1, num_layers=2, max_len=200,
               dropout=0.2, temperature=0.05, rngs: nnx.Rngs, **unused):
    del unused
    self.num_items, self.dim, self.temperature = num_items, dim, temperature
    self.max_len, self.dropout_rate = max_len, dropout
    self._kv = (kv_heads, dim // heads, dim // heads)
    init = nnx.initializers.normal(stddev=0.02)
    self.item_emb = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.pos_emb = nnx.Embed(max_len, dim, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([SASRecGQALayer(dim, heads, kv_heads, dropout, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_ln = nnx.LayerNorm(dim, rngs=rngs)
    self.rank_head = nnx.Linear(dim, 1, rngs=rngs)  # ranking head (see rank_logits)


class SASRecMQA(SASRecGQA):
  """SASRec with multi-query attention (one key/value head).

  References: Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019.
  """

  def __init__(self, num_items, *, kv_heads=1, **kwargs):
    if kv_heads != 1:
      raise ValueError(f"sasrec_mqa: kv_heads={kv_heads}: MQA has exactly 1 (use sasrec_gqa)")
    super().__init__(num_items, kv_heads=1, **kwargs)


__all__ = ["SASRecGQA", "SASRecGQALayer", "SASRecMQA"]


SPECS = (
    VariantSpec(name="sasrec_mqa", model=SASRecMQA, granularity="head",
                flops=flops.sasrec_gqa_flops,
                reference="Shazeer, Fast Transformer Decoding: One Write-Head is All You "
                "Need, 2019"),
    VariantSpec(name="sasrec_gqa", model=SASRecGQA, granularity="head",
                flops=flops.sasrec_gqa_flops, test_options={"heads": 4, "kv_heads": 2},
                reference="Ainslie et al., GQA, EMNLP 2023"),
)
