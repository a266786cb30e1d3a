r"""KIVI: keys per channel, values per token, 2 or 4 bits, with a full-precision residual (Liu et
al., ICML 2024). ``group`` and ``residual`` default to the largest divisor of the head dimension
up to 32.

Native memory vs ``kivi`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/kivi.py:ratio=2
  python -m malloc_jax.main --config configs/kivi.py:ratio=2,runlocal=True --workdir /tmp/kivi
  python -m malloc_jax.main --config configs/kivi.py:ratio=2,data=ml-100k,path=/path/to/ml-100k/u.data

KIVI's full-precision residual bounds its reduction (about 2.6x at the default shapes, 1.7x
with ``runlocal``); an unreachable ratio stops the run before training and names the smallest
memory's bytes.

Arguments as in configs/default.py, plus ``ratio`` (float, default 2; 1.5 with ``runlocal``; 0: use
the method's arguments as given), ``group`` (default 'auto'), ``residual`` (default 'auto').
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "kivi", runlocal_ratio=1.5, ratio=2, group="auto", residual="auto")
