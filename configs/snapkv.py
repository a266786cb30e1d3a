r"""SnapKV: events voted for by the last ``window`` queries, pooled, plus the window (Li et al.,
2024).

Native memory vs ``snapkv`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/snapkv.py:ratio=4
  python -m malloc_jax.main --config configs/snapkv.py:ratio=4,runlocal=True --workdir /tmp/snapkv
  python -m malloc_jax.main --config configs/snapkv.py:ratio=4,data=ml-100k,path=/path/to/ml-100k/u.data

Arguments as in configs/default.py, plus ``ratio`` (float, default 4; 2 with ``runlocal``; 0: use
the method's arguments as given), ``window`` (default 8).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "snapkv", runlocal_ratio=2, ratio=4, window=8)
