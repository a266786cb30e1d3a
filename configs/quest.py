r"""Native memory vs Quest's store (Tang et al. 2024): the full cache plus per-page key bounds.

  python -m malloc_jax.main --config configs/quest.py
  python -m malloc_jax.main --config configs/quest.py:page=8,model=sasrec

Arguments as in configs/default.py, plus ``page`` (int, default 16). Quest stores everything
(more bytes than native: the bounds); its saving is the bytes a request reads
(``compressors.quest_pages.quest_read_bytes``). The serving pipeline scores the materialized
memory, i.e. the whole cache: reading only the selected pages per query
(``quest_pages.quest_view``) needs the model's request path to pass its queries.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, page=16)
  args = common.parse_arg(arg, page=16)
  config.compressors[f"quest_p{args.page}"] = {"name": "quest", "page": args.page}
  return config
