r"""MovieLens 1M (one line per user, event index as time): the long-history benchmark.

  python -m malloc_jax.main --config configs/ml1m.py --workdir runs/ml1m_hstu_c200
  python -m malloc_jax.main --config configs/ml1m.py:model=sasrec --workdir runs/ml1m_sasrec_c200
  python -m malloc_jax.main --config configs/ml1m.py:capacity=1024 --workdir runs/ml1m_hstu_c1024
  python scripts/ml1m_table.py --config configs/ml1m.py --workdir runs/ml1m_hstu_c200 \
      --out runs/ml1m_hstu_c200/table.json
  python -m malloc_jax.main --config configs/ml1m.py:runlocal=True --workdir /tmp/ml1m_tiny

Protocol (issue 17): leave-one-out, full ranking over all 3,706 items (seen items stay
candidates), rank = items scored strictly higher. ``ml-1m.txt`` has no timestamps: the
``sasrec`` text parser stores each event's index within the user's line as its time.

Recipe (the published small ML-1M config of HSTU / SASRec): 2 layers, 50 dims, 1 head,
dropout 0.2, 128 sampled negatives drawn per user, temperature 0.05, AdamW lr 1e-3 (no
weight decay), batch 128 users. Early stopping on validation NDCG@10 over all validation users, evaluated once an
epoch (47 steps of 128 users), patience ``patience`` evaluations; the best-validation weights
are the ones served.

Arguments (``key=value``, comma separated; see ``malloc_jax/config_lib.py`` for the common
ones: model, steps, seed, runlocal, max_len):

* ``capacity`` (200): memory slots and training window. 200 is the published setting;
  1024 keeps all but 32 users' whole histories and turns on length bucketing
  (``train.length_buckets`` = 8) so training windows reach the served distances.
* ``path``: the ``ml-1m.txt`` file (default ``../shared/data/ml-1m/ml-1m.txt``).
* ``epochs`` (200): the step limit, in epochs; ``patience`` (10): evaluations (epochs)
  without a better validation NDCG@10 before stopping.
* ``eval_epochs`` (1): evaluate validation every this many epochs.
* ``test_users`` (0: all 6,040): score only the first so many test users.
* ``negatives`` ("user"): which predictions share a draw of the 128 negatives
  (``train.negative_sharing``: "batch", "user" or "position"; see
  ``train.sampled_softmax_loss``). "user" reaches the PyTorch reference (test NDCG@10 0.0926
  against 0.0927); "batch", one draw for the whole batch, plateaus at 0.0761 (BENCHMARKS.md).
* ``task`` ("retrieval"): ``ranking`` trains and serves the target-aware ranking task
  (``config.task = "ranking"``, M-FALCON): impressions of the true next item, ``hard``
  (9) other items of its primary genre and ``easy`` (10) uniform items of other genres
  (``data.genres``: ``movies.dat`` beside ``path``; ``genres`` overrides), loss
  ``rank_loss`` ("listwise" softmax over the impression, or "bce"), ``positions`` (8)
  impressions per training window in one pass; early stopping on validation GAUC. Usually
  with ``init`` (a converged retrieval model) and a small ``patience``:
  ``configs/ml1m.py:task=ranking,init=runs/ml1m_user,epochs=8,patience=3``.
* ``init`` (""): warm start (``train.init_from``): the best-validation weights of another
  training workdir, e.g. the capacity-200 model for a capacity-1024 run (its position tables
  grow: the farthest trained position fills the new ones; ``experiment.warm_start``).
"""

from pathlib import Path

from malloc_jax import config_lib as common

DEFAULT_PATH = "../shared/data/ml-1m/ml-1m.txt"
NUM_USERS = 6040


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, data="sasrec", capacity=200, epochs=200, patience=10,
                          eval_epochs=1, test_users=0, negatives="user", init="",
                          task="retrieval", genres="", rank_loss="listwise", positions=8,
                          hard=9, easy=10)
  path = args.path or DEFAULT_PATH
  base = (f"data=sasrec,path={path},model={args.model},seed={args.seed},"
          f"runlocal={args.runlocal}")
  c = common.base_config(base)
  c.data.max_len = args.capacity if args.max_len <= 0 else args.max_len
  c.model.update(dim=50, heads=1, num_layers=2, dropout=0.2, temperature=0.05)
  steps_per_epoch = NUM_USERS // 128
  c.train.update(batch_size=128, lr=1e-3, weight_decay=0.0, num_negatives=128,
                 steps=args.epochs * steps_per_epoch, eval_every=args.eval_epochs * steps_per_epoch,
                 checkpoint_every=args.eval_epochs * steps_per_epoch, patience=args.patience,
                 eval_users=0, log_every=steps_per_epoch,
                 length_buckets=8 if c.data.max_len > 256 else 0,
                 negative_sharing=args.negatives)
  if args.init:  # absent otherwise: existing workdirs' train_config.json stay comparable
    c.train.init_from = args.init
  c.eval.update(batch_size=128 if c.data.max_len > 256 else 256, max_users=args.test_users,
                calibration_users=512)
  if args.task == "ranking":  # absent otherwise: retrieval workdirs' train_config.json unchanged
    common.set_ranking_task(c, args.genres or str(Path(path).with_name("movies.dat")),
                            loss=args.rank_loss, positions=args.positions, hard=args.hard,
                            easy=args.easy)
  elif args.task != "retrieval":
    raise ValueError(f"config argument task={args.task!r}: expected retrieval or ranking")
  if args.runlocal:  # seconds: a few steps on the first users' windows of 32
    c.data.max_len = min(c.data.max_len, 32)
    c.model.update(dim=16)
    c.train.update(steps=6, batch_size=16, num_negatives=16, eval_every=3, checkpoint_every=3,
                   eval_users=64, log_every=3, patience=2, length_buckets=2)
    c.eval.update(batch_size=32, max_users=args.test_users or 64, calibration_users=32)
    if args.task == "ranking":
      c.train.update(rank_positions=min(args.positions, 2))
  if args.steps >= 0:
    c.train.steps = args.steps
  return c
