"""Closed-form FLOPs of a serving request, per backbone (no model classes imported here).

Each backbone's :class:`~malloc_jax.models.spec.VariantSpec` names its formula, so
``costs.closed_form_flops`` needs no table keyed by class. Conventions: matrix multiplies
count 2 flops per multiply-add; elementwise ops 1 flop per output element (SiLU 4, GELU 8,
softmax 4, LayerNorm 7 per element), as XLA's cost model counts them; transcendentals such as
log and exp are counted by XLA separately and not here. See ``malloc_jax.costs`` for how these
are checked against XLA.
"""

from __future__ import annotations

# Elementwise flops per attention entry (head, query, key slot), as the compiled program runs
# them (read off the layer code and checked against XLA's HLO):
#   HSTU (28): relative position q - k clipped (3); time gap (1); log bucket: abs, max, / 0.301,
#     floor, clip (6); jnp's index normalization of the two bias-table gathers (compare, add,
#     select per index: 6); the two biases added to the scores (2); causal / validity mask:
#     >=, <=, and, and (4); SiLU (4); mask select (1); / N (1).
#   SASRec (15): / sqrt(Dh) (1); mask (4); masked fill (1); softmax: max-reduce, subtract,
#     sum-reduce, divide (4); select (1); and the 4 elementwise ops XLA's CPU softmax rewrite
#     adds (reduce-window partial max and sum, their broadcasts).
ATTN_ENTRY_FLOPS = {"hstu": 28, "sasrec": 15}
LAYERNORM_FLOPS = 7  # per element: mean, centre, square, variance, normalize, scale, shift
SILU_FLOPS = 4
GELU_FLOPS = 8


def request_flops(kind: str, *, batch: int, num_layers: int, dim: int, heads: int,
                  dqk: int, dv: int, cached: int, request: int, num_items: int) -> dict:
  """Closed-form FLOPs of a native serving request batch (dense compute, as executed).

  Every one of the ``cached`` memory slots is computed against (masked, not skipped), so the
  count depends on the memory's capacity T, not on how many slots are filled.

  Per user, per layer, with m = ``request`` query events and K = T + m key slots:

  * HSTU: x̂ = LN(x) (7d); U,V,Q,K = SiLU(x̂ W + b): 2 m d W + 5 m W with W = H (2 Dv + 2 Dqk);
    scores Q Kᵀ: 2 m H K Dqk; bias, mask, SiLU, / N: 28 m H K; A V: 2 m H K Dv;
    LN(A V) ⊙ U: 8 m H Dv; W_o + bias + residual: 2 m H Dv d + 2 m d.
  * SASRec: LN (7d); QKV = x̂ W + b: 6 m d² + 3 m d; scores: 2 m H K Dh; mask and softmax:
    15 m H K; A V: 2 m H K Dh; W_o + bias + residual: 2 m d² + 2 m d; LN (7d);
    FFN d -> d -> d with GELU, biases and residual: 4 m d² + 11 m d (final LayerNorm once:
    7 m d).

  Shared by both: the embedding (scale, position add: 2 m d); the memory's index expanded to
  slot positions (2 L H T); the user state normalized (3 d) and scored against every item
  (2 d (V + 1) + (V + 1)); and, once per batch, the item table normalized (3 d (V + 1)).

  Args:
    kind: "hstu" or "sasrec". batch: B users. num_layers: L. dim: d. heads: H.
    dqk, dv: per-head key and value dims (SASRec: both d / H). cached: T, the memory's
    capacity. request: m. num_items: V.

  Returns:
    {"total": flops of the batch, "per_request": total / B, "matmul": the matrix-multiply
    part of the total}.

  References: Zhai et al., "Actions Speak Louder than Words" (HSTU), ICML 2024; Kang &
    McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
  """
  if kind not in ATTN_ENTRY_FLOPS:
    raise ValueError(f"request_flops: kind={kind!r}; expected 'hstu' or 'sasrec'")
  d, H, m, T, L, V1 = dim, heads, request, cached, num_layers, num_items + 1
  K = T + m
  if kind == "hstu":
    W = H * (2 * dv + 2 * dqk)
    mm = 2 * m * d * W + 2 * m * H * K * (dqk + dv) + 2 * m * H * dv * d
    ew = (LAYERNORM_FLOPS * m * d + (1 + SILU_FLOPS) * m * W
          + ATTN_ENTRY_FLOPS["hstu"] * m * H * K + (LAYERNORM_FLOPS + 1) * m * H * dv
          + 2 * m * d)
    final = 0
  else:
    mm = 6 * m * d * d + 2 * m * H * K * (dqk + dv) + 2 * m * d * d + 4 * m * d * d
    ew = (LAYERNORM_FLOPS * m * d + 3 * m * d + ATTN_ENTRY_FLOPS["sasrec"] * m * H * K
          + 2 * m * d + LAYERNORM_FLOPS * m * d + (GELU_FLOPS + 3) * m * d)
    final = LAYERNORM_FLOPS * m * d
  per_user_mm = L * mm + 2 * d * V1
  per_user = per_user_mm + L * ew + final + 2 * m * d + 2 * L * H * T + 3 * d + V1
  total = batch * per_user + 3 * d * V1
  return {"total": float(total), "per_request": float(total / batch),
          "matmul": float(batch * per_user_mm)}


