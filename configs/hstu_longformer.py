r"""HSTU with a Longformer-style sliding window plus learned global summary tokens: the memory
is the last ``window`` events plus ``num_global`` global tokens per layer and head.

  python -m malloc_jax.main --config configs/hstu_longformer.py
  python -m malloc_jax.main --config configs/hstu_longformer.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_longformer.py:window=32,num_global=8

Arguments as in configs/default.py, plus ``window`` (int, default 0: data.max_len // 8) and
``num_global`` (int, default 4).

References: Beltagy et al., "Longformer: The Long-Document Transformer", 2020.
"""

from malloc_jax import config_lib as common

EXTRA = dict(window=0, num_global=4)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_longformer"
  config.model.window = args.window or max(1, config.data.max_len // 8)
  config.model.num_global = args.num_global
  return config
