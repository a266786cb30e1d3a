"""Reliability, round two (issue 18): silent wrong results and late failures, each tried on
purpose. Every test names the outcome it asserts; docs/reliability.md lists them."""

import fcntl
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax import config_lib, experiment
from malloc_jax.config_validation import validate_config
from malloc_jax.data import parsers
from malloc_jax.experiment import train_and_evaluate
from tests.helpers import jit_prefill, random_events, random_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(print_fn=lambda *a, **k: None)


def _write_u_data(path: Path, users=24, n=12, items=40, seed=0, shift=0) -> None:
  """A small MovieLens-100K-style file: 9-digit timestamps, ids 1..items (+shift mod items)."""
  rng = np.random.default_rng(seed)
  lines = []
  for u in range(1, users + 1):
    for j, it in enumerate(rng.integers(1, items + 1, n)):
      lines.append(f"{u}\t{(it - 1 + shift) % items + 1}\t3\t{878000000 + 100 * u + j}")
  path.write_text("\n".join(lines) + "\n")


def _file_config(path: Path, steps=2):
  return config_lib.base_config(f"runlocal=True,data=ml-100k,path={path},steps={steps}")


def _sweep_config(arg: str):
  spec = importlib.util.spec_from_file_location("_sweep_cfg", ROOT / "configs" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --------------------------------------------------------------------------------------------
# 1. A changed data file at the same path
# --------------------------------------------------------------------------------------------


def test_changed_data_file_is_refused_naming_the_file(tmp_path):
  """Permuting the item ids inside the data file (same path, same size) is refused on the
  rerun, naming the file, instead of reusing the model trained on the old content."""
  data = tmp_path / "x.data"
  _write_u_data(data)
  config = _file_config(data)
  train_and_evaluate(config, str(tmp_path / "w"), **QUIET)
  results = (tmp_path / "w" / "results.json").read_bytes()
  _write_u_data(data, shift=7)  # the same events with item ids permuted
  with pytest.raises(ValueError, match=rf"data file {data}.* has changed .*sha256"):
    train_and_evaluate(config, str(tmp_path / "w"), **QUIET)
  assert (tmp_path / "w" / "results.json").read_bytes() == results  # not overwritten
  _write_u_data(data)  # the original content again (new mtime): accepted
  train_and_evaluate(config, str(tmp_path / "w"), **QUIET)


def test_changed_genre_file_is_refused_naming_the_file(tmp_path):
  """A ranking run's genre file (its hard negatives) is fingerprinted with the ratings: a
  changed ``movies.dat`` is refused naming it; a workdir recorded before genre files were
  fingerprinted gets its genre file recorded instead of being refused; a missing one is
  named with the config field."""
  data = tmp_path / "x.data"
  _write_u_data(data)
  movies = tmp_path / "movies.dat"
  movies.write_text("".join(f"{i}::Movie {i} (1995)::{'Comedy' if i % 2 else 'Drama'}\n"
                            for i in range(1, 41)))
  config = _file_config(data)
  config.data.genres = str(movies)
  w = tmp_path / "w"
  experiment.check_workdir(w, config)
  recorded = json.loads((w / "data_files.json").read_text())
  assert [f["path"] for f in recorded] == [str(data.absolute()), str(movies.absolute())]
  experiment.check_workdir(w, config)  # unchanged: accepted
  (w / "data_files.json").write_text(json.dumps(recorded[:1]))  # an older workdir
  experiment.check_workdir(w, config)
  assert json.loads((w / "data_files.json").read_text())[1]["path"] == str(movies.absolute())
  movies.write_text(movies.read_text().replace("Comedy", "Horror"))  # same size, new genres
  with pytest.raises(ValueError, match=rf"data file {movies} has changed"):
    experiment.check_workdir(w, config)
  config.data.genres = str(tmp_path / "nope.dat")
  with pytest.raises(FileNotFoundError, match=r"config.data.genres=.*nope.dat"):
    experiment.check_workdir(tmp_path / "w2", config)


def test_changed_item_count_is_reported_as_a_changed_dataset(tmp_path):
  """A workdir without a file fingerprint (an older run, or another parser version) whose
  dataset now has one more item: 'dataset ... num_items 40 -> 41', before any checkpoint is
  read (not an 'unreadable checkpoint')."""
  data = tmp_path / "x.data"
  _write_u_data(data)
  config = _file_config(data)
  train_and_evaluate(config, str(tmp_path / "w"), **QUIET)
  (tmp_path / "w" / "data_files.json").unlink(missing_ok=True)
  with data.open("a") as f:
    f.write("1\t41\t3\t878000999\n")
  with pytest.raises(ValueError, match=r"dataset .* differs .*num_items 40 -> 41"):
    train_and_evaluate(config, str(tmp_path / "w"), **QUIET)


# --------------------------------------------------------------------------------------------
# 2. A truncated last line; u.info counts
# --------------------------------------------------------------------------------------------


def test_truncated_last_line_is_warned_about(tmp_path, caplog):
  """``head -c -7 u.data``: the last line loses its newline and 6 timestamp digits; it still
  parses, so a warning names the line."""
  full = tmp_path / "full.data"
  _write_u_data(full)
  cut = tmp_path / "t.data"
  cut.write_bytes(full.read_bytes()[:-7])
  with caplog.at_level(logging.WARNING, logger="malloc_jax.data.parsers"):
    parsers.parse_movielens_100k(cut)
  msg = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(msg) == 1 and f"{cut}: line 288:" in msg[0] and "'878'" in msg[0], msg
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="malloc_jax.data.parsers"):
    cut.write_bytes(full.read_bytes()[:-1])  # only the final newline missing: no warning
    parsers.parse_movielens_100k(cut)
  assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_u_info_counts_are_checked(tmp_path):
  """A u.data missing its last rating next to the u.info that counts it is an error."""
  d = tmp_path / "ml-100k"
  d.mkdir()
  _write_u_data(d / "u.data")
  (d / "u.info").write_text("24 users\n40 items\n288 ratings\n")
  assert parsers.parse_movielens_100k(d).num_events == 288
  lines = (d / "u.data").read_text().splitlines()
  (d / "u.data").write_text("\n".join(lines[:-1]) + "\n")
  with pytest.raises(ValueError, match=r"u.data: holds 287 ratings but .*u.info line 3 says 288"):
    parsers.parse_movielens_100k(d)


