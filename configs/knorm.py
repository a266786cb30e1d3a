r"""K-norm: keep the events whose keys have the smallest L2 norm, plus ``recent`` newest (Devoto et
al., EMNLP 2024).

Native memory vs ``knorm`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/knorm.py:ratio=4
  python -m malloc_jax.main --config configs/knorm.py:ratio=4,runlocal=True --workdir /tmp/knorm
  python -m malloc_jax.main --config configs/knorm.py:ratio=4,data=ml-100k,path=/path/to/ml-100k/u.data

Arguments as in configs/default.py, plus ``ratio`` (float, default 4; 0: use the
method's arguments as given), ``recent`` (default 0).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "knorm", ratio=4, recent=0)
