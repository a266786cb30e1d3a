"""TFDS / ArrayRecord pipeline (malloc_jax.data.tfds_data): prepare once, read back, grain."""

import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from malloc_jax import config_lib, experiment
from malloc_jax.config_validation import validate_config
from malloc_jax.data import parsers, tfds_data
from malloc_jax.data.dataset import build_dataset

tfds.disable_progress_bar()

# user, item, timestamp; user 3 has tied times (file order must survive), user 9 is too short.
ROWS = [(3, 40, 500), (1, 10, 100), (3, 20, 500), (1, 30, 300), (1, 20, 200), (3, 10, 100),
        (3, 50, 700), (1, 40, 400), (9, 10, 100), (2, 30, 50), (2, 10, 60), (2, 50, 55),
        (3, 30, 500), (1, 50, 500), (1, 60, 600)]
EXPECT = {1: [10, 20, 30, 40, 50, 60], 2: [30, 50, 10], 3: [10, 40, 20, 30, 50]}


def write_raw(directory: Path, fmt: str, rows=ROWS) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  if fmt == "ml-100k":
    path, text = directory / "u.data", "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows)
  elif fmt == "ml-1m":
    path, text = directory / "ratings.dat", "".join(f"{u}::{i}::4::{t}\n" for u, i, t in rows)
  elif fmt == "recbole":
    path = directory / "d.inter"
    text = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
      f"u{u}\ti{i}\t{t}\n" for u, i, t in rows)
  else:  # sasrec: one line per user, already in time order
    path = directory / "seq.txt"
    text = "".join(f"{u} {' '.join(map(str, s))}\n" for u, s in EXPECT.items())
  path.write_text(text)
  return path


def raw_sequences(fmt, path):
  inter = parsers.load(fmt, path)
  return inter, [inter.sequence(u) for u in range(len(inter))]


@pytest.mark.parametrize("fmt", ["ml-100k", "ml-1m", "recbole", "sasrec"])
def test_records_round_trip_the_raw_parse(tmp_path, fmt):
  raw = write_raw(tmp_path / "raw", fmt)
  builder = tfds_data.prepare(fmt, raw, data_dir=tmp_path / "tfds")
  assert list(builder.data_path.glob("*.array_record-*")), "no ArrayRecord file written"
  users, items, ts = tfds_data.read_sequences(builder)
  inter, seqs = raw_sequences(fmt, raw)
  # Independent check of the order: the hand-written time order (stable on ties).
  assert [inter.item_ids[s].tolist() for s in items] == [
    [f"i{i}" for i in s] if fmt == "recbole" else s for s in EXPECT.values()]
  assert users == [str(u) for u in inter.users]
  for (ref_items, ref_ts), got_items, got_ts in zip(seqs, items, ts, strict=True):
    assert got_items.dtype == np.int32 and got_ts.dtype == np.int64
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_array_equal(got_ts, ref_ts)
  meta = builder.info.metadata
  assert (meta["num_items"], meta["num_users"], meta["format"]) == (inter.num_items, 3, fmt)
  assert "tensorflow" not in sys.modules  # TFDS prepares and reads without TensorFlow


def test_second_prepare_reuses_files_and_a_changed_file_is_prepared_anew(tmp_path, monkeypatch):
  raw = write_raw(tmp_path / "raw", "ml-100k")
  first = tfds_data.prepare("ml-100k", raw.parent, data_dir=tmp_path / "tfds")
  stamp = {f.name: f.stat().st_mtime_ns for f in Path(first.data_path).iterdir()}

  def no_parse(*args, **kwargs):
    raise AssertionError("a prepared dataset was parsed again")

  monkeypatch.setattr(parsers, "load", no_parse)
  again = tfds_data.prepare("ml-100k", raw.parent, data_dir=tmp_path / "tfds")
  assert again.data_path == first.data_path
  assert {f.name: f.stat().st_mtime_ns for f in Path(again.data_path).iterdir()} == stamp
  assert len(tfds_data.read_sequences(again)[0]) == 3
  monkeypatch.undo()
  # Another min_events or edited raw contents name another prepared dataset.
  other = tfds_data.prepare("ml-100k", raw, data_dir=tmp_path / "tfds", min_events=6)
  assert other.data_path != first.data_path and other.info.metadata["num_users"] == 1
  write_raw(tmp_path / "raw", "ml-100k", ROWS + [(2, 60, 70)])
  edited = tfds_data.prepare("ml-100k", raw, data_dir=tmp_path / "tfds")
  assert edited.data_path != first.data_path
  assert [len(s) for s in tfds_data.read_sequences(edited)[1]] == [6, 4, 5]


