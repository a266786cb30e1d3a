r"""H2O whose evicted events are merged into their most similar kept one (D2O / CaM).

Native memory vs ``merge_evicted`` with its parameter chosen so that the memory is ``ratio`` times
smaller than the native one for the model's cache shape (``compressors.resolve_params``).

  python -m malloc_jax.main --config configs/merge_evicted.py:ratio=4
  python -m malloc_jax.main --config configs/merge_evicted.py:ratio=4,runlocal=True --workdir /tmp/merge_evicted
  python -m malloc_jax.main --config configs/merge_evicted.py:ratio=4,data=ml-100k,path=/path/to/ml-100k/u.data

Arguments as in configs/default.py, plus ``ratio`` (float, default 4; 0: use the
method's arguments as given).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  return common.method_config(arg, "merge_evicted", ratio=4)