# ------------------------------------------------------------------------------------------
# Closed forms of the trained variants (malloc_jax.models.variants).
#
# Same conventions as request_flops: per user, per layer, m request events, dense masked
# compute over the memory's static slots (a variant with a fixed-size memory: over what that
# memory holds); each elementwise op of the layer code counted once per output element; the
# native per-entry constants (ATTN_ENTRY_FLOPS) wherever a variant runs the native attention
# entries. The matrix-multiply part equals XLA's dot flops exactly for every variant. Two
# things in XLA's count are left out by design:
#   * fusion duplication: XLA's CPU fusion copies a cheap elementwise producer (the SiLU and
#     bias add after a projection that is split into U, V, Q, K; masks; output adds) into
#     every consumer fusion, and its cost model counts each copy at the producer's full shape
#     although each consumer computes only its slice. The closed forms count the op once, as
#     written. This puts XLA's count 1-10% above the closed form: most for the variants whose
#     attention is cheap next to the HSTU projections (Linformer, gated linear attention,
#     Longformer, Beacon: ~7-9% at d = 32), least where matmuls dominate. Counting XLA's
#     optimized HLO with identical fused copies merged lands within 3% of every closed form
#     (d = 32, 2 layers, m = 2; Beacon +2.6%: its block mask is fused into, and recomputed
#     by, every layer).
#   * a while loop's body is counted once by XLA's cost model, whatever its trip count
#     (HloCostAnalysis::HandleWhile). RWKV's recurrence is a jax.lax.scan over the m request
#     events, so XLA counts 1 of its m steps; the closed form counts all m and reports the
#     m - 1 that XLA leaves out as "xla_uncounted" (0 for every other variant).
SIGMOID_FLOPS = 3  # 1 / (1 + exp(-x)): negate, add, divide (exp is a transcendental)
SOFTPLUS_FLOPS = 6  # jnp.logaddexp(x, 0): max, abs, negate, add, isnan compare, select
# jnp.argmax is a variadic reduce of (value, index) pairs whose comparator runs 9 elementwise
# ops per compared element (NaN test, greater-than, equal, index less-than, two ors, an and,
# two selects), as XLA's cost model counts it.
ARGMAX_FLOPS = 9
# Attention entries of HSTU-style layers without HSTU's attention_mask (Beacon passes a
# precomputed mask): ATTN_ENTRY_FLOPS["hstu"] less the mask's 4 (>=, <=, and, and).
HSTU_ENTRY_NO_MASK = ATTN_ENTRY_FLOPS["hstu"] - 4


