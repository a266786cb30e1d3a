r"""HSTU (or SASRec) with multi-query attention: one key/value head shared by all query heads.

  python -m malloc_jax.main --config configs/hstu_mqa.py
  python -m malloc_jax.main --config configs/hstu_mqa.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_mqa.py:model=sasrec

Arguments as in configs/default.py. At least 2 query heads are used (so that the one stored
head is shared).

References: Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", 2019.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg)
  args = common.parse_arg(arg)
  config.model.name = f"{args.model}_mqa"
  config.model.heads = max(config.model.heads, 2)
  return config
