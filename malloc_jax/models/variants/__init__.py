"""Trained memory-efficient attention variants of HSTU (and SASRec where trivial).

Each variant changes what attention stores per user, so it needs its own training run; all
share the native serving API (``prefill``, ``extend``, ``encode``, ``score``, full forward,
``item_embeddings``, ``head_dims``). Memory layouts, by granularity:

| name | memory | per user |
|---|---|---|
| hstu_mqa, hstu_gqa | Cache, H_kv heads | L·H_kv·(Dqk+Dv)·4 B per event |
| hstu_mla | Cache: k = latent, v = rotary key | L·(kv_rank+rope_dim)·4 B per event |
| hstu_lsh | Cache (shared QK, V) | as native HSTU |
| hstu_cla, sasrec_cla | Cache of ceil(L/share) layers (cross-layer K/V) | ceil(L/share)·H·(Dqk+Dv)·4 B per event |
| hstu_linformer | LinformerMemory (E·K, F·V sums) | fixed |
| hstu_longformer | Cache: G global + w window slots | fixed |
| hstu_beacon | Cache: beacons of complete chunks + current chunk | ≈ beacons/chunk of native |
| hstu_rwkv | RWKVState | fixed |
| hstu_linear | LinearAttentionState | fixed |
| sasrec_mqa, sasrec_gqa | Cache, H_kv heads | L·H_kv·2·(d/H)·4 B per event |

Cache memories also store their index (int32 timestamps per event, or pos and ts per slot
for the non-contiguous layouts of Longformer and Beacon) and ``length [B]``.
"""

from malloc_jax.models.variants import (
  cross_layer,
  heads,
  longformer_beacon,
  recurrent,
  sasrec,
  sequence,
)
from malloc_jax.models.variants.common import BlockRecommender, FixedState, StateIndex
from malloc_jax.models.variants.cross_layer import HSTUCLA, SASRecCLA
from malloc_jax.models.variants.heads import HSTUGQA, HSTUMLA, HSTUMQA
from malloc_jax.models.variants.longformer_beacon import HSTUBeacon, HSTULongformer
from malloc_jax.models.variants.recurrent import (
  HSTURWKV,
  HSTULinear,
  LinearAttentionState,
  RWKVState,
)
from malloc_jax.models.variants.sasrec import SASRecGQA, SASRecMQA
from malloc_jax.models.variants.sequence import HSTULSH, HSTULinformer, LinformerMemory

# Every trained variant, from the SPECS its module declares next to its class.
_MODULES = (heads, longformer_beacon, recurrent, sasrec, sequence, cross_layer)
VARIANT_SPECS = {spec.name: spec for module in _MODULES for spec in module.SPECS}
VARIANTS = {name: spec.model for name, spec in VARIANT_SPECS.items()}

__all__ = ["VARIANTS", "VARIANT_SPECS", "BlockRecommender", "FixedState", "HSTUBeacon",
           "HSTUCLA", "HSTUGQA", "HSTULSH", "HSTULinear", "HSTULinformer", "HSTULongformer", "HSTUMLA",
           "HSTUMQA", "HSTURWKV", "LinearAttentionState", "LinformerMemory", "RWKVState", "SASRecCLA", "SASRecGQA", "SASRecMQA",
           "StateIndex"]
