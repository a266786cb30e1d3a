r"""MovieLens 100K, target-aware ranking (``task="ranking"``), genres from ``u.item``.

  python scripts/ml1m_table.py --config configs/ml100k_ranking.py:init=runs/ml100k_user \
      --workdir runs/ml100k_rank --out ml100k_rank.json
  python -m malloc_jax.main --config configs/ml100k_ranking.py:runlocal=True --workdir /tmp/r

The ML-100K recipe of BENCHMARKS.md (``configs/default.py:data=ml-100k,negatives=user``:
HSTU, 2 layers, 50 dims, 200 events, batch 128, AdamW 1e-3) turned into the ranking task
(``config_lib.set_ranking_task``): each training window gives ``positions`` (8) impressions
of the true next item against ``hard`` (9) other items of its primary genre (the first
flagged genre of ``u.item``) and ``easy`` (10) uniform items, ``rank_loss`` ("listwise");
test impressions are the target, 9 items of its primary genre and 10 of other genres. Early
stopping on validation GAUC every ``eval_steps`` (25) steps, ``patience`` (3); ``steps``
(default 150) caps the fine-tune; ``init`` warm-starts from a retrieval workdir of the same
model (``train.init_from``).

Arguments (``key=value``, comma separated): model, seed, steps, runlocal, path (``u.data``,
default ``../shared/data/ml-100k/u.data``), genres (default ``u.item`` beside it), init,
rank_loss, positions, hard, easy, patience, eval_steps, test_users.
"""

from pathlib import Path

from malloc_jax import config_lib as common

DEFAULT_PATH = "../shared/data/ml-100k/u.data"


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, data="ml-100k", init="", genres="", rank_loss="listwise",
                          positions=8, hard=9, easy=10, patience=3, eval_steps=25,
                          test_users=0)
  path = args.path or DEFAULT_PATH
  c = common.base_config(f"data=ml-100k,path={path},model={args.model},seed={args.seed},"
                         f"runlocal={args.runlocal},negatives=user")
  c.train.update(steps=150, eval_every=args.eval_steps, checkpoint_every=args.eval_steps,
                 patience=args.patience, log_every=args.eval_steps)
  if args.init:
    c.train.init_from = args.init
  common.set_ranking_task(c, args.genres or str(Path(path).with_name("u.item")),
                          loss=args.rank_loss, positions=args.positions, hard=args.hard,
                          easy=args.easy)
  c.eval.update(max_users=args.test_users)
  if args.runlocal:
    c.train.update(rank_positions=min(args.positions, 2), eval_every=10, checkpoint_every=10,
                   log_every=10)
    c.eval.update(max_users=args.test_users or 64)
  if args.steps >= 0:
    c.train.steps = args.steps
  return c
