r"""HSTU with Linformer attention: the memory is ``k_proj`` projected rows per layer and head
(running sums E·K, F·V), constant in the history length.

  python -m malloc_jax.main --config configs/hstu_linformer.py
  python -m malloc_jax.main --config configs/hstu_linformer.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_linformer.py:k_proj=32

Arguments as in configs/default.py, plus ``k_proj`` (int, default 0: data.max_len // 8).

References: Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020.
"""

from malloc_jax import config_lib as common

EXTRA = dict(k_proj=0)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_linformer"
  config.model.k_proj = args.k_proj or max(1, config.data.max_len // 8)
  return config
