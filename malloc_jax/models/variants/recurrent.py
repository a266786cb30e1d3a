"""Architecture-level variants with a fixed-size per-user state: RWKV and gated linear attention.

Both keep HSTU's layer skeleton (x̂ = LayerNorm(x); gate U = SiLU(x̂·W_u);
y = x + W_o·(U ⊙ LayerNorm(mix))) and replace the attention mix A·V by a recurrence whose
state is all that is stored per user, whatever the history length:

* RWKV (:class:`RWKVState`): per layer the token-shift input ``shift [L, B, d]`` and the
  WKV numerator, denominator and running max exponent ``num, den, exp_max [L, B, C]``
  (C = heads · dv). Bytes per user: ``L * (d + 3 C) * 4 + 4``.
* Gated linear attention (:class:`LinearAttentionState`): per layer and head the matrix
  state ``kv [L, B, H, Dqk, Dv]``. Bytes per user: ``L * H * Dqk * Dv * 4 + 4``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from malloc_jax import flops
from malloc_jax.models.base import Events
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

_NEG = -1e38  # initial running max exponent of the WKV state (an empty sum)


# ------------------------------------------------------------------------------------------
# RWKV


@struct.dataclass
class RWKVState(FixedState):
  """Fixed-size RWKV memory. index.length [B]; shift [L, B, d] (LayerNorm'd input of the last
  event); num, den, exp_max [L, B, C]: the WKV sums Σ e^{k_i - (n-1-i)w} v_i and
  Σ e^{k_i - (n-1-i)w}, both scaled by e^{-exp_max}."""

  index: StateIndex
  shift: jax.Array
  num: jax.Array
  den: jax.Array
  exp_max: jax.Array


def wkv_scan(k, v, w, u, valid, state):
  """RWKV-4's numerically stable WKV recurrence over a block.

  wkv_t = (Σ_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) /
          (Σ_{i<t} e^{-(t-1-i)w + k_i} + e^{u + k_t}), per channel.

  Args:
    k, v: [B, m, C]; w: [C] positive decay; u: [C] bonus of the current event;
    valid: [B, m] bool (padding leaves the state unchanged); state: (num, den, exp_max) [B, C].

  Returns:
    (wkv [B, m, C], new state).

  References: Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", EMNLP 2023
    Findings (the official CUDA kernel's max-tracking form).
  """

  def step(carry, inp):
    num, den, mx = carry
    kt, vt, ok = inp  # [B, C], [B, C], [B]
    ww = u + kt
    p = jnp.maximum(mx, ww)
    e1, e2 = jnp.exp(mx - p), jnp.exp(ww - p)
    out = (e1 * num + e2 * vt) / (e1 * den + e2)
    ww = mx - w
    p = jnp.maximum(ww, kt)
    e1, e2 = jnp.exp(ww - p), jnp.exp(kt - p)
    new = (e1 * num + e2 * vt, e1 * den + e2, p)
    new = tuple(jnp.where(ok[:, None], n, o) for n, o in zip(new, carry))
    return new, out

  state, out = jax.lax.scan(step, state, (k.swapaxes(0, 1), v.swapaxes(0, 1), valid.T))
  return out.swapaxes(0, 1), state


class RWKVLayer(nnx.Module):
  """HSTU layer whose attention is RWKV's time mixing.

  x̂ = LayerNorm(x); token shift x̂_k = μ_k x̂_t + (1 - μ_k) x̂_{t-1} (likewise v, r);
  k = x̂_k W_k, v = x̂_v W_v, r = σ(x̂_r W_r); mix = r ⊙ WKV(k, v) (``wkv_scan``);
  y = x + W_o·(SiLU(x̂ W_u) ⊙ LayerNorm(mix)).

  Deviations from RWKV-4: no channel-mix block (HSTU has no FFN; HSTU's gate U takes its
  place); the decay is per event, not per unit of time (irregular time gaps are ignored).

  References: Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", EMNLP 2023
    Findings.
  """

  def __init__(self, dim, channels, dropout_rate, *, rngs):
    self.channels, self.dropout_rate = channels, dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    ratio = jnp.arange(dim, dtype=jnp.float32) / dim
    self.mix = nnx.Param(jnp.stack([ratio ** 0.5, ratio ** 0.5, ratio ** 0.25]))  # [3, d]
    self.u_proj = nnx.Linear(dim, channels, rngs=rngs)
    self.key = nnx.Linear(dim, channels, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(dim, channels, use_bias=False, rngs=rngs)
    self.receptance = nnx.Linear(dim, channels, use_bias=False, rngs=rngs)
    c = jnp.arange(channels, dtype=jnp.float32) / max(channels - 1, 1)
    self.time_decay = nnx.Param(-5.0 + 8.0 * c ** 1.5)  # w = exp(time_decay)
    self.time_first = nnx.Param(jnp.full((channels,), 0.5, jnp.float32))  # u
    self.ln_attn = nnx.LayerNorm(channels, rngs=rngs)
    self.out = nnx.Linear(channels, dim, rngs=rngs)

  def step(self, x, valid, shift, num, den, exp_max, rng=None):
    """One layer over m new events.

    Args:
      x: [B, m, d]; valid: [B, m]; shift [B, d], num, den, exp_max [B, C]: the state after
        the earlier events; rng: dropout key or None.

    Returns:
      (y [B, m, d], shift, num, den, exp_max): the state after the valid new events.
    """
    B, m, _ = x.shape
    xh = self.ln(x)
    prev = jnp.concatenate([shift[:, None], xh[:, :-1]], axis=1)  # x̂_{t-1} [B, m, d]
    mu = self.mix[...]
    xk, xv, xr = (xh * mu[i] + prev * (1.0 - mu[i]) for i in range(3))
    k, v = self.key(xk), self.value(xv)
    r = jax.nn.sigmoid(self.receptance(xr))
    wkv, (num, den, exp_max) = wkv_scan(k, v, jnp.exp(self.time_decay[...]),
                                        self.time_first[...], valid, (num, den, exp_max))
    u = nnx.silu(self.u_proj(xh))
    o = (r * wkv)[:, None]  # [B, 1, m, C]: one "head" of C channels
    y = hstu_output(self, x, u, o, rng)
    n = jnp.sum(valid, axis=1)
    last = jnp.take_along_axis(xh, jnp.clip(n - 1, 0, m - 1)[:, None, None], axis=1)[:, 0]
    shift = jnp.where((n > 0)[:, None], last, shift)
    return y, shift, num, den, exp_max


class HSTURWKV(BlockRecommender):
  """HSTU with RWKV time mixing; the memory is a fixed-size :class:`RWKVState`.

  Args:
    num_items, dim, heads, dv, num_layers, max_len, dropout, temperature: as ``HSTU``
      (C = heads · dv time-mix channels). dqk, num_time_buckets: accepted and unused.

  References: Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", EMNLP 2023
    Findings.
  """

  def __init__(self, num_items, *, dim=50, heads=1, dqk=None, dv=None, num_layers=2,
               max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    del num_time_buckets
    H, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.channels = H * dv
    self.layers = nnx.List([RWKVLayer(dim, self.channels, dropout, rngs=rngs)
                            for _ in range(num_layers)])

  def empty_memory(self, batch: int) -> RWKVState:
    L, C = len(self.layers), self.channels
    z = jnp.zeros((L, batch, C), jnp.float32)
    return RWKVState(index=StateIndex(length=jnp.zeros((batch,), jnp.int32)),
                     shift=jnp.zeros((L, batch, self.dim), jnp.float32), num=z, den=z,
                     exp_max=jnp.full((L, batch, C), _NEG, jnp.float32))

  def _block(self, memory: RWKVState, events: Events, train_rng=None):
    x, _, _, q_valid, rngs = block_inputs(self, memory.index.length, events, train_rng)
    new = {"shift": [], "num": [], "den": [], "exp_max": []}
    for i, layer in enumerate(self.layers):
      x, *state = layer.step(x, q_valid, memory.shift[i], memory.num[i], memory.den[i],
                             memory.exp_max[i], rngs[i])
      for name, s in zip(new, state):
        new[name].append(s)
    mem = RWKVState(index=StateIndex(length=memory.index.length + events.length),
                    **{n: jnp.stack(s) for n, s in new.items()})
    return self.output(x), mem


# ------------------------------------------------------------------------------------------
# Gated linear attention / Mamba-2-style state space layer


@struct.dataclass
class LinearAttentionState(FixedState):
  """Fixed-size gated-linear-attention memory. index.length [B];
  kv [L, B, H, Dqk, Dv] = Σ_i (Π_{j>i} a_j) k_i v_iᵀ."""

  index: StateIndex
  kv: jax.Array


def segsum(x: jax.Array) -> jax.Array:
  """[..., m] -> [..., m, m]: out[t, i] = Σ_{i<j≤t} x_j for i ≤ t, 0 above the diagonal.

  Computed with a masked cumulative sum (not a difference of prefix sums), as Mamba-2's
  reference, so long blocks keep full precision.
  """
  m = x.shape[-1]
  xx = jnp.broadcast_to(x[..., :, None], x.shape + (m,))  # [..., j, i] = x_j
  xx = jnp.where(jnp.tril(jnp.ones((m, m), bool), -1), xx, 0.0)
  return jnp.cumsum(xx, axis=-2)  # [..., t, i]


def ssd_block(q, k, v, log_a, kv):
  """Gated linear attention over a block, in Mamba-2's chunked (SSD) form.

  S_t = a_t S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t, with S_{-1} = kv; computed as
  o = (L ⊙ Q Kᵀ) V + diag(Π_{j≤t} a_j) Q S_{-1}, L[t, i] = Π_{i<j≤t} a_j.

  Args:
    q, k: [B, H, m, Dqk]; v: [B, H, m, Dv]; log_a: [B, H, m] log decays (<= 0; padding: 0
      with k = 0, which leaves the state unchanged); kv: [B, H, Dqk, Dv] state before the block.

  Returns:
    (o [B, H, m, Dv], kv [B, H, Dqk, Dv] after the block).

  References: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality", ICML 2024.
  """
  m = q.shape[2]
  tri = jnp.tril(jnp.ones((m, m), bool))
  decay = jnp.where(tri, jnp.exp(segsum(log_a)), 0.0)  # [B, H, m(t), m(i)]
  cum = jnp.cumsum(log_a, axis=-1)  # [B, H, m]: decay of the stored state to query t
  o = (jnp.einsum("bhti,bhti,bhid->bhtd", decay, jnp.einsum("bhtd,bhid->bhti", q, k), v) +
       jnp.exp(cum)[..., None] * jnp.einsum("bhtd,bhde->bhte", q, kv))
  last = decay[:, :, -1, :]  # [B, H, m]: Π_{j>i} a_j to the end of the block
  kv = jnp.exp(cum[..., -1])[..., None, None] * kv + jnp.einsum("bhi,bhid,bhie->bhde", last,
                                                                 k, v)
  return o, kv


class GatedLinearLayer(nnx.Module):
  """HSTU layer whose attention is gated linear attention with a per-head decay.

  U, V, Q, K = SiLU(x̂ W) as in HSTU; a data-dependent per-head decay
  a_t = exp(-exp(A_log) · softplus(x̂_t w_a + b_a)) ∈ (0, 1] (Mamba-2's scalar-times-identity
  transition); state S_t = a_t S_{t-1} + k_t v_tᵀ [Dqk, Dv] per head; o_t = q_tᵀ S_t.
  A block of m events is computed in Mamba-2's chunked (SSD) form (``ssd_block``).

  Deviations from Mamba-2: the input is not scaled by Δ (GLA-style k_t v_tᵀ update), no
  convolution before the SSM and no separate output gate beyond HSTU's U; the decay is per
  event, not per unit of time.

  References: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality", ICML 2024 (Mamba-2); Yang et al., "Gated Linear
    Attention Transformers with Hardware-Efficient Training", ICML 2024.
  """

  def __init__(self, dim, heads, dqk, dv, dropout_rate, *, rngs):
    self.heads, self.dqk, self.dv, self.dropout_rate = heads, dqk, dv, dropout_rate
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.uvqk = nnx.Linear(dim, heads * (2 * dv + 2 * dqk), rngs=rngs)
    self.gate = nnx.Linear(dim, heads, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    # Mamba-2 init: Δ = softplus(b_a) log-uniform in [1e-3, 1e-1], A = exp(A_log) in [1, 16].
    dt = jnp.exp(jnp.linspace(jnp.log(1e-3), jnp.log(1e-1), heads))
    self.gate.bias[...] = dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    self.a_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, heads)))
    self.ln_attn = nnx.LayerNorm(heads * dv, rngs=rngs)
    self.out = nnx.Linear(heads * dv, dim, rngs=rngs)

  def step(self, x, valid, kv, rng=None):
    """One layer over m new events.

    Args:
      x: [B, m, d]; valid: [B, m]; kv: [B, H, Dqk, Dv] state after the earlier events;
        rng: dropout key or None.

    Returns:
      (y [B, m, d], kv [B, H, Dqk, Dv] after the valid new events).
    """
    H, dqk, dv = self.heads, self.dqk, self.dv
    xh = self.ln(x)
    u, v, q, k = jnp.split(nnx.silu(self.uvqk(xh)), [H * dv, 2 * H * dv, 2 * H * dv + H * dqk],
                           axis=-1)
    q, k, v = split_heads(q, H, dqk), split_heads(k, H, dqk), split_heads(v, H, dv)
    k = k * valid[:, None, :, None]  # padding adds nothing
    log_a = -jnp.exp(self.a_log[...])[None, :, None] * jax.nn.softplus(
        self.gate(xh)).transpose(0, 2, 1)  # [B, H, m]
    log_a = jnp.where(valid[:, None, :], log_a, 0.0)  # padding keeps the state
    o, kv = ssd_block(q, k, v, log_a, kv)
    return hstu_output(self, x, u, o, rng), kv


class HSTULinear(BlockRecommender):
  """HSTU with gated linear attention (Mamba-2-style SSM); memory: :class:`LinearAttentionState`.

  Args:
    num_items, dim, heads, dqk, dv, num_layers, max_len, dropout, temperature: as ``HSTU``.
    num_time_buckets: accepted and unused (no time bias).

  References: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality", ICML 2024.
  """

  def __init__(self, num_items, *, dim=50, heads=1, dqk=None, dv=None, num_layers=2,
               max_len=200, num_time_buckets=128, dropout=0.2, temperature=0.05,
               rngs: nnx.Rngs):
    del num_time_buckets
    H, dqk, dv = init_backbone(self, num_items, dim=dim, max_len=max_len, dropout=dropout,
                               temperature=temperature, heads=heads, dqk=dqk, dv=dv, rngs=rngs)
    self.layers = nnx.List([GatedLinearLayer(dim, H, dqk, dv, dropout, rngs=rngs)
                            for _ in range(num_layers)])

  def empty_memory(self, batch: int) -> LinearAttentionState:
    H, dqk, dv = self._kv
    return LinearAttentionState(index=StateIndex(length=jnp.zeros((batch,), jnp.int32)),
                                kv=jnp.zeros((len(self.layers), batch, H, dqk, dv),
                                             jnp.float32))

  def _block(self, memory: LinearAttentionState, events: Events, train_rng=None):
    x, _, _, q_valid, rngs = block_inputs(self, memory.index.length, events, train_rng)
    kvs = []
    for i, layer in enumerate(self.layers):
      x, kv = layer.step(x, q_valid, memory.kv[i], rngs[i])
      kvs.append(kv)
    mem = LinearAttentionState(index=StateIndex(length=memory.index.length + events.length),
                               kv=jnp.stack(kvs))
    return self.output(x), mem


__all__ = ["GatedLinearLayer", "HSTULinear", "HSTURWKV", "LinearAttentionState", "RWKVLayer",
           "RWKVState", "segsum", "ssd_block", "wkv_scan"]


SPECS = (
    VariantSpec(name="hstu_rwkv", model=HSTURWKV, granularity="architecture",
                flops=flops.rwkv_flops,
                reference="Peng et al., RWKV: Reinventing RNNs for the Transformer Era, "
                "Findings of EMNLP 2023"),
    VariantSpec(name="hstu_linear", model=HSTULinear, granularity="architecture",
                flops=flops.linear_flops,
                reference="Katharopoulos et al., Transformers are RNNs (ICML 2020); gated as "
                "Dao and Gu, Mamba-2 (ICML 2024)"),
)
