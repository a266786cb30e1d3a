"""Shared pieces of the ml_collections config files in ``configs/`` (big_vision style).

A config file's ``get_config(arg)`` receives the text after the colon of
``--config configs/x.py:key=value,key=value`` and parses it with :func:`parse_arg`, which
converts each value to the type of its default and rejects unknown keys.
"""

from __future__ import annotations

import math

import ml_collections

ARG_DEFAULTS = dict(model="hstu", steps=-1, data="synthetic", path="", runlocal=False,
                    seed=0, max_len=-1, loader="raw", data_dir="", negatives="batch")
# Smallest value an argument may be given (its default may be a "not given" sentinel below).
ARG_MINIMUM = dict(steps=0, max_len=2, seed=0)
# Arguments that only mean something for data files (data != "synthetic").
FILE_ONLY_ARGS = ("path", "loader", "data_dir")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x"`` into a ConfigDict typed like ``ARG_DEFAULTS`` plus ``defaults``."""
  spec = dict(ARG_DEFAULTS, **defaults)
  out = dict(spec)
  given = set()
  for part in filter(None, (arg or "").split(",")):
    if "=" not in part:
      raise ValueError(f"config argument {part!r}: expected key=value")
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in spec:
      raise ValueError(f"config argument {key!r} is unknown; expected one of {sorted(spec)}")
    kind = type(spec[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = kind(value)
    except ValueError:
      raise ValueError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
    given.add(key)
  _check_given(out, spec, given)
  return ml_collections.ConfigDict(out)


def given_args(arg: str | None) -> set[str]:
  """The keys given in a config argument (``"ratio=8,runlocal=True"`` -> {ratio, runlocal})."""
  return {part.split("=", 1)[0].strip() for part in (arg or "").split(",") if "=" in part}


def _check_given(out: dict, spec: dict, given: set[str]) -> None:
  """Rejects given arguments that would otherwise be ignored silently.

  A value equal to the default (``steps=-1``, ``path=``) means "not given" and passes.
  """
  for key, lo in ARG_MINIMUM.items():
    if key in given and out[key] < lo and out[key] != spec[key]:
      raise ValueError(f"config argument {key}={out[key]}: expected an integer >= {lo} "
                       f"({spec[key]}: the config's default)")
  if out.get("data") == "synthetic":
    for key in FILE_ONLY_ARGS:
      if key in given and out[key] != spec[key]:
        raise ValueError(f"config argument {key}={out[key]!r} is only used with a data file "
                         "(data=ml-100k, ml-1m, recbole or sasrec), not data=synthetic")


def split_list(arg: str, value: str, kind: type = str, minimum=None) -> tuple:
  """Parses a ``+``-joined list argument (``ratios=2+4+8``), naming the argument on error."""
  out = []
  for x in filter(None, value.split("+")):
    try:
      v = kind(x)
    except ValueError:
      what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
      raise ValueError(f"config argument {arg}={value!r}: {x!r} is not {what}; expected "
                       "values joined with '+'") from None
    if kind is float and not math.isfinite(v):
      raise ValueError(f"config argument {arg}={value!r}: {x!r} is not finite")
    if minimum is not None and v < minimum:
      raise ValueError(f"config argument {arg}={value!r}: {x!r} is below {minimum}")
    out.append(v)
  return tuple(out)


def base_config(arg: str | None = None, **extra_defaults) -> ml_collections.ConfigDict:
  """The common run config; ``extra_defaults`` declares a config file's own arguments."""
  args = parse_arg(arg, **extra_defaults)
  c = ml_collections.ConfigDict()
  c.seed = args.seed
  c.num_devices = 0  # data-parallel over this many devices (0: all; see malloc_jax.parallel)
  c.data = ml_collections.ConfigDict(dict(
      source=args.data, path=args.path, max_len=128, min_events=3,
      loader=args.loader, data_dir=args.data_dir,  # "raw" | "tfds"; TFDS default dir if ""
      synthetic=dict(num_users=2000, num_items=1000, min_len=96, max_len=128, lag=80,
                     p_copy=0.3, p_noise=0.1, branching=4, zipf=1.0, mean_gap=3600.0,
                     seed=args.seed, kind="lag", topic_size=20)))
  c.model = ml_collections.ConfigDict(dict(
      name=args.model, dim=64, heads=2, num_layers=2, dropout=0.1, temperature=0.05))
  c.train = ml_collections.ConfigDict(dict(
      steps=250, batch_size=64, lr=1e-3, weight_decay=0.0, num_negatives=128, log_every=50,
      checkpoint_every=200, eval_every=200, eval_users=512, patience=0,
      length_buckets=0,  # > 1: batch users of similar lengths, trim windows (train.fit)
      negative_sharing=args.negatives))  # who shares a draw of negatives (see
  # train.sampled_softmax_loss): "batch" | "user" | "position"
  c.eval = ml_collections.ConfigDict(dict(
      split="test", batch_size=256, ks=(10, 50, 200), query_len=1, window=8, max_users=0,
      calibration_users=512))
  c.compressors = ml_collections.ConfigDict({"native": {"name": "native"}})
  if args.data != "synthetic":  # the published small config of HSTU / SASRec on MovieLens
    c.data.max_len = 200
    c.model.update(dim=50, heads=1, dropout=0.2)
    c.train.update(steps=3000, batch_size=128, eval_every=250, patience=4, eval_users=0)
  if args.runlocal:
    c.data.synthetic.update(num_users=64, num_items=50, min_len=24, max_len=32, lag=12)
    c.data.max_len = 32
    c.model.update(dim=16, heads=2)
    c.train.update(steps=20, batch_size=16, num_negatives=16, log_every=10,
                   checkpoint_every=10, eval_every=10, eval_users=32)
    c.eval.update(batch_size=32, calibration_users=32)
  if args.steps >= 0:
    c.train.steps = args.steps
  if args.max_len > 0:
    c.data.max_len = args.max_len
  return c


def set_ranking_task(c: ml_collections.ConfigDict, genres: str, *, loss: str = "listwise",
                     positions: int = 8, hard: int = 9, easy: int = 10) -> None:
  """Turns a real-data run config into the target-aware ranking task, in place.

  ``task = "ranking"``; item groups are the primary genres of ``genres`` (``data.genres``: a
  MovieLens ``movies.dat`` or ML-100K ``u.item``); each training window gives ``positions``
  impressions of the true next item against ``hard`` other items of its genre and ``easy``
  uniform items (``train.rank_negatives``), scored by ``loss`` ("listwise" | "bce");
  evaluation impressions are the target, ``hard`` genre mates and ``easy`` items of other
  genres (``eval.rank_hard`` / ``eval.rank_easy``). Validation (early stopping) is GAUC.
  """
  c.task = "ranking"
  c.data.genres = genres
  c.train.update(rank_loss=loss, rank_positions=positions, rank_score_offset=0.0,
                 bias_lr_scale=1.0,
                 rank_negatives={"uniform": easy, "popularity": 0, "hard": hard})
  c.eval.update(rank_hard=hard, rank_easy=easy)


def method_config(arg: str | None, method: str, ratio: float = 4.0,
                  runlocal_ratio: float | None = None,
                  **method_args) -> ml_collections.ConfigDict:
  """The run config of ``configs/<method>.py``: native vs ``method`` at ``ratio``x fewer bytes.

  Args:
    arg: the config argument (``ratio=8,data=ml-100k,path=...``, plus the common keys of
      :data:`ARG_DEFAULTS` and the method's own ``method_args``).
    method: a registered compressor (``malloc_jax.compressors.specs()``).
    ratio: default memory reduction; the method's tuned parameter is chosen for the model's
      cache shape when the run starts (``compressors.resolve_params``). 0: no ratio, the
      method's arguments are used as they are.
    runlocal_ratio: the default ratio under ``runlocal=True`` (tiny shapes), if different.
    **method_args: the method's fixed parameters with their defaults (typed by them).

  Returns:
    ``base_config`` with ``compressors = {native, <method>_<ratio>x}``.
  """
  config = base_config(arg, ratio=float(ratio), **method_args)
  args = parse_arg(arg, ratio=float(ratio), **method_args)
  if args.runlocal and runlocal_ratio is not None and "ratio" not in given_args(arg):
    args.ratio = float(runlocal_ratio)
  # A default of "auto" makes the argument a string: numbers given for it become ints.
  value = lambda v: int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v
  entry = {"name": method, **{k: value(args[k]) for k in method_args}}
  label = method
  if args.ratio > 0:
    entry["ratio"] = args.ratio
    label = f"{method}_{args.ratio:g}x".replace(".", "p")  # ConfigDict keys have no dots
  config.compressors[label] = entry
  return config
