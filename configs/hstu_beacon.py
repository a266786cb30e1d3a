r"""HSTU with Activation Beacon: every ``chunk`` events are condensed into ``beacons`` learned
beacon tokens, whose keys and values are all that is stored for the chunk.

  python -m malloc_jax.main --config configs/hstu_beacon.py
  python -m malloc_jax.main --config configs/hstu_beacon.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_beacon.py:chunk=32,beacons=4

Arguments as in configs/default.py, plus ``chunk`` (int, default 0: data.max_len // 8) and
``beacons`` (int, default 2).

References: Zhang et al., "Long Context Compression with Activation Beacon", 2024.
"""

from malloc_jax import config_lib as common

EXTRA = dict(chunk=0, beacons=2)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_beacon"
  config.model.chunk = args.chunk or max(1, config.data.max_len // 8)
  config.model.beacons = args.beacons
  return config