def _layer_frame(m: int, d: int, heads: int, dv: int, width: int) -> tuple[int, int]:
  """HSTU's layer around the attention mix, per user: (matmul, elementwise) flops.

  x̂ = LN(x) (7 m d); h = SiLU(x̂ W + b) of width ``width`` (2 m d width + 5 m width);
  y = x + W_o (U ⊙ LN(o)) + b_o: LN and gate 8 m H Dv, W_o 2 m H Dv d, bias and residual
  2 m d.
  """
  mm = 2 * m * d * width + 2 * m * heads * dv * d
  ew = (LAYERNORM_FLOPS * m * d + (1 + SILU_FLOPS) * m * width
        + (LAYERNORM_FLOPS + 1) * m * heads * dv + 2 * m * d)
  return mm, ew


def _assemble(*, batch: int, num_layers: int, dim: int, request: int, num_items: int,
              layer_mm: float, layer_ew: float, user_mm: float = 0, user_ew: float = 0,
              batch_ew: float = 0, uncounted: float = 0) -> dict:
  """Adds the parts every request shares (as in :func:`request_flops`) to per-layer flops.

  Per user: L layers; the embedding (2 m d); the user state normalized (3 d) and scored
  against every item (2 d (V + 1) + (V + 1)); ``user_mm`` / ``user_ew`` once per user. Per
  batch: the item table normalized (3 d (V + 1)) and ``batch_ew``. ``uncounted``: per-user
  flops the closed form counts and XLA's cost model does not (loop iterations after the
  first).
  """
  d, m, V1 = dim, request, num_items + 1
  per_user_mm = num_layers * layer_mm + user_mm + 2 * d * V1
  per_user = per_user_mm + num_layers * layer_ew + user_ew + 2 * m * d + 3 * d + V1
  total = batch * per_user + 3 * d * V1 + batch_ew
  return {"total": float(total), "per_request": float(total / batch),
          "matmul": float(batch * per_user_mm), "xla_uncounted": float(batch * uncounted)}


def _base(model, batch, request) -> dict:
  return dict(batch=batch, num_layers=len(model.layers), dim=model.dim, request=request,
              num_items=model.num_items)


def gqa_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with grouped-query (``HSTUGQA``) or multi-query (``HSTUMQA``, G = 1) attention.

  Native HSTU with the projection narrowed to W = (H + G)(Dv + Dqk) (U, Q for H query
  heads; V, K for G kv heads) and the cached keys repeated to the H query heads, so the
  attention costs what native HSTU's does. Per user and layer, K = T + m:
  frame(W) (see :func:`_layer_frame`); Q Kᵀ and A V: 2 m H K (Dqk + Dv); bias, mask, SiLU,
  / N: 28 m H K. Per user: the index expanded to the G stored heads, 2 L G T.
  """
  layer = model.layers[0]
  H, G, dqk, dv = layer.heads, layer.kv_heads, layer.dqk, layer.dv
  m, T, d = request, cached, model.dim
  K = T + m
  mm, ew = _layer_frame(m, d, H, dv, (H + G) * (dv + dqk))
  mm += 2 * m * H * K * (dqk + dv)
  ew += ATTN_ENTRY_FLOPS["hstu"] * m * H * K
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   user_ew=2 * len(model.layers) * G * T)


def mla_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with multi-head latent attention (``HSTUMLA``): latent rank r, rotary dim R.

  Per user and layer, K = T + m: LN (7 m d); U, Q = SiLU(x̂ W_uq + b): 2 m d H (Dv + Dqk)
  + 5 m H (Dv + Dqk); latent c = x̂ W_dkv + b: 2 m d r + m r; with R > 0 the rotary key and
  queries x̂ W + b: 2 m d R (1 + H) + m R (1 + H), their rotation 3 m R (1 + H) (4 multiplies
  and an add or subtract per pair) plus the angles m R + 4 m; W_uk absorbed into the query:
  2 m H Dqk r; scores against latents and rotary keys: 2 m H K (r + R); bias, mask, SiLU,
  / N: 28 m H K (+ m H K for the second score term when R > 0); latents summed:
  2 m H K r, then W_uv: 2 m H r Dv; LN(o) ⊙ U, W_o, residual as HSTU (8 m H Dv + 2 m H Dv d +
  2 m d). Per user: the index of the one stored head, 2 L T.
  """
  layer = model.layers[0]
  H, dqk, dv, r, R = layer.heads, layer.dqk, layer.dv, layer.kv_rank, layer.rope_dim
  m, T, d = request, cached, model.dim
  K = T + m
  mm, ew = _layer_frame(m, d, H, dv, H * (dv + dqk))
  mm += (2 * m * d * r + 2 * m * d * R * (1 + H) + 2 * m * H * dqk * r
         + 2 * m * H * K * (r + R) + 2 * m * H * K * r + 2 * m * H * r * dv)
  ew += m * r + ATTN_ENTRY_FLOPS["hstu"] * m * H * K
  if R:
    ew += m * R * (1 + H) + 3 * m * R * (1 + H) + m * R + 4 * m + m * H * K
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   user_ew=2 * len(model.layers) * T)


