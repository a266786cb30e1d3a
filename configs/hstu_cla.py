r"""HSTU (or SASRec) with cross-layer attention: groups of ``share`` adjacent layers share one
key/value memory, so ceil(L / share) layers of K and V are stored.

  python -m malloc_jax.main --config configs/hstu_cla.py
  python -m malloc_jax.main --config configs/hstu_cla.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_cla.py:share=2,model=sasrec

Arguments as in configs/default.py, plus ``share`` (int >= 1, default 2: CLA2, half of the
native memory for an even number of layers; 1: the native backbone).

References: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
  Attention", NeurIPS 2024.
"""

from malloc_jax import config_lib as common

EXTRA = dict(share=2)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  config.model.name = f"{args.model}_cla"
  config.model.share = args.share
  return config
