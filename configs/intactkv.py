r"""IntactKV: a quantized memory with ``pivots`` events kept exact (Liu et al., ACL Findings 2024).

Native memory vs ``intactkv`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/intactkv.py:ratio=2
  python -m malloc_jax.main --config configs/intactkv.py:ratio=2,runlocal=True --workdir /tmp/intactkv
  python -m malloc_jax.main --config configs/intactkv.py:ratio=2,data=ml-100k,path=/path/to/ml-100k/u.data

Arguments as in configs/default.py, plus ``ratio`` (float, default 2; 0: use the
method's arguments as given), ``pivots`` (default 4).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "intactkv", ratio=2, pivots=4)
