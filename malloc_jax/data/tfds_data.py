"""TFDS data pipeline: raw interaction files prepared once into ArrayRecord, read with grain.

A TFDS builder, :class:`MallocInteractions`, runs the raw-file parser of
:mod:`malloc_jax.data.parsers` once and writes one record per user,
``{"index", "user", "items", "ts"}`` (the user's events in time order), into ArrayRecord files
under ``data_dir``. Nothing here downloads: the raw file comes from the configured path.

* **No TensorFlow.** TFDS (>= 4.9) prepares ArrayRecord and reads it back through
  ``tfds.data_source`` with its own example protos; ``tensorflow`` is never imported.
* **Prepared once.** The builder config is named ``<format>-min<min_events>-<sha256 prefix of
  the raw file(s)>``, so a second call finds the prepared directory
  ``data_dir/malloc_interactions/<config>/<version>`` and reuses it, while an edited raw file
  or another ``min_events`` is prepared anew. TFDS writes into a sibling
  ``incomplete.*`` directory and renames it only when every file is written, so a crashed
  preparation is never mistaken for a finished one; the next call starts over.
* **Same order.** Records keep the parser's user order (``disable_shuffling``; the ``index``
  field is checked on reading), so :func:`load_dataset` rebuilds exactly the
  :class:`~malloc_jax.data.dataset.SequenceDataset` of the raw path and training from either
  gives the same metrics with the same seed.
* **grain.** :func:`train_batches` is a ``grain.MapDataset`` over the records: shuffled by a
  seed (a new order each epoch), cut to leave-one-out training windows, padded to the static
  length ``max_len + 1`` and batched; each element is ``(items, ts, length)`` like
  :func:`malloc_jax.train.get_batch`.

Usage::

  builder = prepare("ml-100k", "../shared/data/ml-100k", data_dir="/tmp/tfds")
  data = load_dataset(builder, max_len=200, name="ml-100k:ml-100k")
  batches = train_batches(builder, max_len=200, batch_size=128, seed=0)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from malloc_jax.data import parsers
from malloc_jax.data.dataset import SequenceDataset, build_dataset

__all__ = [
  "MallocInteractions",
  "config_name",
  "load_dataset",
  "prepare",
  "raw_fingerprint",
  "read_sequences",
  "train_batches",
  "train_window",
]

_SPLIT = "train"  # one split: the per-user sequences (leave-one-out is applied on reading)


def raw_fingerprint(path: str | Path) -> str:
  """SHA-256 (first 16 hex digits) of the raw input at ``path``.

  Args:
    path: the raw file, or a directory; for a directory every regular file directly inside it
      is hashed (with its name), a superset of what any parser reads from it.

  Returns:
    The hex digest prefix.
  """
  p = Path(path).expanduser()
  if p.is_dir():
    files = sorted(f for f in p.iterdir() if f.is_file())
  elif p.is_file():
    files = [p]
  else:
    raise FileNotFoundError(f"{p}: no such file or directory (the raw data path)")
  h = hashlib.sha256()
  for f in files:
    h.update(f.name.encode() + b"\0")
    with f.open("rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def config_name(format: str, path: str | Path, min_events: int) -> str:
  """The builder config naming one prepared raw input: ``<format>-min<k>-<fingerprint>``."""
  if format not in parsers.FORMATS:
    raise ValueError(f"unknown data format {format!r}; expected one of "
                     f"{', '.join(repr(f) for f in parsers.FORMATS)}")
  return f"{format}-min{min_events}-{raw_fingerprint(path)}"


class MallocInteractions(tfds.core.GeneratorBasedBuilder):
  """Per-user event sequences of one raw interaction file, as ArrayRecord.

  Any config name is accepted (see :func:`config_name`); preparing needs ``format`` and
  ``path``, reading an already prepared config (e.g. through ``tfds.data_source``) does not.

  Records (one per user, in the parser's user order):
    index: int64 position of the user (0..U-1).
    user: the original user id, as text.
    items: [n] int32 dense item ids 1..V in time order.
    ts: [n] int64 event times.

  Metadata (``info.metadata``): format, raw path, fingerprint, min_events, num_items,
  num_users, num_events, ts_min and ts_max (the earliest and latest event times) and skipped
  (the parser's filter counts).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Per-user sequences {index, user, items, ts}."}

  def __init__(self, *, format: str | None = None, path: str | Path | None = None,
               min_events: int = 3, **kwargs):
    self._raw_format = format
    self._raw_path = None if path is None else Path(path).expanduser()
    self._min_events = min_events
    super().__init__(**kwargs)

  @classmethod
  def get_builder_config(cls, name, version=None):
    """Every name is a valid config: the config only names the prepared raw input."""
    return (super().get_builder_config(name, version)
            or tfds.core.BuilderConfig(name=name, description="a prepared raw input"))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Per-user interaction sequences parsed from a raw file.",
        features=tfds.features.FeaturesDict({
            "index": np.int64,
            "user": tfds.features.Text(),
            "items": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "ts": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)  # keep the parser's user order

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing downloads: the raw file is local
    if self._raw_format is None or self._raw_path is None:
      raise ValueError(f"{self.name}/{self.builder_config.name} is not prepared under "
                       f"{self.data_dir}; pass format= and path= to prepare it")
    inter = parsers.load(self._raw_format, self._raw_path, min_events=self._min_events)
    self.info.metadata.update(
        format=self._raw_format, path=str(self._raw_path),
        fingerprint=raw_fingerprint(self._raw_path), min_events=self._min_events,
        num_items=int(inter.num_items), num_users=len(inter), num_events=int(inter.num_events),
        ts_min=int(inter.timestamps.min()), ts_max=int(inter.timestamps.max()),
        skipped={k: int(v) for k, v in inter.skipped.items()})
    return {_SPLIT: self._generate_examples(inter)}

  def _generate_examples(self, inter: parsers.Interactions):
    for u in range(len(inter)):
      items, ts = inter.sequence(u)
      yield u, {"index": u, "user": str(inter.users[u]), "items": items, "ts": ts}


def prepare(format: str, path: str | Path, *, data_dir: str | Path | None = None,
            min_events: int = 3) -> MallocInteractions:
  """Prepares ``path`` into ArrayRecord under ``data_dir`` unless already prepared.

  Args:
    format: a parser format (``parsers.FORMATS``): "ml-100k", "ml-1m", "recbole", "sasrec".
    path: the raw file or its directory.
    data_dir: where prepared datasets live; None or "" for TFDS's default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    min_events: the parser's minimum events per user.

  Returns:
    The prepared builder (``builder.data_path`` is its directory).
  """
  builder = MallocInteractions(
      format=format, path=path, min_events=min_events,
      config=config_name(format, path, min_events), data_dir=str(data_dir) if data_dir else None,
      file_format="array_record")
  builder.download_and_prepare()
  return builder


def _source(builder: MallocInteractions):
  return builder.as_data_source(split=_SPLIT)


def read_sequences(builder: MallocInteractions) -> tuple[list[str], list[np.ndarray],
                                                           list[np.ndarray]]:
  """Reads every user's record back, in the parser's user order.

  Returns:
    ``(users, items, ts)``: original user ids (text), and per user the int32 item ids and
    int64 times, as the parser produced them.
  """
  src = _source(builder)
  recs = src.__getitems__(range(len(src)))
  index = np.array([r["index"] for r in recs])
  if not np.array_equal(np.sort(index), np.arange(len(recs))):
    raise ValueError(f"{builder.data_path}: record indices are not 0..{len(recs) - 1}; "
                     "delete the directory to prepare it again")
  recs = [recs[i] for i in np.argsort(index, kind="stable")]
  users = [r["user"].decode() if isinstance(r["user"], bytes) else str(r["user"]) for r in recs]
  items = [np.asarray(r["items"], np.int32) for r in recs]
  ts = [np.asarray(r["ts"], np.int64) for r in recs]
  return users, items, ts


def load_dataset(builder: MallocInteractions, *, max_len: int, name: str) -> SequenceDataset:
  """The leave-one-out :class:`SequenceDataset` of a prepared builder (as from the raw parser).

  Args:
    builder: from :func:`prepare`.
    max_len: N, the number of most recent events a history keeps.
    name: dataset name for reports.
  """
  _, items, ts = read_sequences(builder)
  return build_dataset(name, items, ts, int(builder.info.metadata["num_items"]), max_len)


def train_window(record: dict, *, max_len: int, ts_min: int) -> tuple[np.ndarray, ...]:
  """One user's leave-one-out training window, padded to the static length ``max_len + 1``.

  The window is the last ``max_len + 1`` of all but the last two events (as in
  :func:`~malloc_jax.data.dataset.build_dataset`), right-padded with item 0; times are
  rebased to ``ts_min``, the dataset's earliest event.

  Returns:
    ``(items [max_len + 1] int32, ts [max_len + 1] int32, length [] int32)``.
  """
  items = np.asarray(record["items"])[:-2][-(max_len + 1):]
  ts = np.asarray(record["ts"], np.int64)[:-2][-(max_len + 1):] - ts_min
  n = len(items)
  out_items = np.zeros(max_len + 1, np.int32)
  out_ts = np.zeros(max_len + 1, np.int32)
  out_items[:n] = items
  out_ts[:n] = ts
  return out_items, out_ts, np.int32(n)


def train_batches(builder: MallocInteractions, *, max_len: int, batch_size: int, seed: int,
                  num_epochs: int | None = None, drop_remainder: bool = True) -> grain.MapDataset:
  """A grain pipeline of shuffled, padded training batches from a prepared builder.

  Args:
    builder: from :func:`prepare`.
    max_len: N; windows have the static length N + 1 (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    batch_size: B users per batch.
    seed: shuffle seed; every epoch is shuffled differently (deterministically).
    num_epochs: passes over the users; None repeats forever.
    drop_remainder: drop each epoch's last partial batch (keeps shapes static); batches never
      straddle two epochs, so an epoch holds every user at most once.

  Returns:
    A ``grain.MapDataset`` whose elements are ``(items [B, N + 1] int32, ts [B, N + 1] int32,
    length [B] int32)``, ready for ``Trainer.step``.
  """
  meta = builder.info.metadata
  ts_min = int(meta["ts_min"])
  if int(meta["ts_max"]) - ts_min >= 2**31:
    raise ValueError(f"{meta['path']}: timestamps span more than 2**31 seconds")
  src = _source(builder)
  if drop_remainder and len(src) < batch_size:
    raise ValueError(f"train.batch_size={batch_size}: more than the {len(src)} users of "
                     f"{meta['path']}; expected at most {len(src)} (or drop_remainder=False)")
  ds = grain.MapDataset.source(src).shuffle(seed=seed)
  ds = ds.map(lambda r: train_window(r, max_len=max_len, ts_min=ts_min))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds if num_epochs == 1 else ds.repeat(num_epochs)  # reshuffled every epoch