# --------------------------------------------------------------------------------------------
# 3. Timestamps beyond int64; 10a. fields of 4,301+ digits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e19", "9.3e18", "1" + "0" * 400])
def test_float_timestamp_beyond_int64_names_the_line(tmp_path, value):
  path = tmp_path / "x.inter"
  path.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                  f"1\t2\t5\n1\t3\t{value}\n1\t4\t6\n")
  with pytest.raises(ValueError, match=r"x.inter: line 3: .*(int64 range|finite timestamp)"):
    parsers.parse_recbole_inter(path)


@pytest.mark.parametrize("column", [0, 1, 3])
def test_field_of_5000_digits_names_the_line(tmp_path, column):
  """Python's int() refuses 4,301+ digits with its own message; the parser names the line."""
  fields = ["1", "3", "3", "6"]
  fields[column] = "9" * 5000
  path = tmp_path / "u.data"
  path.write_text("1\t2\t3\t5\n" + "\t".join(fields) + "\n1\t4\t3\t7\n")
  with pytest.raises(ValueError, match=r"u.data: line 2: .* out of the int64 range"):
    parsers.parse_movielens_100k(path)


def test_sasrec_field_of_5000_digits_names_the_line(tmp_path):
  path = tmp_path / "s.txt"
  path.write_text("1 2 3 4\n2 " + "9" * 5000 + " 3 4\n")
  with pytest.raises(ValueError, match=r"s.txt: line 2: item id .* out of the int64 range"):
    parsers.parse_sasrec_text(path)


# --------------------------------------------------------------------------------------------
# 4, 7, 9. Configs rejected at start
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, field, needle", [
    (lambda c: c.eval.update(ks=(5,)), "eval.ks", "including 10"),
    (lambda c: c.train.update(lr=float("inf")), "train.lr", "finite"),
    (lambda c: c.train.update(lr=float("nan")), "train.lr", "finite"),
    (lambda c: c.train.update(weight_decay=float("nan")), "train.weight_decay", "finite"),
    (lambda c: c.model.update(temperature=float("inf")), "model.temperature", "finite"),
    (lambda c: c.model.update(dropout=float("nan")), "model.dropout", "finite"),
    (lambda c: c.data.synthetic.update(p_copy=float("nan")), "data.synthetic.p_copy", "finite"),
    # Found by the adversarial pass (not in the issue):
    (lambda c: c.data.synthetic.update(zipf=float("nan")), "data.synthetic.zipf", "finite"),
    (lambda c: c.data.synthetic.update(mean_gap=float("nan")), "data.synthetic.mean_gap",
     "finite"),
    (lambda c: c.data.synthetic.update(mean_gap=1e300), "data.synthetic.mean_gap", "int32"),
    (lambda c: c.data.synthetic.update(min_len=40), "data.synthetic.min_len", "at most"),
    (lambda c: c.train.update(eval_users=-1), "train.eval_users", ">= 0"),
])
def test_bad_values_rejected_at_start(mutate, field, needle):
  c = config_lib.base_config("runlocal=True")
  mutate(c)
  with pytest.raises(ValueError) as info:
    validate_config(c)
  assert f"config.{field}" in str(info.value) and needle in str(info.value), str(info.value)


