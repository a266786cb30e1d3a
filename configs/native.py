r"""The native memory alone (no compression): the reference of every other config.

  python -m malloc_jax.main --config configs/native.py
  python -m malloc_jax.main --config configs/native.py:model=sasrec,runlocal=True

Arguments as in configs/default.py.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.base_config(arg)
