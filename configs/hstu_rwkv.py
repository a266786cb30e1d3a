r"""HSTU with RWKV time mixing: the memory is a fixed-size recurrent state per layer.

  python -m malloc_jax.main --config configs/hstu_rwkv.py
  python -m malloc_jax.main --config configs/hstu_rwkv.py:runlocal=True

Arguments as in configs/default.py.

References: Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", EMNLP 2023 Findings.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg)
  args = common.parse_arg(arg)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_rwkv"
  return config