def test_crashed_preparation_is_not_mistaken_for_a_finished_one(tmp_path, monkeypatch):
  raw = write_raw(tmp_path / "raw", "ml-100k")
  real = tfds_data.MallocInteractions._generate_examples

  def crash(self, inter):
    for n, example in enumerate(real(self, inter)):
      if n == 2:
        raise OSError("disk full")
      yield example

  monkeypatch.setattr(tfds_data.MallocInteractions, "_generate_examples", crash)
  with pytest.raises(OSError, match="disk full"):
    tfds_data.prepare("ml-100k", raw, data_dir=tmp_path / "tfds")
  monkeypatch.undo()
  name = tfds_data.config_name("ml-100k", raw, 3)
  config_dir = tmp_path / "tfds" / "malloc_interactions" / name
  assert not (config_dir / "1.0.0").exists()
  # A killed process leaves its temporary directory behind; it must not count as prepared.
  (config_dir / "incomplete.XYZ_1.0.0").mkdir(parents=True)
  (config_dir / "incomplete.XYZ_1.0.0" / "junk").write_text("partial")
  builder = tfds_data.prepare("ml-100k", raw, data_dir=tmp_path / "tfds")
  assert Path(builder.data_path) == config_dir / "1.0.0"
  assert [len(s) for s in tfds_data.read_sequences(builder)[1]] == [6, 3, 5]


def test_dataset_and_grain_batches_match_the_raw_path(tmp_path):
  raw = write_raw(tmp_path / "raw", "ml-100k")
  builder = tfds_data.prepare("ml-100k", raw, data_dir=tmp_path / "tfds")
  max_len = 2
  _, seqs = raw_sequences("ml-100k", raw)
  ref = build_dataset("x", [s[0] for s in seqs], [s[1] for s in seqs], 6, max_len)
  got = tfds_data.load_dataset(builder, max_len=max_len, name="x")
  for part in ("train", "valid", "test"):
    for field, a in vars(getattr(ref, part)).items():
      np.testing.assert_array_equal(getattr(getattr(got, part), field), a, err_msg=field)
  np.testing.assert_array_equal(got.popularity, ref.popularity)

  # One epoch of grain batches holds each user's training window exactly once.
  epoch = list(tfds_data.train_batches(builder, max_len=max_len, batch_size=2, seed=0,
                                       num_epochs=1, drop_remainder=False))
  rows = [tuple(np.concatenate([b[0][r], b[1][r], [b[2][r]]]).tolist())
          for b in epoch for r in range(len(b[2]))]
  want = [tuple(np.concatenate([ref.train.items[u], ref.train.ts[u], [ref.train.length[u]]])
                .tolist()) for u in range(3)]
  assert sorted(rows) == sorted(want)
  # User 1 (items 10..60 = dense 1..6 at t = 100..600): its window is the last max_len + 1 = 3
  # of its first four events, times rebased to the earliest event of all users (t = 50).
  assert (2, 3, 4, 150, 250, 350, 3) in rows
  # Static shapes and zero padding; epochs reshuffle; the same seed repeats the same batches.
  ds = tfds_data.train_batches(builder, max_len=4, batch_size=2, seed=1)
  for items, ts, length in (ds[i] for i in range(6)):
    assert items.shape == ts.shape == (2, 5) and length.shape == (2,)
    assert items.dtype == ts.dtype == length.dtype == np.int32
    pad = np.arange(5)[None, :] >= length[:, None]
    assert (items[pad] == 0).all() and (ts[pad] == 0).all() and (items[~pad] > 0).all()
  again = tfds_data.train_batches(builder, max_len=4, batch_size=2, seed=1)
  np.testing.assert_array_equal(ds[5][0], again[5][0])
  with pytest.raises(ValueError, match="train.batch_size=4"):
    tfds_data.train_batches(builder, max_len=4, batch_size=4, seed=0)


@pytest.mark.parametrize("update, field", [
    (dict(loader="grain"), "data.loader"),
    (dict(loader="tfds", source="synthetic"), "data.loader"),
    (dict(loader="tfds", source="ml-100k", path="x", data_dir=3), "data.data_dir"),
])
def test_bad_loader_config_names_the_field(update, field):
  c = config_lib.base_config("runlocal=True").to_dict()  # a plain dict: no type checks
  c["data"].update(update)
  with pytest.raises(ValueError, match=f"config.{field}="):
    validate_config(ml_collections.ConfigDict(c))


def _untimed(rows):
  return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


@pytest.mark.slow  # end to end; run by .ci/run's -m slow pass
def test_ml100k_training_from_tfds_matches_raw(shared_data, tmp_path):
  raw = shared_data / "ml-100k" / "u.data"
  if not raw.is_file():
    pytest.skip(f"{raw} is absent (development copy of ML-100K)")
  results = {}
  for loader in ("raw", "tfds"):
    c = config_lib.base_config(f"data=ml-100k,path={raw.parent},runlocal=True,steps=4,"
                               f"loader={loader},data_dir={tmp_path / 'tfds'}")
    c.train.update(eval_every=0, log_every=2)  # each validation pass costs a compilation
    c.eval.update(max_users=64, ks=(10, 50))
    results[loader] = experiment.train_and_evaluate(c, str(tmp_path / loader),
                                                    print_fn=lambda *a: None)
  prepared = tfds_data.prepare("ml-100k", raw.parent, data_dir=tmp_path / "tfds")
  assert prepared.info.metadata["num_events"] == 100_000
  assert list(Path(prepared.data_path).glob("*.array_record-*"))
  raw_res, tfds_res = results["raw"], results["tfds"]
  assert tfds_res["dataset"] == raw_res["dataset"]
  assert _untimed(tfds_res["rows"]) == _untimed(raw_res["rows"])
  assert tfds_res["rows"][1]["method"] == "native" and tfds_res["rows"][1]["num_users"] == 64
  assert tfds_res["train"]["steps"] == raw_res["train"]["steps"] == 4
