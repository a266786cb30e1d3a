r"""Long histories (1024 events) on synthetic data: the regime where memory compression bites.

  python -m malloc_jax.main --config configs/synthetic_long.py
  python scripts/posthoc_table.py --config configs/synthetic_long.py --workdir runs/syn1024

The ``topics`` generator (see ``malloc_jax/data/synthetic.py``): 1,000 items in 100 hidden
topics of 10; the next topic follows a global Markov chain on the last event's topic, and
each user picks their own preferred item of a topic half of the time. The preference is
only visible in the user's earlier visits to that topic (about 10 in 1,024 events, spread
over the whole history), so a memory that keeps only the recent eighth of the history loses
it: the Bayes-optimal predictor drops from NDCG@10 0.55 with the full history to 0.40 with
the last 128 events (``tests/test_metrics_data.py`` checks this gap on a smaller sample).
``:generator=lag`` selects the older position-addressed lag-512 copy instead.

On 2 CPU cores pass ``:steps=150`` or so; the full 600 steps are sized for an accelerator.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, generator="topics")
  args = common.parse_arg(arg, generator="topics")
  config.data.max_len = 1024
  config.data.synthetic.update(num_users=2000, num_items=1000, min_len=900, max_len=1024,
                               lag=512, kind=args.generator)
  if args.generator == "topics":
    config.data.synthetic.update(topic_size=10, p_copy=0.5, p_noise=0.05, branching=2)
  config.train.update(steps=600 if args.steps < 0 else args.steps, batch_size=16,
                      eval_every=100, eval_users=256)
  config.eval.batch_size = 64
  config.compressors.lowrank_4x = {"name": "lowrank", "reduction": 4, "rank": 0}
  return config
