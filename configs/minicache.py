r"""Native memory vs MiniCache (Liu et al. 2024): adjacent layer pairs merged per event.

  python -m malloc_jax.main --config configs/minicache.py
  python -m malloc_jax.main --config configs/minicache.py:retain=0.1,model=sasrec

Arguments as in configs/default.py, plus ``retain`` (float, default 0.05: fraction of each
row's events kept unmerged), ``t`` (float, default 0.6: SLERP weight) and ``start`` (int,
default 0: first merged layer). A fixed memory, below 2x fewer bytes on its own (1.75x on the
published 2-layer, 50-dim shape at retain 0.05); chain it after an eviction for more.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, retain=0.05, t=0.6, start=0)
  args = common.parse_arg(arg, retain=0.05, t=0.6, start=0)
  config.compressors[f"minicache_r{round(args.retain * 100)}pct"] = {
      "name": "minicache", "retain": args.retain, "t": args.t, "start": args.start}
  return config