def lsh_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with Reformer-style LSH attention (``HSTULSH``): n hash rounds of b buckets.

  Native HSTU attention over all K = T + m slots (dense, masked) with a shared Q = K
  projection (W = H (2 Dv + Dqk)), plus the hashing: the m queries and the K keys (cached
  keys are re-hashed at every read) are rotated, 2 (m + K) H Dqk n b / 2 flops of matmul,
  negated for [xR, -xR] ((m + K) H n b / 2) and reduced by argmax (``ARGMAX_FLOPS`` = 9 per
  compared element: 9 (m + K) H n (b - 1)); bucket match m H K n, any over rounds
  m H K (n - 1), and with the mask m H K. Per user and layer: frame(W); 2 m H K (Dqk + Dv);
  28 m H K. Per user: the index, 2 L H T.

  The argmax is the one unusual item in XLA's count: it is a variadic reduce whose
  comparator is 9 elementwise ops, so hashing costs about 9 (b - 1) flops per key, head and
  round besides its matmul; it is counted here as XLA counts it (no sort, no gather: the
  dense masked schedule has none).
  """
  layer = model.layers[0]
  H, dqk, dv = layer.heads, layer.dqk, layer.dv
  n, half = layer.rotations.shape[0], layer.rotations.shape[-1]
  b = 2 * half
  m, T, d = request, cached, model.dim
  K = T + m
  P = m + K  # positions hashed: queries and keys
  mm, ew = _layer_frame(m, d, H, dv, H * (2 * dv + dqk))
  mm += 2 * m * H * K * (dqk + dv) + 2 * P * H * dqk * n * half
  ew += (ATTN_ENTRY_FLOPS["hstu"] * m * H * K + P * H * n * half
         + ARGMAX_FLOPS * P * H * n * (b - 1) + m * H * K * n + m * H * K * (n - 1)
         + m * H * K)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   user_ew=2 * len(model.layers) * H * T)


def linformer_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with Linformer attention (``HSTULinformer``): k projected rows, fixed memory.

  The memory is the running sums ek [H, k, Dqk], fv [H, k, Dv] whatever the history length
  (``cached`` is not used). Per user and layer (``linformer_block``): frame(W), W =
  H (2 Dv + 2 Dqk); the new events' projection columns masked (2 k m) and their positions
  clipped (3 m); causal mask m²; q·kᵀ within the block 2 H m² Dqk, masked H m²; scores
  q·ekᵀ + (q·kᵀ)·e + row bias: 2 H m k Dqk + 2 H m² k + 2 H m k; SiLU, valid, / k: 6 H m k;
  weights of the block's values a·f: 2 H m² k, masked H m²; o = a·fv + w·v:
  2 H m k Dv + 2 H m² Dv + H m Dv. The updated sums are not part of a request (dropped).
  """
  layer = model.layers[0]
  H, dqk, dv, k = layer.heads, layer.dqk, layer.dv, layer.k_proj
  m, d = request, model.dim
  mm, ew = _layer_frame(m, d, H, dv, H * (2 * dv + 2 * dqk))
  mm += (2 * H * m * m * dqk + 2 * H * m * k * dqk + 2 * H * m * m * k + 2 * H * m * m * k
         + 2 * H * m * k * dv + 2 * H * m * m * dv)
  ew += (2 * k * m + 3 * m + m * m + 2 * H * m * m + 2 * H * m * k
         + (SILU_FLOPS + 2) * H * m * k + H * m * dv)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew)


