r"""Native memory vs TOVA (Oren et al. 2024) at ``ratio``x fewer stored bytes.

  python -m malloc_jax.main --config configs/tova.py
  python -m malloc_jax.main --config configs/tova.py:ratio=8,model=sasrec

Arguments as in configs/default.py, plus ``ratio`` (float, default 4).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "tova", ratio=4)
