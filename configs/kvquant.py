r"""Native memory vs KVQuant-style quantization (Hooper et al. 2024) at ``ratio``x fewer bytes.

  python -m malloc_jax.main --config configs/kvquant.py
  python -m malloc_jax.main --config configs/kvquant.py:ratio=8,model=sasrec
  python -m malloc_jax.main --config configs/kvquant.py:bits=3

Arguments as in configs/default.py, plus ``ratio`` (float, default 4: the code width is the
largest whose memory fits native / ratio) or ``bits`` (int 1..8, overrides ``ratio``). The
codebooks are fitted on ``eval.calibration_users`` validation histories; 1% outliers per
vector (the paper's setting) are kept exact.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, ratio=4.0, bits=0)
  args = common.parse_arg(arg, ratio=4.0, bits=0)
  if args.bits:
    config.compressors[f"kvquant_{args.bits}bit"] = {"name": "kvquant", "bits": args.bits}
  else:  # labelled like config_lib.method_config (ConfigDict keys have no dots)
    label = f"kvquant_{args.ratio:g}x".replace(".", "p")
    config.compressors[label] = {"name": "kvquant", "ratio": args.ratio}
  return config