def longformer_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with a sliding window and global tokens (``HSTULongformer``): w window, G global.

  The memory holds G global (K_j, V_j) and the last w events' K, V whatever the history
  length (``cached`` = G + w). Per user and layer, with K' = w + m window-and-new keys:
  frame(W), W = H (2 Dv + 2 Dqk); key validity H K'; relative positions H m K'; the direct
  mask (attention_mask and rel <= w: 6) and the folded-into-globals mask (3): 9 m H K';
  direct attention q·kᵀ 2 m H K' Dqk with bias, SiLU, select, / N (24 m H K'); the
  summarization weights α of the window keys: 2 H K' G Dqk + 7 H K' G (bias, SiLU, / N,
  validity); global scores q·K_j(t) = q·gkᵀ + (masked q·kᵀ)·α + c: 2 m H G Dqk + m H K' +
  2 m H K' G + 2 m H G; SiLU, / N, validity 6 m H G; token weights a + (a_g·αᵀ masked):
  2 m H G K' + 2 m H K'; o = w·v + a_g·gv: 2 m H K' Dv + 2 m H G Dv + m H Dv. The slot
  updates (folding events into the globals, shifting the window) are not part of a request.
  """
  layer = model.layers[0]
  H, dqk, dv, G, w = layer.heads, layer.dqk, layer.dv, layer.num_global, layer.window
  m, d = request, model.dim
  Kw = w + m
  mm, ew = _layer_frame(m, d, H, dv, H * (2 * dv + 2 * dqk))
  mm += (2 * m * H * Kw * dqk + 2 * H * Kw * G * dqk + 2 * m * H * G * dqk
         + 2 * m * H * Kw * G + 2 * m * H * G * Kw + 2 * m * H * Kw * dv + 2 * m * H * G * dv)
  ew += (H * Kw + m * H * Kw + 9 * m * H * Kw + HSTU_ENTRY_NO_MASK * m * H * Kw
         + (SILU_FLOPS + 3) * H * Kw * G + m * H * Kw + 2 * m * H * G
         + (SILU_FLOPS + 2) * m * H * G + 2 * m * H * Kw + m * H * dv)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew)


BEACON_MASK_FLOPS = 15  # per (token, key) of the block mask: rules, select, validity


def beacon_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with Activation Beacon (``HSTUBeacon``): chunks of C events, b beacons each.

  A request of m events runs g = ceil(m / C) beacon groups through every layer with them
  (whether or not a chunk completes: the shapes are static), Q = m + g b tokens against
  K = T + Q keys, T the memory's slots (beacons of complete chunks and the current chunk's
  events). Per user: the beacon embeddings 2 g b d; the block mask, once,
  ``BEACON_MASK_FLOPS`` (15) Q K. Per user and layer: frame(W) over Q tokens; Q Kᵀ and A V
  2 Q H K (Dqk + Dv); bias, SiLU, select, / N: 24 Q H K (HSTU's 28 without its own mask).
  The new memory (beacon K, V kept, argsort of the slots) is not part of a request.
  """
  layer = model.layers[0]
  H, dqk, dv = layer.heads, layer.dqk, layer.dv
  C, nb = model.chunk, model.beacons
  m, T, d = request, cached, model.dim
  g = -(-m // C)
  Q = m + g * nb
  K = T + Q
  mm, ew = _layer_frame(Q, d, H, dv, H * (2 * dv + 2 * dqk))
  mm += 2 * Q * H * K * (dqk + dv)
  ew += HSTU_ENTRY_NO_MASK * Q * H * K
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   user_ew=2 * g * nb * d + BEACON_MASK_FLOPS * Q * K)


