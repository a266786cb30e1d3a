r"""HSTU with gated linear attention (a Mamba-2-style state space layer with a per-head decay):
the memory is a fixed-size [Dqk, Dv] state per layer and head.

  python -m malloc_jax.main --config configs/hstu_linear.py
  python -m malloc_jax.main --config configs/hstu_linear.py:runlocal=True

Arguments as in configs/default.py.

References: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
  Through Structured State Space Duality", ICML 2024.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg)
  args = common.parse_arg(arg)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_linear"
  return config
