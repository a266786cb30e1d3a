r"""The benchmark sweep: methods x datasets x budgets x seeds, on one or more backbones.

  python -m malloc_jax.sweep --config configs/sweep.py:runlocal=True --workdir /tmp/sweep
  python -m malloc_jax.sweep --config configs/sweep.py:datasets=ml100k --workdir runs/sweep_ml100k
  python -m malloc_jax.sweep --config configs/sweep.py:datasets=syn1024 --workdir runs/sweep_syn1024
  python -m malloc_jax.sweep --config configs/sweep.py:models=hstu+hstu_gqa+hstu_rwkv --workdir ...
  python -m malloc_jax.report --workdir runs/sweep_ml100k --budget_bytes 40000
  python scripts/bench_sweep.py --workdir /tmp/bench_sweep   # the 2-core CPU recipe, timed

Arguments (comma-separated ``key=value``; list values are joined with ``+``):

* ``datasets`` (default ``synthetic+ml100k``): ``synthetic`` (the default 128-event
  generator), ``syn1024`` (1024-event histories of the ``topics`` generator, as
  configs/synthetic_long.py; the first 512 test users are scored), ``ml100k``
  (MovieLens 100K read from ``ml100k_path``), ``beauty`` (Amazon Beauty, ``beauty_path``).
  Labels are plain identifiers so that absl can override their fields.
* ``models`` (default ``hstu+sasrec``): backbones by name. Any name in
  ``malloc_jax.models.BACKBONES`` joins the sweep: for a trained variant such as
  ``hstu_gqa`` the model section comes from its own ``configs/<name>.py`` (``sasrec_gqa``
  from ``configs/hstu_gqa.py`` with ``model=sasrec``), else it is the dataset's model section
  with the name replaced. Variants run the methods in ``config.model_methods[name]``
  (argument ``variant_methods``, default ``native+recompute``; post-hoc methods can be added
  for cache variants).
* ``methods`` (default ``all``): labels of ``METHODS`` below (every registered method with
  a tuned parameter, from ``malloc_jax.compressors.specs()``, plus fixed settings and chains;
  Quest, MiniCache, ThinK and DuoAttention, which have no tuned parameter, at their
  ``configs/<name>.py`` defaults).
* ``ratios`` (default ``2+4+8``): memory reductions for the methods marked ``ratios``,
  resolved per model with ``compressors.budget.ratio_table`` (a ratio a method cannot reach
  is skipped and printed).
* ``seeds`` (default ``0``): training / initialization seeds (data stay the same).
* ``tasks`` (default ``retrieval``): ``retrieval``, ``ranking`` or ``retrieval+ranking``. A
  ranking cell serves the same memories to a backbone trained with ``task="ranking"`` (the
  dataset's run with ``config.ranking_task.<dataset>``'s train / eval fields: listwise loss,
  16 impressions per window, W_k = W_q at init, 10 uniform negatives plus every topic mate
  on ``topics`` data; see ``malloc_jax.sweep.run_ranking_cell``) and ranks each test user's
  candidates target-aware: AUC, GAUC, logloss, candidate NDCG@10 and the paired difference to
  native (SE and bootstrap CI, ``config.bootstrap``). ``recompute`` has no ranking cell.
* ``requests`` (default ``4+16``): r values of the streaming protocol.
* ``steps``, ``max_len``: override every dataset's training steps / history window.
* ``buckets``: ``train.length_buckets`` of every dataset (0: off): batches of users of
  similar lengths, trimmed to one of that many window widths (faster training on data with
  many short histories, such as MovieLens; see ``malloc_jax.train.fit``).
* ``ml100k_path``, ``beauty_path``: data files (relative paths are read from the current
  directory).
* ``runlocal``: a minutes-long smoke sweep: tiny shapes, 20 training steps and, unless given,
  datasets=synthetic, models=hstu, ratios=2, requests=2 and the methods ``RUNLOCAL_METHODS``.

Every field can also be overridden with absl syntax, e.g.
``--config.datasets.ml100k.train.steps=500`` or ``--config.costs.iters=50``.
"""

import importlib.util
from pathlib import Path

import ml_collections

from malloc_jax import config_lib as common
from malloc_jax.compressors import specs

