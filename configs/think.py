r"""Native memory vs ThinK (Xu et al. 2024): each head's key channels pruned by query weight.

  python -m malloc_jax.main --config configs/think.py
  python -m malloc_jax.main --config configs/think.py:channels=16,model=sasrec

Arguments as in configs/default.py, plus ``channels`` (int, kept key channels per head;
default 0 = "auto": 60% of the key dimension, the paper's 40% pruning). Values are untouched,
so ThinK alone stays below 2x fewer bytes. Needs the model to return its last queries
(``Signals.window_queries``); a model that does not is refused with an error.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, channels=0)
  args = common.parse_arg(arg, channels=0)
  config.compressors[f"think_c{args.channels or 'auto'}"] = {
      "name": "think", "channels": args.channels or "auto"}
  return config
