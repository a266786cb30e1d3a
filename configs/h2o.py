r"""H2O: heavy hitters by accumulated attention plus a recent window (Zhang et al., NeurIPS 2023).

Native memory vs ``h2o`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/h2o.py:ratio=4
  python -m malloc_jax.main --config configs/h2o.py:ratio=4,runlocal=True --workdir /tmp/h2o
  python -m malloc_jax.main --config configs/h2o.py:ratio=4,data=ml-100k,path=/path/to/ml-100k/u.data

Arguments as in configs/default.py, plus ``ratio`` (float, default 4; 0: use the
method's arguments as given).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "h2o", ratio=4)
