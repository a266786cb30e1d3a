"""Start-up validation of a run config: every bad value is named before any work starts."""

from __future__ import annotations

import math
import re

from malloc_jax.models import BACKBONES

SYNTHETIC_KINDS = ("lag", "topics")
SOURCES = ("synthetic", "ml-100k", "ml-1m", "recbole", "sasrec")
LOADERS = ("raw", "tfds")


def _fail(field: str, value, expected: str):
  raise ValueError(f"config.{field}={value!r}: expected {expected}")


def _int(config, field: str, lo: int | None = None, hi: int | None = None):
  node = config
  for part in field.split("."):
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, int):
    _fail(field, node, "an integer")
  if lo is not None and node < lo:
    _fail(field, node, f"an integer >= {lo}")
  if hi is not None and node > hi:
    _fail(field, node, f"an integer <= {hi}")
  return node


def _num(config, field: str, lo: float, hi: float | None = None, open_lo: bool = False):
  node = config
  for part in field.split("."):
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, int | float):
    _fail(field, node, "a number")
  if not math.isfinite(node):
    _fail(field, node, "a finite number")
  if node < lo or (open_lo and node == lo) or (hi is not None and node > hi):
    _fail(field, node, f"a number in {'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}]")
  return node


def validate_config(config) -> None:
  """Raises ValueError naming the first invalid field of ``config``."""
  for section in ("data", "model", "train", "eval", "compressors"):
    if section not in config:
      _fail(section, None, f"a '{section}' section")
  _int(config, "seed", 0)
  if "num_devices" in config:
    _int(config, "num_devices", 0)
  d = config.data
  if d.source not in SOURCES:
    _fail("data.source", d.source, f"one of {SOURCES}")
  if d.source != "synthetic" and not d.path:
    _fail("data.path", d.path, f"the path of the {d.source} file")
  loader = d.get("loader", "raw")
  if loader not in LOADERS:
    _fail("data.loader", loader, f"one of {LOADERS}")
  if loader == "tfds" and d.source == "synthetic":
    _fail("data.loader", loader, "'raw' for data.source='synthetic' (tfds prepares raw files)")
  if not isinstance(d.get("data_dir", ""), str):
    _fail("data.data_dir", d.data_dir, "a directory path string ('' for the TFDS default)")
  genres = d.get("genres", "")
  if not isinstance(genres, str):
    _fail("data.genres", genres, "the path of a movies.dat / u.item genre file, or ''")
  if genres and d.source == "synthetic":
    _fail("data.genres", genres, "'' for synthetic data (its topics are the groups)")
  max_len = _int(config, "data.max_len", 2)
  _int(config, "data.min_events", 3)
  if d.source == "synthetic":
    for f in ("num_users", "num_items", "min_len", "max_len", "lag", "branching"):
      _int(config, f"data.synthetic.{f}", 1)
    if d.synthetic.get("kind", "lag") not in SYNTHETIC_KINDS:
      _fail("data.synthetic.kind", d.synthetic.kind, f"one of {SYNTHETIC_KINDS}")
    if "topic_size" in d.synthetic:
      _int(config, "data.synthetic.topic_size", 2)
    _num(config, "data.synthetic.p_copy", 0.0, 1.0)
    _num(config, "data.synthetic.p_noise", 0.0, 1.0)
  m = config.model
  if m.name not in BACKBONES:
    _fail("model.name", m.name, f"one of {sorted(BACKBONES)}")
  dim = _int(config, "model.dim", 1)
  heads = _int(config, "model.heads", 1)
  if dim % heads:
    _fail("model.heads", heads, f"a divisor of model.dim={dim}")
  _int(config, "model.num_layers", 1)
  _num(config, "model.dropout", 0.0, 0.99)
  _num(config, "model.temperature", 0.0, None, open_lo=True)
  t = config.train
  steps = _int(config, "train.steps", 0)
  _int(config, "train.batch_size", 1)
  _num(config, "train.lr", 0.0, None, open_lo=True)
  _num(config, "train.weight_decay", 0.0)
  _int(config, "train.num_negatives", 0)  # 0: full softmax
  sharing = config.train.get("negative_sharing", "batch")
  if sharing not in ("batch", "user", "position"):
    raise ValueError(f"config.train.negative_sharing={sharing!r}: expected 'batch', 'user' "
                     "or 'position'")
  if "length_buckets" in config.train:
    _int(config, "train.length_buckets", 0)
  _int(config, "train.log_every", 1)
  _int(config, "train.checkpoint_every", 1)
  _int(config, "train.eval_every", 0, None)
  _int(config, "train.patience", 0)
  del steps, t
  e = config.eval
  if e.split not in ("valid", "test"):
    _fail("eval.split", e.split, "'valid' or 'test'")
  _int(config, "eval.batch_size", 1)
  _int(config, "eval.query_len", 1, max_len)
  _int(config, "eval.window", 1, max_len)
  _int(config, "eval.max_users", 0)
  _int(config, "eval.calibration_users", 1)
  if not e.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in e.ks):
    _fail("eval.ks", tuple(e.ks), "positive integers")
  _check_reported_ks(e.ks)
  _check_more_ranges(config)
  _validate_compressors(config, max_len)


def _check_more_ranges(config) -> None:
  """Fields that otherwise give wrong data or fail late without naming themselves."""
  if "eval_users" in config.train:
    _int(config, "train.eval_users", 0)  # 0: every validation user
  if config.data.source != "synthetic":
    return
  syn = config.data.synthetic
  if syn.min_len > syn.max_len:
    _fail("data.synthetic.min_len", syn.min_len,
          f"at most data.synthetic.max_len={syn.max_len}")
  if "zipf" in syn:
    _num(config, "data.synthetic.zipf", -float("inf"))  # NaN would draw one item only
  if "mean_gap" in syn:
    gap = _num(config, "data.synthetic.mean_gap", 0.0, None, open_lo=True)
    if gap * syn.max_len >= 2**27:  # event times must fit the model's int32 time axis
      _fail("data.synthetic.mean_gap", gap, f"a number with mean_gap * data.synthetic.max_len "
            f"({syn.max_len}) below 2**27 seconds (event times are int32)")


def _check_reported_ks(ks) -> None:
  """The tables, early stopping and the sweep report HR@10 / NDCG@10, so ks must hold 10."""
  if 10 not in tuple(ks):
    _fail("eval.ks", tuple(ks), "positive integers including 10 (the result tables, early "
          "stopping and the sweep report HR@10 and NDCG@10)")


def _validate_compressors(config, max_len: int) -> None:
  """Every compressor entry against the registry's spec, at the config's cache shape."""
  from malloc_jax.compressors import budget, registry

  if not config.compressors:
    _fail("compressors", {}, "at least one compressor")
  m = config.model
  head_dim = m.dim // m.heads
  cache = budget.cache_spec(m.num_layers, m.heads, max_len, head_dim)
  shape = registry.CacheShape.of(cache)
  names = sorted(registry.specs())
  for label, spec in config.compressors.items():
    field = f"compressors.{label}"
    if "name" not in spec:
      _fail(field, spec.to_dict(), "a 'name' entry")
    if spec.name not in names:
      _fail(f"{field}.name", spec.name, f"one of {names}")
    params = spec.to_dict()
    name = params.pop("name")
    try:
      registry.check_params(name, budget.resolve_params(name, params, cache), shape)
    except (TypeError, ValueError) as err:  # "<method>: <param>=<value> ..." names the field
      named = re.match(r"\w+: (\w+)=", str(err))
      where = f"{field}.{named.group(1)}" if named else field
      raise ValueError(f"config.{where}: {err}") from None
