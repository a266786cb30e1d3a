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
* ``methods`` (default ``all``): labels of ``METHODS`` below.
* ``ratios`` (default ``2+4+8``): memory reductions for the methods marked ``ratios``,
  resolved per model with ``compressors.budget.ratio_table`` (a ratio a method cannot reach
  is skipped and printed).
* ``seeds`` (default ``0``): training / initialization seeds (data stay the same).
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

ARGS = dict(datasets="synthetic+ml100k", models="hstu+sasrec", methods="all", ratios="2+4+8",
            seeds="0", requests="4+16", buckets=0, variant_methods="native+recompute",
            ml100k_path="../shared/data/ml-100k/u.data",
            beauty_path="../shared/data/amazon-beauty/Beauty.txt")

_KIVI = {"group": "auto", "residual": "auto"}  # auto: largest divisor of Dv up to 32
METHODS = {
    "native": {"name": "native"},
    "recompute": {"name": "recompute"},
    "lowrank": {"name": "lowrank", "ratios": True},
    "h2o": {"name": "h2o", "ratios": True},
    "snapkv": {"name": "snapkv", "window": 8, "ratios": True},
    "streaming": {"name": "streaming", "ratios": True},
    "random": {"name": "random", "ratios": True},
    "merge_evicted": {"name": "merge_evicted", "ratios": True},
    "intactkv": {"name": "intactkv", "ratios": True},
    "uniform": {"name": "uniform", "ratios": True},
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
  c.stream_requests = common.split_list("requests", args.requests, int, minimum=1)
  c.ranking = ml_collections.ConfigDict(dict(num_negatives=20 if args.runlocal else 99, seed=0))
  # Each backbone's native caches of the eval users are kept for all its cells up to this
  # many bytes (else every cell prefills again; see sweep._Backbone.prefilled).
  c.prefill_cache_bytes = 4e9
  c.costs = ml_collections.ConfigDict(dict(warmup=1 if args.runlocal else 2,
                                           iters=3 if args.runlocal else 20))
  return c
