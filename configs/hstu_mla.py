r"""HSTU with multi-head latent attention: a latent of ``kv_rank`` plus a ``rope_dim`` rotary key
are stored per event and layer.

  python -m malloc_jax.main --config configs/hstu_mla.py
  python -m malloc_jax.main --config configs/hstu_mla.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_mla.py:kv_rank=8,rope_dim=0

Arguments as in configs/default.py, plus ``kv_rank`` (int, default 0: model.dim // 4) and
``rope_dim`` (int, even, default 4).

References: DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
  Language Model", 2024.
"""

from malloc_jax import config_lib as common

EXTRA = dict(kv_rank=0, rope_dim=4)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_mla"
  config.model.kv_rank = args.kv_rank or max(1, config.model.dim // 4)
  config.model.rope_dim = args.rope_dim
  return config
