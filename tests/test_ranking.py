"""Ranking task: AUC / GAUC / logloss against NumPy references; FuxiCTR CSV parsing."""

import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.data import parsers as P
from malloc_jax.data.dataset import EvalSet
from malloc_jax.metrics import auc, gauc, logloss_from_logits, ranking_metrics
from malloc_jax.ranking import (
  candidate_labels,
  ctr_arrays,
  evaluate_ctr,
  evaluate_ranking,
  sample_candidates,
)
from tests.helpers import random_model


def _pairwise_auc(labels, scores):
  """Brute force: fraction of (positive, negative) pairs ordered right, ties count 1/2."""
  pos = [s for s, y in zip(scores, labels) if y == 1]
  neg = [s for s, y in zip(scores, labels) if y == 0]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


# user 7: 3 impressions, one tie across classes; user 3: 4 impressions; user 9: only
# positives (skipped); user 5: one negative impression (skipped).
USERS = np.array([7, 3, 7, 3, 9, 3, 7, 9, 3, 5])
LABELS = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0])
SCORES = np.array([0.5, 0.2, 0.5, 0.9, 0.1, 0.3, 0.8, 0.7, 0.4, 0.6])


def test_gauc_matches_reference_with_single_class_users():
  got = gauc(USERS, LABELS, SCORES)
  num = den = 0.0
  skipped = 0
  for u in np.unique(USERS):
    m = USERS == u
    if LABELS[m].min() == LABELS[m].max():
      skipped += 1
      continue
    num += m.sum() * _pairwise_auc(LABELS[m], SCORES[m])
    den += m.sum()
  assert got["GAUC"] == pytest.approx(num / den)
  # by hand: user 7 (3 impressions) AUC (1 + 0.5) / 2 = 0.75; user 3 (4) AUC 3/4
  assert got["GAUC"] == pytest.approx((3 * 0.75 + 4 * 0.75) / 7)
  assert got["gauc_users"] == 2 and got["gauc_skipped"] == skipped == 2
  assert gauc([1, 1], [1, 1], [0.1, 0.2]) == {"GAUC": pytest.approx(np.nan, nan_ok=True),
                                              "gauc_users": 0, "gauc_skipped": 1}


def test_auc_and_logloss_match_references():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = np.round(rng.normal(size=200), 1)  # many ties
  assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
  z = rng.normal(size=200) * 3
  p = np.clip(1 / (1 + np.exp(-z)), 1e-7, 1 - 1e-7)
  ref = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  assert logloss_from_logits(labels, z) == pytest.approx(ref, rel=1e-9)
  assert logloss_from_logits([1], [1e4]) == pytest.approx(-np.log(1 - 1e-7), rel=1e-6)
  m = ranking_metrics(USERS, LABELS, SCORES / 0.05, temperature=0.05)
  assert m["AUC"] == pytest.approx(_pairwise_auc(LABELS, SCORES))
  assert m["logloss"] == pytest.approx(logloss_from_logits(LABELS, SCORES))
  assert m["impressions"] == 10
  with pytest.raises(ValueError, match="labels must be 0 or 1"):
    auc([0, 2], [0.1, 0.2])


def test_sample_candidates_excludes_the_target():
  target = np.array([1, 5, 10, 3])
  c = sample_candidates(target, 10, 50, seed=1)
  assert c.shape == (4, 51) and c.dtype == np.int32
  np.testing.assert_array_equal(c[:, 0], target)
  assert (c[:, 1:] != target[:, None]).all() and c.min() >= 1 and c.max() <= 10
  np.testing.assert_array_equal(c, sample_candidates(target, 10, 50, seed=1))
  assert set(np.unique(c[2, 1:])) == set(range(1, 10))  # uniform over the other items
  np.testing.assert_array_equal(candidate_labels(c)[:, 0], 1)


def test_evaluate_ranking_native_scores_candidates():
  V, N = 30, 12
  model = random_model("hstu", V, max_len=N)
  rng = np.random.default_rng(3)
  items = rng.integers(1, V + 1, (5, N)).astype(np.int32)
  ts = np.cumsum(rng.integers(1, 50, (5, N)), 1).astype(np.int32)
  data = EvalSet(items, ts, np.full(5, N, np.int32), items[:, -1].copy(), ts[:, -1].copy())
  # a candidate list that puts the target in every column: every score ties, AUC = 1/2
  cands = np.repeat(data.target[:, None], 4, axis=1)
  m = evaluate_ranking(model, data, C.native(), candidates=cands, batch_size=4)
  assert m["AUC"] == pytest.approx(0.5) and m["GAUC"] == pytest.approx(0.5)
  assert m["impressions"] == 20 and m["gauc_users"] == 5