WKV_STEP_FLOPS = 22  # per channel and event: output (10), state update (9), padding select (3)


def rwkv_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with RWKV time mixing (``HSTURWKV``): C = H·Dv channels, fixed-size state.

  ``cached`` is not used (the state is [L, d + 3 C] per user). Per user and layer: LN
  (7 m d); token shift of three mixes, 9 m d; k, v, r, u projections 8 m d C; σ(r) 3 m C;
  u bias and SiLU 5 m C; the WKV recurrence ``WKV_STEP_FLOPS`` (22) m C; r ⊙ wkv m C;
  LN(mix) ⊙ U 8 m C; W_o 2 m C d, bias and residual 2 m d. Per batch: 1 - μ of the three
  mixes, 3 L d.

  The recurrence is a ``jax.lax.scan`` over the m events: XLA's cost model counts a while
  loop's body once, so its count lacks (m - 1) · 22 C per user and layer, reported as
  ``xla_uncounted`` (0 for m = 1).
  """
  C, d, m, L = model.channels, model.dim, request, len(model.layers)
  mm = 8 * m * d * C + 2 * m * C * d
  ew = (LAYERNORM_FLOPS * m * d + 9 * m * d + SIGMOID_FLOPS * m * C + (1 + SILU_FLOPS) * m * C
        + WKV_STEP_FLOPS * m * C + m * C + (LAYERNORM_FLOPS + 1) * m * C + 2 * m * d)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   batch_ew=3 * L * d, uncounted=L * WKV_STEP_FLOPS * (m - 1) * C)


def linear_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU with gated linear attention (``HSTULinear``, Mamba-2 SSD form), fixed-size state.

  ``cached`` is not used (the state is [L, H, Dqk, Dv] per user). Per user and layer
  (``ssd_block``): frame(W), W = H (2 Dv + 2 Dqk); padding keys zeroed H m Dqk; decay gate
  x̂ w_a + b_a: 2 m d H + m H, softplus (6), scale, padding select: 9 m H; segment sums:
  masked H m², a cumulative sum over m (XLA's reduce-window: m (m - 1) adds per output
  column, H m² (m - 1)), exp masked H m²; prefix decays H m (m - 1); intra-block
  (L ⊙ Q Kᵀ) V: 2 H m² Dqk + H m² + 2 H m² Dv; carried state Q S decayed: 2 H m Dqk Dv +
  H m Dv, summed H m Dv. The new state is not part of a request.
  """
  layer = model.layers[0]
  H, dqk, dv = layer.heads, layer.dqk, layer.dv
  m, d = request, model.dim
  mm, ew = _layer_frame(m, d, H, dv, H * (2 * dv + 2 * dqk))
  mm += 2 * m * d * H + 2 * H * m * m * (dqk + dv) + 2 * H * m * dqk * dv
  ew += (H * m * dqk + (SOFTPLUS_FLOPS + 3) * m * H + 3 * H * m * m + H * m * m * (m - 1)
         + H * m * (m - 1) + 2 * H * m * dv)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew)


def sasrec_gqa_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """SASRec with grouped-query (``SASRecGQA``) or multi-query (``SASRecMQA``) attention.

  Native SASRec with the QKV projection narrowed to d + 2 G Dh (G kv heads, Dh = d / H)
  and the cached keys repeated to the H query heads. Per user and layer, K = T + m: LN
  (7 m d); QKV 2 m d (d + 2 G Dh) + m (d + 2 G Dh); scores and A V 4 m H K Dh; mask and
  softmax 15 m H K; W_o, bias, residual 2 m d² + 2 m d; LN, FFN with GELU, biases, residual
  7 m d + 4 m d² + 11 m d. Per user: final LN 7 m d; the index expanded to the G stored
  heads, 2 L G T.
  """
  layer = model.layers[0]
  H, G, dh = layer.heads, layer.kv_heads, layer.dh
  m, T, d = request, cached, model.dim
  K = T + m
  Wq = d + 2 * G * dh
  mm = 2 * m * d * Wq + 4 * m * H * K * dh + 2 * m * d * d + 4 * m * d * d
  ew = (LAYERNORM_FLOPS * m * d + m * Wq + ATTN_ENTRY_FLOPS["sasrec"] * m * H * K + 2 * m * d
        + LAYERNORM_FLOPS * m * d + (GELU_FLOPS + 3) * m * d)
  return _assemble(**_base(model, batch, request), layer_mm=mm, layer_ew=ew,
                   user_ew=LAYERNORM_FLOPS * m * d + 2 * len(model.layers) * G * T)


