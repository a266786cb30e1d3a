"""Ranking on real data: primary genres as item groups, hard negatives, pooled-AUC bootstrap.

References are written independently of the code: genre files parsed line by line in plain
Python, groups as dicts of lists, sampling frequencies against their closed forms, the
pooled AUC by brute-force pairwise comparison over replicated users.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from malloc_jax.data import item_groups, parsers

ML1M_LINES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Jumanji (1995)::Comedy|Adventure",  # not alphabetical: the first listed is primary
    "5::Heat (1995)::Action|Crime|Thriller",
    "7::Sabrina (1995)::Romance",
]


def _ml100k_item(flags: list[int], mid: int) -> str:
  return f"{mid}|Movie {mid} (1995)|01-Jan-1995||http://x|" + "|".join(map(str, flags))


def test_primary_genre_of_movies_dat(tmp_path):
  f = tmp_path / "movies.dat"
  f.write_bytes(("\n".join(ML1M_LINES) + "\n").encode("latin-1"))
  g = parsers.load_genres(f)
  assert [g.names[p] for p in g.primary] == ["Animation", "Comedy", "Action", "Romance"]
  # Dense ids of a dataset that uses movies 2, 5, 7 (in increasing original id).
  prim = g.primary_for_items(np.array([0, 2, 5, 7]))
  assert prim[0] == -1 and [g.names[p] for p in prim[1:]] == ["Comedy", "Action", "Romance"]
  with pytest.raises(ValueError, match="movie id 99 .* no line"):
    g.primary_for_items(np.array([0, 99]))


def test_ml100k_u_item_flags_and_errors(tmp_path):
  names = ["unknown", "Action", "Comedy", "Drama"]
  (tmp_path / "u.genre").write_text("".join(f"{n}|{i}\n" for i, n in enumerate(names)))
  item = tmp_path / "u.item"
  item.write_text("\n".join([_ml100k_item([0, 0, 1, 1], 1), _ml100k_item([0, 1, 0, 1], 2),
                             _ml100k_item([1, 0, 0, 0], 3)]) + "\n")
  g = parsers.load_genres(tmp_path)  # the directory: its one genre file
  assert g.names == tuple(names)
  assert g.multi_hot.tolist() == [[False, False, True, True], [False, True, False, True],
                                  [True, False, False, False]]
  assert [g.names[p] for p in g.primary] == ["Comedy", "Action", "unknown"]
  item.write_text(_ml100k_item([0, 0, 1, 1], 1) + "\n" + _ml100k_item([0, 0, 1], 2) + "\n")
  with pytest.raises(ValueError, match=r"u.item: line 2: 8 '\|'-separated fields, expected 9"):
    parsers.load_genres(item)
  item.write_text(_ml100k_item([0, 0, 0, 0], 4) + "\n")
  with pytest.raises(ValueError, match="u.item: line 1: movie 4 has no genre flag set"):
    parsers.load_genres(item)
  item.write_text(_ml100k_item([0, 2, 0, 0], 4) + "\n")
  with pytest.raises(ValueError, match="u.item: line 1: genre flags must be 0 or 1"):
    parsers.load_genres(item)
  with pytest.raises(FileNotFoundError, match="nope.dat"):
    parsers.load_genres(tmp_path / "nope.dat")
  other = tmp_path / "genres.csv"
  other.write_text("1,Comedy\n")
  with pytest.raises(ValueError, match="unknown genre file"):
    parsers.load_genres(other)


def test_real_primary_genres_match_a_plain_count(shared_data):
  movies, txt = shared_data / "ml-1m" / "movies.dat", shared_data / "ml-1m" / "ml-1m.txt"
  if not movies.is_file() or not txt.is_file():
    pytest.skip("ML-1M absent")
  first = {}
  for line in movies.read_bytes().decode("latin-1").splitlines():
    mid, _, genres = line.split("::")
    first[int(mid)] = genres.split("|")[0]
  used = sorted({int(x) for line in txt.read_text().splitlines() for x in line.split()[1:]})
  ref = collections.Counter(first[m] for m in used)
  inter = parsers.load("sasrec", txt)
  g = parsers.load_genres(movies)
  prim = g.primary_for_items(inter.item_ids)
  got = collections.Counter(g.names[p] for p in prim[1:])
  assert got == ref and ref["Drama"] == 1083 and sum(ref.values()) == 3706


def _reference_groups(labels):
  groups = collections.defaultdict(list)
  for item, lab in enumerate(labels):
    if lab >= 0:
      groups[lab].append(item)
  return groups


def test_groups_from_labels_matches_a_dict_of_lists():
  rng = np.random.default_rng(0)
  labels = np.concatenate([[-1], rng.integers(-1, 5, 60)])
  labels[labels == 3] = 1  # group 3 empty: an all-padding row
  members, item_group = item_groups.groups_from_labels(labels)
  ref = _reference_groups(labels)
  assert members.shape == (5, max(len(v) for v in ref.values()))
  for g in range(5):
    row = members[g][members[g] > 0].tolist()
    assert row == ref.get(g, [])
    assert np.all(members[g][len(row):] == 0)
  assert np.array_equal(item_group, labels)
  with pytest.raises(ValueError, match="padding"):
    item_groups.groups_from_labels(np.array([0, 1, 1]))


def test_grouped_candidates_properties_and_distribution():
  # Groups: 0 = items 1..5 (4 others per target), 1 = items 6..7 (1 other: too small for
  # H = 2, the other slot is filled from outside), 2 = items 8..20; item 21 has no group.
  labels = np.array([-1] + [0] * 5 + [1] * 2 + [2] * 13 + [-1])
  members, group = item_groups.groups_from_labels(labels)
  U, H, E = 40000, 2, 3
  target = np.where(np.arange(U) % 2 == 0, 3, 6)
  c = item_groups.grouped_candidates(target, members, group, H, E, seed=1)
  assert c.shape == (U, 1 + H + E) and c.dtype == np.int32
  assert np.array_equal(c[:, 0], target)
  t3, t6 = c[target == 3], c[target == 6]
  # Target 3: hard = two distinct other members of group 0, uniform over the 4 (2/4 each).
  assert np.all(labels[t3[:, 1:3]] == 0) and np.all(t3[:, 1] != t3[:, 2])
  assert not np.any(t3[:, 1:3] == 3)
  freq = np.bincount(t3[:, 1:3].ravel(), minlength=6)[[1, 2, 4, 5]] / len(t3)
  np.testing.assert_allclose(freq, 0.5, atol=0.02)
  # Easy: uniform with replacement over the 15 grouped items outside group 0.
  assert np.all(labels[t3[:, 3:]] > 0)
  freq = np.bincount(t3[:, 3:].ravel(), minlength=22)[6:21] / (len(t3) * E)
  np.testing.assert_allclose(freq, 1 / 15, atol=0.005)
  # Target 6: its one group mate 7 always, the other hard slot from outside group 1.
  assert np.all(t6[:, 1] == 7) or np.all(np.sort(t6[:, 1:3], axis=1)[:, 1] == 7)
  hard = t6[:, 1:3]
  assert np.all(np.sum(hard == 7, axis=1) == 1)
  assert np.all(labels[np.where(hard == 7, 1, hard)] != -1)
  fill = hard[hard != 7]
  assert np.all(labels[fill] != 1)
  with pytest.raises(ValueError, match="item 21 .* no group"):
    item_groups.grouped_candidates(np.array([21]), members, group, 1, 1)


def test_training_hard_negatives_come_from_the_positives_genre():
  from malloc_jax.train import RankingSampler, ranking_impressions
  labels = np.array([-1] + [0] * 5 + [1] * 3 + [2] * 12)
  members, group = item_groups.groups_from_labels(labels)
  sampler = RankingSampler(uniform=2, popularity=0, hard=2, groups=members, item_group=group,
                           positions=4)
  rng = np.random.default_rng(0)
  items = rng.integers(1, 21, (256, 33)).astype(np.int32)
  length = np.full(256, 32, np.int32)
  p, cands = ranking_impressions(items, length, jax.random.key(0), sampler, 20)
  p, cands = np.asarray(p), np.asarray(cands)
  pos = cands[..., 0]
  assert np.array_equal(pos, np.take_along_axis(items, p, 1))
  hard = cands[..., 3:5]  # [positive, 2 uniform, 2 hard]
  lab = labels[pos]
  # Group 1 (3 items) always has 2 others; every hard slot is filled from the same group.
  assert np.all(hard > 0)
  assert np.all(labels[hard] == lab[..., None])
  assert np.all(hard != pos[..., None]) and np.all(hard[..., 0] != hard[..., 1])
  # Uniform among the other members: positive 1 -> each of 2..5 with probability 2/4.
  sel = pos == 1
  freq = np.bincount(hard[sel].ravel(), minlength=6)[2:6] / sel.sum()
  np.testing.assert_allclose(freq, 0.5, atol=0.2)


def test_eval_candidates_from_config_genres(shared_data, tmp_path):
  from malloc_jax import config_lib
  from malloc_jax.experiment import load_data, ranking_eval_candidates
  udata = shared_data / "ml-100k" / "u.data"
  if not udata.is_file():
    pytest.skip("ML-100K absent")
  c = config_lib.base_config(f"data=ml-100k,path={udata}")
  c.task = "ranking"
  c.data.genres = str(udata.with_name("u.item"))
  c.eval.update(rank_hard=9, rank_easy=10)
  data = load_data(c)
  cands = ranking_eval_candidates(c, data, "test")
  inter = parsers.load("ml-100k", udata)
  g = parsers.load_genres(udata.with_name("u.item"))
  prim = g.primary_for_items(inter.item_ids)
  assert cands.shape == (len(data.test), 20)
  assert np.array_equal(cands[:, 0], data.test.target)
  big = np.bincount(prim[1:])[prim[cands[:, 0]]] >= 10  # groups with >= 9 other members
  assert np.all(prim[cands[big, 1:10]] == prim[cands[big, :1]])
  assert np.all(prim[cands[:, 10:]] != prim[cands[:, :1]])
  c.data.genres = str(tmp_path / "missing.dat")
  with pytest.raises(FileNotFoundError, match="config.data.genres=.*missing.dat"):
    ranking_eval_candidates(c, data, "valid")


def test_weighted_pooled_auc_equals_pairwise_on_replicated_users():
  from malloc_jax import metrics, ranking
  rng = np.random.default_rng(3)
  logits = np.round(rng.normal(size=(30, 6)), 1)  # rounded: ties between users occur
  w = rng.integers(0, 4, (5, 30)).astype(np.float64)
  got = ranking.weighted_pooled_auc(logits, np.vstack([np.ones(30), w]))
  labels = np.zeros_like(logits, np.int8)
  labels[:, 0] = 1
  assert got[0] == pytest.approx(metrics.auc(labels.ravel(), logits.ravel()), abs=1e-12)
  for r in range(5):
    rep = np.repeat(logits, w[r].astype(int), axis=0)
    pos, neg = rep[:, 0], rep[:, 1:].ravel()
    ref = (np.sum(pos[:, None] > neg[None]) + 0.5 * np.sum(pos[:, None] == neg[None])) / (
        len(pos) * len(neg))
    assert got[r + 1] == pytest.approx(ref, abs=1e-12)
  b = ranking.paired_auc_bootstrap(logits, logits + rng.normal(size=logits.shape),
                                   resamples=200)
  assert b["ci_low"] <= b["diff"] <= b["ci_high"] and b["num_users"] == 30
  same = ranking.paired_auc_bootstrap(logits, logits, resamples=50)
  assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["contains_zero"]


@pytest.mark.slow
def test_ml1m_ranking_table_matches_the_serving_pipeline(shared_data, tmp_path):
  """scripts/ml1m_table.py on a ranking config (runlocal): its native and H2O rows equal
  ``ranking.rank_cell`` (the serving pipeline's rank stage) of the reloaded model on the same
  candidates; the oracle row is labelled not deployable; native's intervals are 0."""
  import json
  import subprocess
  import sys
  from pathlib import Path

  from malloc_jax import compressors as C
  from malloc_jax import ranking
  from malloc_jax.experiment import load_data, ranking_eval_candidates, train_model
  path = shared_data / "ml-1m" / "ml-1m.txt"
  if not path.exists():
    pytest.skip(f"real data not available: {path}")
  root = Path(__file__).resolve().parents[1]
  arg = f"runlocal=True,task=ranking,path={path}"
  out, work = tmp_path / "rank.json", tmp_path / "w"
  r = subprocess.run([sys.executable, "scripts/ml1m_table.py", "--config",
                      f"configs/ml1m.py:{arg}", "--workdir", str(work), "--out", str(out),
                      "--methods", "streaming", "--ratios", "2", "--natural", "",
                      "--chains", "", "--fixed", "h2o:heavy=4;recent=4", "--resamples", "50"],
                     cwd=root, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  rows = {row["method"]: row for row in res["rows"]}
  assert {"native", "streaming 2x", "h2o heavy=4 recent=4",
          "ORACLE vote h2o heavy=4 recent=4 (not deployable)",
          "history-blind (popularity)"} <= set(rows)
  assert rows["ORACLE vote h2o heavy=4 recent=4 (not deployable)"]["oracle"] is True
  for k in ("AUC", "GAUC", "NDCG@10", "logloss"):
    ci = rows["native"]["ci"][k]
    assert ci["diff"] == ci["ci_low"] == ci["ci_high"] == 0
  assert set(rows["native"]["ci"]["GAUC"]["by_length"]) == {"<=200", "201-512", ">512"}
  import importlib.util
  spec = importlib.util.spec_from_file_location("ml1m_cfg", root / "configs/ml1m.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  data = load_data(config)
  model, _ = train_model(config, work, data, print_fn=lambda *_: None)  # reloads
  split = data.eval_set("test")
  cands = ranking_eval_candidates(config, data, "test")[:config.eval.max_users]
  for label, comp in (("native", C.native()), ("h2o heavy=4 recent=4",
                                                C.make_compressor("h2o", heavy=4, recent=4))):
    ref = ranking.rank_cell(model, split, cands, comp, batch_size=32)["metrics"]
    for k in ("AUC", "GAUC", "NDCG@10", "logloss"):
      assert rows[label][k] == pytest.approx(ref[k], abs=1e-5), (label, k)


def test_ranking_configs_set_genres_and_validate():
  import importlib.util
  from pathlib import Path

  from malloc_jax.config_validation import validate_config
  root = Path(__file__).resolve().parents[1]

  def load(name):
    spec = importlib.util.spec_from_file_location(name, root / f"configs/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

  ml1m = load("ml1m")
  retrieval = ml1m.get_config("")
  assert "task" not in retrieval and "genres" not in retrieval.data  # old workdirs unchanged
  c = ml1m.get_config("task=ranking,path=/d/ml-1m/ml-1m.txt,hard=5,easy=4,rank_loss=bce")
  assert c.task == "ranking" and c.data.genres == "/d/ml-1m/movies.dat"
  assert c.train.rank_negatives.to_dict() == {"uniform": 4, "popularity": 0, "hard": 5}
  assert (c.train.rank_loss, c.eval.rank_hard, c.eval.rank_easy) == ("bce", 5, 4)
  validate_config(c)
  with pytest.raises(ValueError, match="task='rank'"):
    ml1m.get_config("task=rank")
  c = load("ml100k_ranking").get_config("path=/d/ml-100k/u.data")
  assert c.task == "ranking" and c.data.genres == "/d/ml-100k/u.item"
  from malloc_jax import config_lib
  syn = config_lib.base_config("")
  syn.data.genres = "movies.dat"
  with pytest.raises(ValueError, match="config.data.genres"):
    validate_config(syn)


def test_paired_auc_bootstrap_against_brute_force_and_its_reference_memo():
  """The interval equals percentiles of brute-force pooled-AUC differences over the same
  user resamples (``stats.bootstrap_indices``), for a first reference, a second one, and the
  first again (served from the memo of reference AUCs)."""
  from malloc_jax import ranking, stats

  def pooled(s):
    pos, neg = s[:, 0], s[:, 1:].ravel()
    return (np.sum(pos[:, None] > neg[None]) + 0.5 * np.sum(pos[:, None] == neg[None])) / (
        len(pos) * len(neg))

  rng = np.random.default_rng(9)
  cell = rng.normal(size=(25, 6))
  refs = [cell + rng.normal(size=cell.shape), cell + 0.3 * rng.normal(size=cell.shape)]
  for ref in (refs[0], refs[1], refs[0]):
    got = ranking.paired_auc_bootstrap(cell, ref, resamples=40, seed=3)
    d = [pooled(cell[i]) - pooled(ref[i]) for i in stats.bootstrap_indices(25, 40, 3)]
    low, high = np.percentile(d, [2.5, 97.5])
    assert got["diff"] == pytest.approx(pooled(cell) - pooled(ref), abs=1e-12)
    assert got["ci_low"] == pytest.approx(low, abs=1e-12)
    assert got["ci_high"] == pytest.approx(high, abs=1e-12)