@pytest.mark.parametrize("arg, needle", [
    ("steps=-3", "steps=-3: expected an integer >= 0"),
    ("max_len=0", "max_len=0: expected an integer >= 2"),
    ("path=/tmp/x.data", "path='/tmp/x.data' is only used with a data file"),
    ("loader=tfds", "loader='tfds' is only used with a data file"),
])
def test_silently_ignored_arguments_are_rejected(arg, needle):
  with pytest.raises(ValueError, match="config argument " + needle.replace("(", r"\(")):
    config_lib.base_config(arg)


@pytest.mark.parametrize("arg, needle", [
    ("ratios=abc", "config argument ratios='abc'"),
    ("requests=0", "config argument requests='0'"),
    ("seeds=1+x", r"config argument seeds='1\+x': 'x' is not an integer"),
])
def test_sweep_list_arguments_name_the_argument(arg, needle):
  with pytest.raises(ValueError, match=needle):
    _sweep_config(arg)


@pytest.mark.parametrize("workdir", ["", "  "])
def test_empty_workdir_is_refused(workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="workdir=.*expected a directory"):
    train_and_evaluate(config_lib.base_config("runlocal=True,steps=1"), workdir, **QUIET)
  assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


# --------------------------------------------------------------------------------------------
# 5. One run per workdir
# --------------------------------------------------------------------------------------------


def test_second_run_in_a_locked_workdir_is_refused(tmp_path):
  """Another process holds the workdir (as a running ``main`` does): the second run stops
  before loading data or training, with a message naming the workdir and the holder."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys, time\n"
       "f = open(sys.argv[1], 'w'); f.write('main, pid 1234'); f.flush()\n"
       "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
       str(workdir / "LOCK")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=rf"workdir {workdir} is in use by another process"
                                           r".*main, pid 1234"):
      train_and_evaluate(config_lib.base_config("runlocal=True,steps=2"), str(workdir),
                         **QUIET)
    assert not (workdir / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  # Released by the holder's exit: the run goes ahead, and releases the lock when it returns.
  train_and_evaluate(config_lib.base_config("runlocal=True,steps=2"), str(workdir), **QUIET)
  with open(workdir / "LOCK") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --------------------------------------------------------------------------------------------
# 6. load_results and a last row without its newline
# --------------------------------------------------------------------------------------------


def test_load_results_keeps_a_complete_last_row_without_newline(tmp_path):
  from malloc_jax.sweep import append_result, load_results

  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps({"cell": "a"}) + "\n" + json.dumps({"cell": "b"}))
  assert [r["cell"] for r in load_results(path, repair=False)] == ["a", "b"]
  assert [r["cell"] for r in load_results(path)] == ["a", "b"]
  append_result(path, {"cell": "c"})  # the repaired file ends with a newline: no glued rows
  assert [r["cell"] for r in load_results(path)] == ["a", "b", "c"]
  with path.open("a") as f:
    f.write('{"cell": "d", "NDCG')  # a torn row is still dropped
  assert [r["cell"] for r in load_results(path)] == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------
# 8. Sweep cells validated before any training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.methods.kivi2.update(bits=3), r"config.methods.kivi2 \(kivi"),
    (lambda c: c.update(stream_requests=(0,)), r"config.stream_requests=\(0,\)"),
    (lambda c: c.methods.update({"u": {"name": "uniform", "bits": 5}}), "config.methods.u"),
    (lambda c: c.methods.update({"sk": {"name": "snapkv", "budget": 99, "window": 4}}),
     r"config.methods.sk.budget=99: expected at most data.max_len=32"),
    (lambda c: c.ranking.update(num_negatives=0), "config.ranking.num_negatives=0"),
])
def test_sweep_rejects_bad_cells_before_training(tmp_path, mutate, needle):
  from malloc_jax.sweep import run_sweep

  config = _sweep_config("runlocal=True,methods=native+kivi2")
  mutate(config)
  printed = []
  with pytest.raises(ValueError, match=needle):
    run_sweep(config, tmp_path, print_fn=printed.append)
  assert not (tmp_path / "models").exists(), printed  # nothing was trained


# --------------------------------------------------------------------------------------------
# 10c. fit_lowrank with NaN / inf in padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e30])
def test_fit_lowrank_ignores_non_finite_padding(fill):
  """Padding slots (pos = -1) holding NaN, inf or 1e30 do not change the fitted bases: they
  equal a float64 NumPy PCA of the valid slots only."""
  from malloc_jax import compressors as C

  model = random_model("hstu")
  cache, _ = jit_prefill(model, random_events(4, 10, [10, 6, 3, 8]))
  pad = ~np.asarray(cache.valid)[..., None]  # [L, B, H, T, 1]
  dirty = cache.replace(k=jnp.where(pad, fill, cache.k), v=jnp.where(pad, fill, cache.v))
  got = C.fit_lowrank([dirty], rank=3)
  k = np.asarray(cache.k, np.float64)
  valid = np.asarray(cache.valid)
  for layer in range(k.shape[0]):
    for h in range(k.shape[2]):
      x = k[layer][:, h][valid[layer][:, h]]  # [n, D]
      mean = x.mean(0)
      cov = (x - mean).T @ (x - mean) / len(x)
      vecs = np.linalg.eigh(cov)[1][:, ::-1][:, :3]
      np.testing.assert_allclose(np.asarray(got.k_mean)[layer, h], mean, atol=1e-5)
      basis = np.asarray(got.k_basis)[layer, h]
      # Directions are defined up to sign: compare the projectors.
      np.testing.assert_allclose(basis @ basis.T, vecs @ vecs.T, atol=1e-3)


# --------------------------------------------------------------------------------------------
# 10d. A full disk during async checkpointing
# --------------------------------------------------------------------------------------------

_FILLER = """
import sys
import numpy as np
from malloc_jax.checkpoint import TrainCheckpoints
store = TrainCheckpoints(sys.argv[1], max_to_keep=2)
for step in range(1, 6):
  n = 1 << 12 if step < 3 else 1 << 20  # steps 3+ (4 MiB) do not fit in 2 MiB
  store.save(step, {"w": np.random.default_rng(step).random(n, np.float32)}, {"step": step})
