r"""Seconds-long run for tests and smoke checks (tiny synthetic data and model).

  python -m malloc_jax.main --config configs/tiny.py --workdir /tmp/tiny
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.base_config(arg, runlocal=True)
