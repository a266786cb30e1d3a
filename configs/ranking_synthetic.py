r"""Target-aware ranking (``task="ranking"``) on synthetic ``topics`` histories.

  python -m malloc_jax.main --config configs/ranking_synthetic.py --workdir runs/rank_syn
  python -m malloc_jax.main --config configs/ranking_synthetic.py:runlocal=True \
      --workdir /tmp/rank_tiny

Each candidate item reads the user's memory (``model.rank``, M-FALCON); training draws
``rank_positions`` impressions per window, each the true next item against every other
member of its topic (hard negatives) and 10 uniform items, scored by a listwise softmax
cross-entropy, from W_k = W_q at init (``train.rank_tied_qk``): the design that leaves the
initial plateau (BENCHMARKS.md, target-aware ranking). SASRec by default (it learned on 2
CPU cores); ``:model=hstu`` is the issue's backbone, slower to learn: the recipe that
takes HSTU past the plateau at 512 events adds ``--config.train.rank_score_offset=-3
--config.train.bias_lr_scale=30`` (rab at -3 at init, rab tables at 30x the learning rate;
BENCHMARKS.md, HSTU at 512 events). The test
impressions are the target, its 9 topic mates and 10 items of other topics; the table has
AUC, GAUC, logloss and candidate NDCG@10 per compressor with the paired SE against native.
``scripts/ranking_table.py`` adds the Bayes-optimal and history-blind rows and every method
at 2x..32x.
"""

from malloc_jax import config_lib as common


def get_config(arg: str | None = None):
  config = common.base_config(arg, generator="topics", model="sasrec")
  args = common.parse_arg(arg, generator="topics", model="sasrec")
  config.task = "ranking"
  config.data.max_len = 256
  config.data.synthetic.update(num_users=2000, num_items=1000, min_len=230, max_len=256,
                               kind="topics", topic_size=10, p_copy=0.5, p_noise=0.05,
                               branching=2, lag=1)
  config.model.update(name=args.model, dim=32, heads=1, num_layers=1, dropout=0.0)
  config.train.update(steps=3000 if args.steps < 0 else args.steps, batch_size=16, lr=3e-3,
                      eval_every=500, eval_users=256, rank_loss="listwise", rank_positions=16,
                      rank_tied_qk=True, rank_score_offset=0.0, bias_lr_scale=1.0,
                      rank_negatives={"uniform": 10, "popularity": 0, "hard": 9})
  config.eval.update(batch_size=64, max_users=500, rank_easy=10, rank_negatives=19)
  config.compressors.streaming_8x = {"name": "streaming", "sinks": 4, "recent": 28}
  config.compressors.h2o_8x = {"name": "h2o", "heavy": 24, "recent": 8}
  if args.runlocal:
    config.data.synthetic.update(num_users=64, num_items=60, topic_size=6, min_len=24,
                                 max_len=32)
    config.data.max_len = 32
    config.model.update(dim=16)
    config.train.update(steps=20, batch_size=8, rank_positions=4, eval_every=10,
                        eval_users=32, checkpoint_every=10,
                        rank_negatives={"uniform": 2, "popularity": 0, "hard": 5})
    config.eval.update(batch_size=32, max_users=32)
    config.compressors.streaming_8x = {"name": "streaming", "sinks": 1, "recent": 3}
    config.compressors.h2o_8x = {"name": "h2o", "heavy": 3, "recent": 1}
  return config