def cla_flops(model, *, batch: int, cached: int, request: int) -> dict:
  """HSTU or SASRec with cross-layer attention (``HSTUCLA``, ``SASRecCLA``), sharing factor s.

  Of the L layers, P = ceil(L / s) producers are native layers (their per-layer flops as in
  :func:`request_flops`) and L - P consumers compute no keys or values. Per user and consumer
  layer, K = T + m:

  * HSTU: frame(W) with W = H (Dv + Dqk) (U, Q; see :func:`_layer_frame`); Q Kᵀ and A V
    2 m H K (Dqk + Dv); bias, mask, SiLU, / N 28 m H K.
  * SASRec: LN 7 m d; Q = x̂ W_q + b 2 m d² + m d; scores and A V 4 m H K Dh; mask and
    softmax 15 m H K; W_o, bias, residual 2 m d² + 2 m d; LN, FFN with GELU, biases and
    residual 7 m d + 4 m d² + 11 m d.

  Per user: the index expanded to the P stored layers, 2 P H T (SASRec: and the final LN,
  7 m d).

  References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
    Attention", NeurIPS 2024.
  """
  kind = "sasrec" if hasattr(model.layers[0], "qkv") else "hstu"
  H, dqk, dv = model.head_dims()
  L, m, T, d = len(model.layers), request, cached, model.dim
  P = model.memory_layers()
  K = T + m
  attn_mm = 2 * m * H * K * (dqk + dv)  # Q Kᵀ and A V, every layer
  attn_ew = ATTN_ENTRY_FLOPS[kind] * m * H * K
  if kind == "hstu":
    prod_mm, prod_ew = _layer_frame(m, d, H, dv, H * (2 * dv + 2 * dqk))  # U, V, Q, K
    cons_mm, cons_ew = _layer_frame(m, d, H, dv, H * (dv + dqk))  # U, Q
    user_ew = 0
  else:
    ffn_mm = 2 * m * d * d + 4 * m * d * d  # W_o, FFN
    ffn_ew = 2 * m * d + LAYERNORM_FLOPS * m * d + (GELU_FLOPS + 3) * m * d
    prod_mm, prod_ew = 6 * m * d * d + ffn_mm, LAYERNORM_FLOPS * m * d + 3 * m * d + ffn_ew
    cons_mm, cons_ew = 2 * m * d * d + ffn_mm, LAYERNORM_FLOPS * m * d + m * d + ffn_ew
    user_ew = LAYERNORM_FLOPS * m * d
  return _assemble(**{**_base(model, batch, request), "num_layers": 1},
                   layer_mm=P * prod_mm + (L - P) * cons_mm + L * attn_mm,
                   layer_ew=P * prod_ew + (L - P) * cons_ew + L * attn_ew,
                   user_ew=user_ew + 2 * P * H * T)


def _native(kind: str):
  def flops(model, *, batch: int, cached: int, request: int) -> dict:
    heads, dqk, dv = model.head_dims()
    return request_flops(kind, batch=batch, num_layers=len(model.layers), dim=model.dim,
                         heads=heads, dqk=dqk, dv=dv, cached=cached, request=request,
                         num_items=model.num_items)

  flops.__name__ = f"{kind}_flops"
  flops.__doc__ = f"The native {kind.upper()} request: :func:`request_flops` ({kind!r})."
  return flops


hstu_flops = _native("hstu")
sasrec_flops = _native("sasrec")
