"""SASRec: self-attentive sequential recommendation.

References: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.

Pre-LayerNorm blocks: x += W_o·softmax(QKᵀ/√d + causal mask)·V; x += FFN(LayerNorm(x)); a
final LayerNorm. Absolute learned position embeddings. Cached per event: K, V per head.
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


class SASRecLayer(nnx.Module):
  """Causal softmax self-attention block with a point-wise feed-forward network."""

  def __init__(self, dim, heads, dropout_rate, *, rngs):
    self.heads, self.dh, self.dropout_rate = heads, dim // heads, dropout_rate
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ff1 = nnx.Linear(dim, dim, rngs=rngs)
    self.ff2 = nnx.Linear(dim, dim, rngs=rngs)

  def step(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, rng=None, isolated=None,
           slot_select=None):
    B, m, d = x.shape
    H, dh = self.heads, self.dh
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    heads = lambda t: t.reshape(B, m, H, dh).transpose(0, 2, 1, 3)  # [B, H, m, dh]
    q, k, v = heads(q), heads(k), heads(v)
    if reads.is_view(ck):
      if isolated is not None:
        raise ValueError("a candidate block mask needs the materialized memory")  # compressed memory: online softmax over memory and new part
      attn = reads.Attention("softmax", scale=dh ** -0.5)
      o, a = reads.attend_memory(attn, ck, q, k, v, q_pos, q_ts, q_valid), None
    else:
      kk, vv, kpos, _ = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
      s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) / (dh ** 0.5)
      mask = select_slots(attention_mask(q_pos, q_valid, kpos, isolated), q, slot_select)
      s = jnp.where(mask, s, -1e30)
      a = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)  # [B, H, m, T+m]
      o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
    o = o.transpose(0, 2, 1, 3).reshape(B, m, d)
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    x = x + dropout(self.out(o), self.dropout_rate, r1)
    f = self.ff2(jax.nn.gelu(self.ff1(self.ln2(x))))
    x = x + dropout(f, self.dropout_rate, r2)
    return x, k, v, a, q


class SASRec(SequenceRecommender):
  """SASRec backbone with the cache serving API (see ``SequenceRecommender``)."""

  def __init__(self, num_items, *, dim=50, heads=1, num_layers=2, max_len=200, dropout=0.2,
               temperature=0.05, rngs: nnx.Rngs, **unused):
    del unused
    self.num_items, self.dim, self.temperature = num_items, dim, temperature
    self.max_len, self.dropout_rate = max_len, dropout
    self._kv = (heads, dim // heads, dim // heads)
    init = nnx.initializers.normal(stddev=0.02)
    self.item_emb = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.pos_emb = nnx.Embed(max_len, dim, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([SASRecLayer(dim, heads, dropout, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_ln = nnx.LayerNorm(dim, rngs=rngs)
    self.rank_head = nnx.Linear(dim, 1, rngs=rngs)  # ranking head (see rank_logits)

  def head_dims(self):
    return self._kv

  def embed(self, items, pos, train_rng=None):
    x = self.item_emb(items) * (self.dim ** 0.5)
    x = x + self.pos_emb(jnp.minimum(pos, self.max_len - 1))
    return dropout(x, self.dropout_rate, train_rng)

  def output(self, x):
    return self.final_ln(x)


SPECS = (VariantSpec(name="sasrec", model=SASRec, granularity="none", flops=flops.sasrec_flops,
                     reference="Kang and McAuley, Self-Attentive Sequential Recommendation, "
                     "ICDM 2018"),)
