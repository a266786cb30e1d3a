r"""Native memory vs a DuoAttention-style head split (Xiao et al. 2024), post-hoc.

  python -m malloc_jax.main --config configs/duoattention.py
  python -m malloc_jax.main --config configs/duoattention.py:retrieval=0.25,recent=32
  python -m malloc_jax.main --config configs/duoattention.py:runlocal=True --workdir /tmp/duo

Arguments as in configs/default.py, plus ``retrieval`` (float, default 0.5: fraction of
(layer, head) pairs kept whole, chosen on ``eval.calibration_users`` validation users by the
attention share outside the window), ``sinks`` (int, default 4) and
``recent`` (int, default 64; 8 with ``runlocal``, whose histories hold 32 events) for the
streaming heads. Heads are scored from attention, not by the paper's optimised gates.
"""

from malloc_jax import config_lib as common

DEFAULTS = dict(retrieval=0.5, sinks=4, recent=64)
RUNLOCAL_DEFAULTS = dict(recent=8)  # within the runlocal capacity (max_len 32)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **DEFAULTS)
  args = common.parse_arg(arg, **DEFAULTS)
  if args.runlocal:
    given = common.given_args(arg)
    args.update({k: v for k, v in RUNLOCAL_DEFAULTS.items() if k not in given})
  config.compressors[f"duo_r{round(args.retrieval * 100)}pct"] = {
      "name": "duoattention", "retrieval": args.retrieval, "sinks": args.sinks,
      "recent": args.recent}
  return config