store.close()
"""


@pytest.fixture
def small_tmpfs(tmp_path):
  mount = tmp_path / "fs"
  mount.mkdir()
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
  if res.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
  yield mount
  subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_during_async_checkpointing_is_one_error(small_tmpfs):
  """Async saves into a 2 MiB tmpfs: the failed save is waited for and reported once, as a
  CheckpointError naming the directory and the last complete step, which stays readable; no
  pile of Orbax tracebacks."""
  from malloc_jax.checkpoint import TrainCheckpoints

  directory = small_tmpfs / "ck"
  res = subprocess.run([sys.executable, "-c", _FILLER, str(directory)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
  err = res.stderr
  assert res.returncode == 1
  assert err.count("Traceback") == 1, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("malloc_jax.checkpoint.CheckpointError: saving checkpoint step 3 "
                         f"to {directory} failed"), last
  assert "(step 2) is kept" in last and "Event loop is closed" not in err
  store = TrainCheckpoints(directory)
  step, state, meta = store.restore({"w": np.zeros(1 << 12, np.float32)})
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(state["w"], np.random.default_rng(2).random(1 << 12, np.float32))


# --------------------------------------------------------------------------------------------
# 11. Log noise
# --------------------------------------------------------------------------------------------


def test_posthoc_table_prints_no_info_lines(tmp_path):
  """A tiny run of scripts/posthoc_table.py (trains 2 steps, saves Orbax checkpoints,
  serves) prints no absl / Orbax / JAX INFO lines by default."""
  res = subprocess.run(
      [sys.executable, "scripts/posthoc_table.py", "--config", "configs/tiny.py:steps=2",
       "--workdir", str(tmp_path / "w"), "--methods", "native", "--nochains"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout + res.stderr
  info = [line for line in out.splitlines()
          if line[:1] == "I" and line[1:5].isdigit() or "INFO" in line]
  assert info == [], info[:5]
  assert "| native |" in res.stdout


def test_verbosity_shows_more():
  from absl import logging as absl_logging

  from malloc_jax import logging_setup

  try:
    assert logging_setup.setup(0) == 0
    assert logging.getLogger().getEffectiveLevel() == logging.INFO
    assert logging_setup.setup() == absl_logging.WARNING  # the default: quiet
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING
    assert absl_logging.get_absl_logger().getEffectiveLevel() == logging.WARNING
  finally:
    logging_setup.setup()

