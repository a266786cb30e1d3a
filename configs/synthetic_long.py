r"""Long histories (1024 events) on synthetic data: the regime where memory compression bites.

  python -m malloc_jax.main --config configs/synthetic_long.py
  python scripts/posthoc_table.py --config configs/synthetic_long.py --workdir runs/syn1024

The next event repeats the one ``lag`` = 512 steps back with probability 0.3, so a memory
that keeps only recent events loses those targets. Sized for an accelerator; on 2 CPU cores
training takes tens of minutes.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg)
  args = common.parse_arg(arg)
  config.data.max_len = 1024
  config.data.synthetic.update(num_users=2000, num_items=1000, min_len=900, max_len=1024,
                               lag=512)
  config.train.update(steps=1500 if args.steps < 0 else args.steps, batch_size=32,
                      eval_every=250, eval_users=256)
  config.eval.batch_size = 128
  config.compressors.lowrank_4x = {"name": "lowrank", "reduction": 4, "rank": 0}
  return config