ARGS = dict(datasets="synthetic+ml100k", models="hstu+sasrec", methods="all", ratios="2+4+8",
            seeds="0", requests="4+16", buckets=0, variant_methods="native+recompute",
            tasks="retrieval",
            ml100k_path="../shared/data/ml-100k/u.data",
            beauty_path="../shared/data/amazon-beauty/Beauty.txt")

_KIVI = {"group": "auto", "residual": "auto"}  # auto: largest divisor of Dv up to 32
# Every registered post-hoc method with a tuned parameter joins the ratio axis (a new method
# needs no line here); these run at fixed settings instead, or with a fixed extra parameter.
_FIXED_SETTINGS = ("kivi",)  # KIVI at 2 and 4 bits: its residual bounds the ratios it reaches
_EXTRA = {"snapkv": {"window": 8}}
METHODS = {
    "native": {"name": "native"},
    "recompute": {"name": "recompute"},
    **{name: {"name": name, "ratios": True, **_EXTRA.get(name, {})}
       for name, spec in specs().items() if spec.tuned and name not in _FIXED_SETTINGS},
    # Methods without a tuned parameter run at their configs/<name>.py defaults.
    "quest": {"name": "quest", "page": 16},
    "minicache": {"name": "minicache", "retain": 0.05, "t": 0.6, "start": 0},
    "think": {"name": "think", "channels": "auto"},
    "duoattention": {"name": "duoattention", "retrieval": 0.5, "sinks": 4, "recent": 64},
    "kivi2": {"name": "kivi", "bits": 2, **_KIVI},
    "kivi4": {"name": "kivi", "bits": 4, **_KIVI},
    "snapkv+kivi4": {"name": "chain", "steps": ({"name": "snapkv", "ratio": 2, "window": 8},
                                                {"name": "kivi", "bits": 4, **_KIVI})},
    "h2o+uniform8": {"name": "chain", "steps": ({"name": "h2o", "ratio": 4},
                                                {"name": "uniform", "bits": 8})},
    "streaming+kivi2": {"name": "chain", "steps": ({"name": "streaming", "ratio": 2},
                                                   {"name": "kivi", "bits": 2, **_KIVI})},
}
RUNLOCAL_METHODS = ("native", "recompute", "lowrank", "h2o", "snapkv", "kivi2",
                    "snapkv+kivi4")


def _dataset(label: str, args) -> ml_collections.ConfigDict:
  """The run config (data, model, train, eval) of one dataset."""
  base = f"runlocal={args.runlocal},steps={args.steps},max_len={args.max_len}"
  if label == "synthetic":
    return common.base_config(base)
  if label == "syn1024":
    c = common.base_config(base)
    if not args.runlocal:  # the regime where compression bites (configs/synthetic_long.py)
      c.data.max_len = 1024 if args.max_len <= 0 else args.max_len
      c.data.synthetic.update(num_users=2000, num_items=1000, min_len=900, max_len=1024,
                              lag=512, kind="topics", topic_size=10, p_copy=0.5, p_noise=0.05,
                              branching=2)
      c.train.update(steps=1500 if args.steps < 0 else args.steps, batch_size=32,
                     eval_every=250, eval_users=256)
      c.eval.update(batch_size=128, max_users=512)  # 512 test users: NDCG@10 s.e. ~0.015
    return c
  if label == "ml100k":
    return common.base_config(f"{base},data=ml-100k,path={args.ml100k_path}")
  if label == "beauty":
    return common.base_config(f"{base},data=sasrec,path={args.beauty_path}")
  raise ValueError(f"config argument datasets: {label!r} is unknown; expected labels from "
                   "synthetic, syn1024, ml100k, beauty")


def _ranking_task(run: ml_collections.ConfigDict, runlocal: bool) -> ml_collections.ConfigDict:
  """The train / eval fields a dataset's run takes for ``task="ranking"`` (sweep.task_run).

  The design that leaves the ranking plateau (BENCHMARKS.md, target-aware ranking): listwise
  softmax loss, ``rank_positions`` impressions per window in one M-FALCON pass, W_k = W_q at
  init; negatives 10 uniform plus, on synthetic ``topics`` data, every other member of the
  positive's topic (hard). Test impressions: the target's topic plus ``rank_easy`` items of
  other topics on ``topics`` data, else ``rank_negatives`` uniform items.
  """
  syn = run.data.synthetic
  topics = run.data.source == "synthetic" and syn.kind == "topics"
  hard = syn.topic_size - 1 if topics else 0
  return ml_collections.ConfigDict({
      "train": {"rank_loss": "listwise", "rank_positions": 4 if runlocal else 16,
                "rank_tied_qk": True, "rank_score_offset": 0.0, "bias_lr_scale": 1.0,
                "rank_negatives": {"uniform": 10, "popularity": 0, "hard": hard}},
      "eval": {"rank_easy": 10, "rank_negatives": 19}})