AMAZON = """label,user_id,item_id,cate_id,item_history,cate_history
1,u1,30,c1,10^20,c1^c2
0,u1,40,c2,10^20,c1^c2
1,u2,10,c1,,
0,u2,20,c2,30,c1
"""
MICRO_TRAIN = """user_id,item_id,cate_id,clicked_items,clicked_categories,timestamp,is_click
5,7,1,3^4^5,1^1^2,1500000000,1
5,8,1,3^4^5^7,1^1^2^1,1500000100,0
"""
MICRO_TEST = """user_id,item_id,cate_id,clicked_items,clicked_categories,timestamp,is_click
6,3,1,7,1,1500000200,1
"""


def test_parse_fuxictr_layouts(tmp_path):
  (tmp_path / "amazon").mkdir()
  (tmp_path / "amazon" / "train.csv").write_text(AMAZON)
  (tmp_path / "amazon" / "test.csv").write_text(AMAZON.splitlines()[0] + "\n1,u3,50,c1,40,c2\n")
  d = P.parse_fuxictr_csv(tmp_path / "amazon")
  assert sorted(d.splits) == ["test", "train"] and d.history_field == "item_history"
  assert d.num_items == 5 and list(d.item_ids[1:]) == [10, 20, 30, 40, 50]
  tr = d["train"]
  np.testing.assert_array_equal(tr.label, [1, 0, 1, 0])
  np.testing.assert_array_equal(tr.item, [3, 4, 1, 2])
  np.testing.assert_array_equal(d.item_ids[tr.history(0)], [10, 20])
  assert len(tr.history(2)) == 0 and tr.timestamps is None
  assert list(d.user_ids) == ["u1", "u2", "u3"] and list(tr.user) == [0, 0, 1, 1]
  items, ts, length = ctr_arrays(tr, 1)  # keep the last event of each history
  np.testing.assert_array_equal(length, [1, 1, 0, 1])
  np.testing.assert_array_equal(items[:, 0], [2, 2, 0, 3])
  (tmp_path / "micro").mkdir()
  (tmp_path / "micro" / "train.csv").write_text(MICRO_TRAIN)
  (tmp_path / "micro" / "test.csv").write_text(MICRO_TEST)
  m = P.parse_fuxictr_csv(tmp_path / "micro")
  assert m.label_field == "is_click" and m.history_field == "clicked_items"
  np.testing.assert_array_equal(m["train"].timestamps, [1500000000, 1500000100])
  np.testing.assert_array_equal(m.item_ids[m["train"].history(1)], [3, 4, 5, 7])
  kuai = tmp_path / "kuai.csv"
  kuai.write_text("user_id,item_id,pos_items,neg_items,is_click\n1,2,3^4,5,0\n1,3,3^4^2,5,1\n")
  k = P.parse_fuxictr_csv(kuai)
  assert list(k.splits) == ["kuai"] and k.history_field == "pos_items"
  # a tiny model scores the impressions end to end
  model = random_model("hstu", k.num_items, max_len=8)
  res = evaluate_ctr(model, k["kuai"], C.native(), max_len=8)
  assert res["impressions"] == 2 and res["gauc_users"] == 1 and 0 <= res["AUC"] <= 1


@pytest.mark.parametrize("body, match", [
    ("label,user_id,item_id,item_history\n1,u,3,4^^5\n", r"line 2: empty id at position 2"),
    ("label,user_id,item_id,item_history\n2,u,3,4\n", r"line 2: label='2'.*0 or 1"),
    ("label,user_id,item_id,item_history\n1,u,3,4\n1,u,3\n", r"line 3: expected 4 comma"),
    ("label,user_id,item_id,item_history\n1,u,,4\n", r"line 2: missing item_id"),
    ("label,user_id,item_id\n1,u,3\n", r"line 1: header has no history column"),
    ("user_id,item_id,item_history\n1,3,4\n", r"line 1: header has no label column"),
    ("label,user_id,item_id,item_history\n1,u,3,4\n\n1,u,3,4\n", r"line 3: blank line"),
])
def test_fuxictr_errors_name_file_and_line(tmp_path, body, match):
  f = tmp_path / "bad.csv"
  f.write_text(body)
  with pytest.raises(ValueError, match=match) as e:
    P.parse_fuxictr_csv(f)
  assert str(f) in str(e.value)
