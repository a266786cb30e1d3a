r"""Native memory vs a DuoAttention-style head split (Xiao et al. 2024), post-hoc.

  python -m malloc_jax.main --config configs/duoattention.py
  python -m malloc_jax.main --config configs/duoattention.py:retrieval=0.25,recent=32

Arguments as in configs/default.py, plus ``retrieval`` (float, default 0.5: fraction of
(layer, head) pairs kept whole, chosen on ``eval.calibration_users`` validation users by the
attention share outside the window), ``sinks`` (int, default 4) and ``recent`` (int, default
64) for the streaming heads. Heads are scored from attention, not by the paper's optimised
gates.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, retrieval=0.5, sinks=4, recent=64)
  args = common.parse_arg(arg, retrieval=0.5, sinks=4, recent=64)
  config.compressors[f"duo_r{round(args.retrieval * 100)}pct"] = {
      "name": "duoattention", "retrieval": args.retrieval, "sinks": args.sinks,
      "recent": args.recent}
  return config
