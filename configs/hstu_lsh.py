r"""HSTU with Reformer-style LSH attention: each event attends only to earlier events hashed
into the same bucket (shared query/key, random-rotation hashing).

  python -m malloc_jax.main --config configs/hstu_lsh.py
  python -m malloc_jax.main --config configs/hstu_lsh.py:runlocal=True
  python -m malloc_jax.main --config configs/hstu_lsh.py:num_buckets=8,num_hashes=2

Arguments as in configs/default.py, plus ``num_buckets`` (int, even, default 4) and
``num_hashes`` (int, default 1).

References: Kitaev et al., "Reformer: The Efficient Transformer", ICLR 2020.
"""

from malloc_jax import config_lib as common

EXTRA = dict(num_buckets=4, num_hashes=1)


def get_config(arg: str | None = None):
  config = common.base_config(arg, **EXTRA)
  args = common.parse_arg(arg, **EXTRA)
  if args.model != "hstu":
    raise ValueError(f"config argument model={args.model!r}: this config is an HSTU variant; "
                     "expected hstu")
  config.model.name = "hstu_lsh"
  config.model.num_buckets = args.num_buckets
  config.model.num_hashes = args.num_hashes
  return config
