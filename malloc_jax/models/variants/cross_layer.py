"""Layer-level variant: Cross-Layer Attention (CLA), adjacent layers share one K/V memory.

Layers are grouped in runs of ``share`` (the paper's sharing factor; CLA2 is ``share=2``):
the first layer of a group (a *producer*) is the backbone's own layer and computes keys and
values from its input; every later layer of the group (a *consumer*) computes its own
queries (HSTU: U and Q; SASRec: Q) and attends to the producer's keys and values, for the
cached events and for the new events alike. Only producers' K and V are stored, so the
memory is a :class:`~malloc_jax.cache.Cache` of ``ceil(L / share)`` layers:

* HSTU: ``k [ceil(L/s), B, H, T, Dqk]``, ``v [ceil(L/s), B, H, T, Dv]``; bytes per event
  ``ceil(L/s) * H * (Dqk + Dv) * 4`` (float32), half of native's for ``s = 2`` and even L.
* SASRec: the same with ``Dqk = Dv = d / H``.

The index is the native one (an int32 time stamp per event, an int32 length per user), so
every post-hoc compressor applies to the memory as to a native cache of fewer layers. The
attention signals of a stored layer (``acc_attn``, ``window_attn``) are the mean over the
layers of its group (as GQA averages over the query heads that read a kv head). The layers
do not return their queries, so ThinK (which needs ``window_queries``) does not apply, as
for GQA, MQA and MLA. With ``share=1`` the model is exactly the native backbone.

Deviation from the paper: Brandon et al. share K/V between adjacent layers of an LLM with
softmax attention; here the HSTU version shares HSTU's SiLU'd K and V and keeps each layer's
own relative-position and time biases (they need only the stored index). The paper combines
CLA with MQA / GQA (K/V heads shared across query heads as well); here every layer keeps all
H K/V heads, so the 2x is relative to the native multi-head memory (a GQA + CLA variant would
be a combination of this module's groups with ``heads.GQALayer``).

References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
  Attention", NeurIPS 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from malloc_jax import cache as cache_lib
from malloc_jax import flops
from malloc_jax.cache import Cache
from malloc_jax.models.base import attention_mask, concat_keys, dropout
from malloc_jax.models.hstu import HSTU, HSTULayer
from malloc_jax.models.sasrec import SASRec, SASRecLayer
from malloc_jax.models.spec import VariantSpec
from malloc_jax.models.variants.common import hstu_output, init_backbone, merge_heads, split_heads


def _check_share(share: int, num_layers: int) -> None:
  if not isinstance(share, int) or share < 1:
    raise ValueError(f"share={share!r}: expected an integer >= 1 (layers per shared K/V)")
  if num_layers < 1:
    raise ValueError(f"num_layers={num_layers}: expected at least 1")


class HSTUConsumerLayer(HSTULayer):
  """HSTU layer that reads the keys and values of its group's producer (U and Q only).

  References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
    Attention", NeurIPS 2024; Zhai et al., HSTU, ICML 2024.
  """

  def __init__(self, dim, heads, dqk, dv, max_len, num_time_buckets, dropout_rate, *, rngs):
    self.heads, self.dqk, self.dv = heads, dqk, dv
    self.max_len, self.num_time_buckets = max_len, num_time_buckets
    self.dropout_rate = dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uq = nnx.Linear(dim, heads * (dv + dqk), rngs=rngs)
    self.rab_pos = nnx.Param(jnp.zeros((heads, max_len), jnp.float32))
    self.rab_time = nnx.Param(jnp.zeros((heads, num_time_buckets), jnp.float32))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def read(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, k, v, rng=None, isolated=None):
    """One layer over m new events against the producer's cached and new keys and values.

    Args:
      x: [B, m, d]; q_pos, q_ts, q_valid: [B, m]; ck [B, H, T, Dqk], cv [B, H, T, Dv],
        cpos, cts [B, H, T]: the group's stored layer; k [B, H, m, Dqk], v [B, H, m, Dv]:
        the producer's keys and values of the new events; rng: dropout key or None.

    Returns:
      (y [B, m, d], attn [B, H, m, T + m]).
    """
    H, dqk, dv = self.heads, self.dqk, self.dv
    u, q = jnp.split(nnx.silu(self.uq(self.ln(x))), [H * dv], axis=-1)
    q = split_heads(q, H, dqk)  # [B, H, m, dqk]
    kk, vv, kpos, kts = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)  # [B, H, T+m, .]
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) + self.bias(q_pos, q_ts, kpos, kts)
    mask = attention_mask(q_pos, q_valid, kpos, isolated)
    a = jnp.where(mask, nnx.silu(s), 0.0) / self.max_len  # [B, H, m, T+m]
    o = jnp.einsum("bhmt,bhtd->bhmd", a, vv)
    return hstu_output(self, x, u, o, rng), jnp.abs(a)


class SASRecConsumerLayer(SASRecLayer):
  """SASRec block that reads the keys and values of its group's producer (Q only).

  References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
    Attention", NeurIPS 2024; Kang & McAuley, SASRec, ICDM 2018.
  """

  def __init__(self, dim, heads, dropout_rate, *, rngs):
    self.heads, self.dh, self.dropout_rate = heads, dim // heads, dropout_rate
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.q = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ff1 = nnx.Linear(dim, dim, rngs=rngs)
    self.ff2 = nnx.Linear(dim, dim, rngs=rngs)

  def read(self, x, q_pos, q_ts, q_valid, ck, cv, cpos, cts, k, v, rng=None, isolated=None):
    """As :meth:`HSTUConsumerLayer.read` with softmax attention; attn is the probability."""
    H, dh = self.heads, self.dh
    q = split_heads(self.q(self.ln1(x)), H, dh)  # [B, H, m, dh]
    kk, vv, kpos, _ = concat_keys(ck, cv, cpos, cts, k, v, q_pos, q_ts)
    s = jnp.einsum("bhmd,bhtd->bhmt", q, kk) / (dh ** 0.5)
    mask = attention_mask(q_pos, q_valid, kpos, isolated)
    a = jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1), 0.0)
    o = merge_heads(jnp.einsum("bhmt,bhtd->bhmd", a, vv))
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    x = x + dropout(self.out(o), self.dropout_rate, r1)
    f = self.ff2(jax.nn.gelu(self.ff1(self.ln2(x))))
    return x + dropout(f, self.dropout_rate, r2), a


class CrossLayerKV:
  """Mixin of the CLA backbones: layer i reads stored layer ``i // share``.

  The host class sets ``share`` and builds ``layers`` with a producer (the backbone's layer)
  at every multiple of ``share`` and consumers (``read(...)``) elsewhere.
  """

  share: int

  def memory_layers(self) -> int:
    """Layers of the stored memory: ceil(L / share)."""
    return -(-len(self.layers) // self.share)

  def empty_cache(self, batch: int, capacity: int = 0) -> Cache:
    h, dk, dv = self.head_dims()
    return cache_lib.empty_cache(self.memory_layers(), batch, h, capacity, dk, dv)

  def _run_tokens(self, cache: Cache, items, q_pos, q_ts, q_valid, train_rng=None,
                  isolated=None):
    """As ``SequenceRecommender._run_tokens``, with K/V shared within each layer group.

    Returns (hidden [B, m, d], k [L', B, H, m, Dk], v, attn [L', B, H, m, T + m] (mean over
    the group's layers), None), L' = ceil(L / share).
    """
    if not isinstance(cache, Cache):
      raise ValueError(f"{type(self).__name__}: pass a dense memory (memory.materialize()); "
                       "the compressed reads of malloc_jax.reads are for plain HSTU / SASRec")
    if cache.num_layers != self.memory_layers():
      raise ValueError(f"{type(self).__name__}: the memory has {cache.num_layers} layers; "
                       f"expected ceil({len(self.layers)} / share={self.share}) = "
                       f"{self.memory_layers()}")
    rngs = [None] * (len(self.layers) + 1)
    if train_rng is not None:
      rngs = list(jax.random.split(train_rng, len(self.layers) + 1))
    x = self.embed(items, jnp.maximum(q_pos, 0), rngs[0])
    extra = {} if isolated is None else {"isolated": isolated}
    ks, vs, groups = [], [], []
    for i, layer in enumerate(self.layers):
      j = i // self.share
      kv = (cache.k[j], cache.v[j], cache.pos[j], cache.ts[j])
      if i % self.share == 0:  # producer: the backbone's own layer
        x, k, v, a, *_ = layer.step(x, q_pos, q_ts, q_valid, *kv, rngs[i + 1], **extra)
        ks.append(k)
        vs.append(v)
        groups.append([a])
      else:  # consumer: its own queries against the producer's keys and values
        x, a = layer.read(x, q_pos, q_ts, q_valid, *kv, ks[j], vs[j], rngs[i + 1], **extra)
        groups[j].append(a)
    x = self.output(x)
    attn = jnp.stack([sum(g) / len(g) for g in groups])
    return x, jnp.stack(ks), jnp.stack(vs), attn, None


class HSTUCLA(CrossLayerKV, HSTU):
  """HSTU with cross-layer attention: groups of ``share`` adjacent layers share one K/V.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, num_time_buckets, dropout,
      temperature: as ``HSTU``.
    share: layers per shared key/value memory (2: CLA2, half the bytes for even L; 1: the
      native HSTU).

  References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
    Attention", NeurIPS 2024.
  """

  def __init__(self, num_items, *, dim=50, heads=1, dqk=None, dv=None, num_layers=2,
               max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05, share=2,
               rngs: nnx.Rngs):
    _check_share(share, num_layers)
    _, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.share = share
    self.layers = nnx.List([
        (HSTULayer if i % share == 0 else HSTUConsumerLayer)(
            dim, heads, dqk, dv, max_len, num_time_buckets, dropout, rngs=rngs)
        for i in range(num_layers)])


class SASRecCLA(CrossLayerKV, SASRec):
  """SASRec with cross-layer attention: groups of ``share`` adjacent blocks share one K/V.

  Args: as ``SASRec``, plus ``share`` (as ``HSTUCLA``).

  References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
    Attention", NeurIPS 2024.
  """

  def __init__(self, num_items, *, dim=50, heads=1, num_layers=2, max_len=200, dropout=0.2,
               temperature=0.05, share=2, rngs: nnx.Rngs, **unused):
    del unused
    _check_share(share, num_layers)
    self.num_items, self.dim, self.temperature = num_items, dim, temperature
    self.max_len, self.dropout_rate = max_len, dropout
    self._kv = (heads, dim // heads, dim // heads)
    self.share = share
    init = nnx.initializers.normal(stddev=0.02)
    self.item_emb = nnx.Embed(num_items + 1, dim, embedding_init=init, rngs=rngs)
    self.pos_emb = nnx.Embed(max_len, dim, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([
        (SASRecLayer if i % share == 0 else SASRecConsumerLayer)(dim, heads, dropout,
                                                                 rngs=rngs)
        for i in range(num_layers)])
    self.final_ln = nnx.LayerNorm(dim, rngs=rngs)
    self.rank_head = nnx.Linear(dim, 1, rngs=rngs)  # ranking head (see rank_logits)


__all__ = ["CrossLayerKV", "HSTUCLA", "HSTUConsumerLayer", "SASRecCLA", "SASRecConsumerLayer"]

_REFERENCE = ("Brandon et al., Reducing Transformer Key-Value Cache Size with Cross-Layer "
              "Attention, NeurIPS 2024")
SPECS = (
    VariantSpec(name="hstu_cla", model=HSTUCLA, granularity="layer", flops=flops.cla_flops,
                reference=_REFERENCE),
    VariantSpec(name="sasrec_cla", model=SASRecCLA, granularity="layer", flops=flops.cla_flops,
                reference=_REFERENCE),
)