def _variant_section(name: str, data_arg: str, run: ml_collections.ConfigDict):
  """The model section of backbone ``name`` for a dataset (see the module docstring)."""
  base, _, suffix = name.partition("_")
  here = Path(__file__).resolve().parent
  for path, model in ((here / f"{name}.py", base), (here / f"hstu_{suffix}.py", base)):
    if suffix and base in ("hstu", "sasrec") and path.is_file():
      spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      arg = f"{data_arg},model={model}" if model != "hstu" else data_arg
      try:
        section = module.get_config(arg).model
      except ValueError:
        continue
      if section.name == name:
        return section
  section = ml_collections.ConfigDict(run.model.to_dict())
  section.name = name
  return section


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **ARGS)
  given = {part.split("=", 1)[0].strip() for part in (arg or "").split(",") if "=" in part}
  if args.runlocal:  # a smoke sweep: one dataset, one backbone, 2x, r = 2 (unless given)
    for key, value in (("datasets", "synthetic"), ("models", "hstu"), ("ratios", "2"),
                       ("requests", "2")):
      if key not in given:
        args[key] = value
  split = lambda s: [x for x in s.split("+") if x]
  c = ml_collections.ConfigDict()
  c.datasets = ml_collections.ConfigDict()
  data_args = {}
  for label in split(args.datasets):
    run = _dataset(label, args)
    run.compressors = ml_collections.ConfigDict({"native": {"name": "native"}})
    run.train.length_buckets = args.buckets
    c.datasets[label] = run
    data_args[label] = (f"runlocal={args.runlocal},steps={args.steps},max_len={args.max_len},"
                        f"data={run.data.source},path={run.data.path}")
  c.models = ml_collections.ConfigDict()
  c.model_methods = ml_collections.ConfigDict()
  for name in split(args.models):
    c.models[name] = ml_collections.ConfigDict()
    for label, run in c.datasets.items():
      if name == run.model.name:
        c.models[name][label] = ml_collections.ConfigDict(run.model.to_dict())
      else:
        c.models[name][label] = _variant_section(name, data_args[label], run)
    if name not in ("hstu", "sasrec"):
      c.model_methods[name] = args.variant_methods
  wanted = split(args.methods)
  if wanted == ["all"]:
    wanted = list(RUNLOCAL_METHODS if args.runlocal else METHODS)
  unknown = [m for m in wanted if m not in METHODS]
  if unknown:
    raise ValueError(f"config argument methods: {unknown} unknown; expected labels from "
                     f"{sorted(METHODS)} or 'all'")
  c.methods = ml_collections.ConfigDict({m: METHODS[m] for m in wanted})
  c.ratios = common.split_list("ratios", args.ratios, float, minimum=1.0)
  c.seeds = common.split_list("seeds", args.seeds, int, minimum=0)
  c.tasks = common.split_list("tasks", args.tasks, str)
  bad = [t for t in c.tasks if t not in ("retrieval", "ranking")]
  if bad:
    raise ValueError(f"config argument tasks: {bad} unknown; expected retrieval, ranking or "
                     "retrieval+ranking")
  c.ranking_task = ml_collections.ConfigDict(
      {label: _ranking_task(run, args.runlocal) for label, run in c.datasets.items()})
  # Paired bootstrap of every ranking cell against native (malloc_jax.stats.paired_bootstrap).
  c.bootstrap = ml_collections.ConfigDict(dict(resamples=1000, seed=0, level=0.95))
  c.stream_requests = common.split_list("requests", args.requests, int, minimum=1)
  c.ranking = ml_collections.ConfigDict(dict(num_negatives=20 if args.runlocal else 99, seed=0))
  # Each backbone's native caches of the eval users are kept for all its cells up to this
  # many bytes (else every cell prefills again; see sweep._Backbone.prefilled).
  c.prefill_cache_bytes = 4e9
  c.costs = ml_collections.ConfigDict(dict(warmup=1 if args.runlocal else 2,
                                           iters=3 if args.runlocal else 20))
  return c
