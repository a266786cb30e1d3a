r"""HSTU (or SASRec) with grouped-query attention: ``kv_heads`` key/value heads are stored.

  python -m malloc_jax.main --config configs/hstu_gqa.py
  python -m malloc_jax.main --config configs/hstu_gqa.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_gqa.py:kv_heads=1,model=sasrec

Arguments as in configs/default.py, plus ``kv_heads`` (int, default 0: half the query
heads). Query heads are raised to 4 where ``model.dim`` allows (else 2) so that groups exist.

References: Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
  Multi-Head Checkpoints", EMNLP 2023.
"""

from malloc_jax import config_lib as common

EXTRA = dict(kv_heads=0)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  m = config.model
  m.name = f"{args.model}_gqa"
  m.heads = 4 if m.dim % 4 == 0 else 2
  m.kv_heads = args.kv_heads or m.heads // 2
  return config
