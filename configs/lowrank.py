r"""Native memory vs low-rank (PCA) memory at ``reduction``x fewer key/value numbers.

  python -m malloc_jax.main --config configs/lowrank.py
  python -m malloc_jax.main --config configs/lowrank.py:reduction=8,model=sasrec
  python -m malloc_jax.main --config configs/lowrank.py:ratio=8

Arguments as in configs/default.py, plus ``reduction`` (int, default 4) or ``rank`` (int), or
``ratio`` (float): the largest rank whose memory is ``ratio`` times smaller than the native
one in bytes (as every other method's config file).
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, reduction=4, rank=0, ratio=0.0)
  if args.ratio > 0:
    return common.method_config(arg, "lowrank", ratio=0.0, reduction=4, rank=0)
  config = common.base_config(arg, reduction=4, rank=0, ratio=0.0)
  config.compressors[f"lowrank_{args.reduction}x" if not args.rank else f"lowrank_r{args.rank}"] = {
      "name": "lowrank", "reduction": args.reduction, "rank": args.rank}
  return config
