"""Tests of the raw-file parsers (malloc_jax.data.parsers)."""

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc_jax.data import parsers as P


def write(tmp_path, name, text, mode="w"):
  path = tmp_path / name
  if mode == "wb":
    path.write_bytes(text)
  else:
    path.write_text(text)
  return path


def original_sequences(inter):
  """{original user id: [original item ids in order]}."""
  return {inter.users[u].item(): inter.item_ids[inter.sequence(u)[0]].tolist()
          for u in range(len(inter))}


# --------------------------------------------------------------------------------------------
# Well-formed files
# --------------------------------------------------------------------------------------------

ML100K = ("7\t30\t4\t300\n"
          "5\t10\t3\t200\n"
          "7\t20\t5\t100\n"
          "5\t30\t1\t100\n"
          "7\t10\t2\t200\n"
          "5\t20\t2\t300\n")


def test_ml100k_basic(tmp_path):
  inter = P.parse_movielens_100k(write(tmp_path, "u.data", ML100K))
  assert len(inter) == 2 and inter.num_items == 3 and inter.num_events == 6
  np.testing.assert_array_equal(inter.users, [5, 7])
  np.testing.assert_array_equal(inter.offsets, [0, 3, 6])
  np.testing.assert_array_equal(inter.item_ids, [0, 10, 20, 30])
  assert inter.items.dtype == np.int32 and inter.offsets.dtype == np.int64
  assert inter.timestamps.dtype == np.int64 and inter.ratings.dtype == np.float32
  items, ts = inter.sequence(0)
  np.testing.assert_array_equal(items, [3, 1, 2])  # items 30, 10, 20 at t = 100, 200, 300
  np.testing.assert_array_equal(ts, [100, 200, 300])
  np.testing.assert_array_equal(inter.ratings[:3], [1, 3, 2])
  np.testing.assert_array_equal(inter.sequence(1)[0], [2, 1, 3])
  np.testing.assert_array_equal(inter.lengths(), [3, 3])
  assert inter.skipped == {"short_users": 0, "short_user_events": 0}
  assert inter.source.startswith("ml-100k:") and "events=6" in repr(inter)


def test_ml100k_directory_and_str_path(tmp_path):
  write(tmp_path, "u.data", ML100K)
  a = P.parse_movielens_100k(tmp_path)
  b = P.parse_movielens_100k(str(tmp_path / "u.data"))
  np.testing.assert_array_equal(a.items, b.items)


def test_stable_ties_keep_row_order(tmp_path):
  # Equal timestamps with item ids in reverse order: row order must win, not the item id.
  rows = [(1, 9, 100), (1, 3, 100), (1, 5, 50), (1, 1, 100)]
  expect = {1: [5, 9, 3, 1]}
  ml100k = "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in rows)
  ml1m = "".join(f"{u}::{i}::3::{t}\n" for u, i, t in rows)
  recbole = "timestamp:float\titem_id:token\tuser_id:token\n" + "".join(
    f"{t}\t{i}\t{u}\n" for u, i, t in rows)
  assert original_sequences(P.parse_movielens_100k(write(tmp_path, "u.data", ml100k))) == expect
  assert original_sequences(P.parse_movielens_1m(write(tmp_path, "r.dat", ml1m))) == expect
  assert original_sequences(P.parse_recbole_inter(write(tmp_path, "x.inter", recbole))) == expect


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 3)), min_size=1,
                max_size=30))
def test_order_matches_a_stable_sort_on_time(rows):
  # Reference: Python's sorted() is stable, keyed on the timestamp alone.
  expect = {u: [i for _, i, _ in sorted((r for r in rows if r[0] == u), key=lambda r: r[2])]
            for u in {r[0] for r in rows}}
  with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "u.data"
    path.write_text("".join(f"{u}\t{i}\t1\t{t}\n" for u, i, t in rows))
    inter = P.parse_movielens_100k(path, min_events=1)
  assert original_sequences(inter) == expect
  assert inter.num_items == len({r[1] for r in rows})
  assert set(inter.items.tolist()) == set(range(1, inter.num_items + 1))


def test_ml1m_basic(tmp_path):
  text = "1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n2::1::4::5\n"
  inter = P.parse_movielens_1m(write(tmp_path, "ratings.dat", text), min_events=1)
  assert original_sequences(inter) == {1: [1193, 914, 661], 2: [1]}
  np.testing.assert_array_equal(inter.ratings, [5, 3, 3, 4])


def test_recbole_any_order_extra_columns_string_tokens(tmp_path):
  text = ("item_id:token\treview:token_seq\ttimestamp:float\tuser_id:token\trating:float\n"
          "B01\tgreat stuff\t10.5\tAx\t5\n"
          "B02\t\t3\tAx\t4\n"
          "B03\tmeh\t7\tAx\t2\n"
          "B01\tok\t1\tBy\t1\n")
  inter = P.parse_recbole_inter(write(tmp_path, "d.inter", text), min_events=1)
  assert inter.users.dtype.kind == "U" and inter.users.tolist() == ["Ax", "By"]
  assert inter.item_ids.tolist() == ["", "B01", "B02", "B03"]
  assert original_sequences(inter) == {"Ax": ["B02", "B03", "B01"], "By": ["B01"]}
  np.testing.assert_array_equal(inter.timestamps, [3, 7, 10, 1])  # floats rounded down
  np.testing.assert_array_equal(inter.ratings, [4, 2, 5, 1])


def test_recbole_integer_tokens_untyped_header_no_timestamp(tmp_path, caplog):
  text = "user_id\titem_id\n2\t30\n1\t5\n2\t10\n2\t20\n"
  with caplog.at_level(logging.WARNING):
    inter = P.parse_recbole_inter(write(tmp_path, "d.inter", text), min_events=1)
  assert "row order" in caplog.text
  assert inter.users.dtype == np.int64 and inter.item_ids.dtype == np.int64
  assert original_sequences(inter) == {1: [5], 2: [30, 10, 20]}
  np.testing.assert_array_equal(inter.timestamps, [0, 0, 1, 2])
  assert inter.ratings is None


def test_recbole_leading_zero_tokens_stay_strings(tmp_path):
  text = "user_id:token\titem_id:token\n1\t01\n1\t1\n"
  inter = P.parse_recbole_inter(write(tmp_path, "d.inter", text), min_events=1)
  assert inter.item_ids.tolist() == ["", "01", "1"]


def test_sasrec_text(tmp_path):
  text = "1 1 2 3 4\n3 5 1\n2 7 7 2 9 1\n4\n"
  inter = P.parse_sasrec_text(write(tmp_path, "x.txt", text), min_events=2)
  np.testing.assert_array_equal(inter.users, [1, 2, 3])
  assert original_sequences(inter) == {1: [1, 2, 3, 4], 2: [7, 7, 2, 9, 1], 3: [5, 1]}
  np.testing.assert_array_equal(inter.sequence(1)[1], [0, 1, 2, 3, 4])
  assert inter.ratings is None
  assert inter.skipped["short_users"] == 1  # user 4 has no items


def test_trailing_blank_lines_crlf_and_bom(tmp_path):
  text = "\ufeff" + ML100K.replace("\n", "\r\n") + "\r\n  \n\n"
  path = write(tmp_path, "u.data", text.encode("utf-8"), "wb")
  assert P.parse_movielens_100k(path).num_events == 6


def test_min_events_and_min_rating(tmp_path, caplog):
  text = ML100K + "9\t10\t5\t1\n9\t20\t5\t2\n"
  path = write(tmp_path, "u.data", text)
  with caplog.at_level(logging.WARNING):
    inter = P.parse_movielens_100k(path)
  assert inter.skipped == {"short_users": 1, "short_user_events": 2}
  assert "skipped 1 users with fewer than 3 events" in caplog.text
  assert inter.users.tolist() == [5, 7]
  inter = P.parse_movielens_100k(path, min_rating=2, min_events=2)
  assert inter.skipped == {"low_rating": 1, "short_users": 0, "short_user_events": 0}
  assert original_sequences(inter) == {5: [10, 20], 7: [20, 10, 30], 9: [10, 20]}
  inter = P.parse_movielens_100k(path, min_rating=5, min_events=1)
  assert inter.skipped == {"low_rating": 5, "short_users": 1, "short_user_events": 0}
  assert original_sequences(inter) == {7: [20], 9: [10, 20]}
  with pytest.raises(ValueError, match=r"u\.data: no user has at least min_events=4"):
    P.parse_movielens_100k(path, min_events=4)
  with pytest.raises(ValueError, match="min_events=0"):
    P.parse_movielens_100k(path, min_events=0)
  with pytest.raises(ValueError, match="has no ratings"):
    P.parse_recbole_inter(write(tmp_path, "a.inter", "user_id\titem_id\n1\t2\n"), min_rating=1)


def test_items_remapped_after_filters(tmp_path):
  text = ML100K + "9\t99\t5\t1\n"  # item 99 only in a short user's events
  inter = P.parse_movielens_100k(write(tmp_path, "u.data", text))
  assert inter.num_items == 3 and 99 not in inter.item_ids


def test_load_dispatch(tmp_path):
  path = write(tmp_path, "u.data", ML100K)
  assert P.load("ml-100k", path, min_events=1).num_events == 6
  assert set(P.FORMATS) == {"ml-100k", "ml-1m", "recbole", "sasrec"}
  with pytest.raises(ValueError, match=r"unknown data format 'ml-20m'.*'ml-100k', 'ml-1m', "
                     r"'recbole', 'sasrec'"):
    P.load("ml-20m", path)


# --------------------------------------------------------------------------------------------
# Malformed files: the message names the file, the line and what was expected
# --------------------------------------------------------------------------------------------

GOOD = "1\t10\t3\t100\n"
BAD_CASES = {
  # name: (parser, file name, content, [substrings of the message])
  "comma_as_u_data": (P.parse_movielens_100k, "u.data", "1,10,3,100\n2,10,3,100\n",
                      ["line 1:", "expected 4 tab-separated columns", "got 1",
                       "looks comma-separated"]),
  "ml1m_as_u_data": (P.parse_movielens_100k, "u.data", "1::10::3::100\n",
                     ["line 1:", "got 1", "looks '::'-separated, expected tab"]),
  "space_as_u_data": (P.parse_movielens_100k, "u.data", "1 10 3 100\n",
                      ["line 1:", "got 1", "looks space-separated"]),
  "column_count": (P.parse_movielens_100k, "u.data", GOOD * 2 + "1\t10\t3\n",
                   ["line 3:", "expected 4 tab-separated columns", "got 3"]),
  "extra_column": (P.parse_movielens_100k, "u.data", GOOD + "1\t10\t3\t100\t7\n",
                   ["line 2:", "got 5"]),
  "user_not_int": (P.parse_movielens_100k, "u.data", GOOD + "abc\t10\t3\t100\n",
                   ["line 2:", "expected an integer user id, got 'abc'", "column 1"]),
  "header_in_u_data": (P.parse_movielens_100k, "u.data", "user\titem\trating\ttime\n" + GOOD,
                       ["line 1:", "integer user id"]),
  "item_float": (P.parse_movielens_100k, "u.data", GOOD + "1\t1.5\t3\t100\n",
                 ["line 2:", "expected an integer item id, got '1.5'"]),
  "rating_text": (P.parse_movielens_100k, "u.data", GOOD + "1\t10\tgood\t100\n",
                  ["line 2:", "expected a numeric rating"]),
  "ts_text": (P.parse_movielens_100k, "u.data", GOOD * 3 + "1\t10\t3\tsoon\n",
              ["line 4:", "non-negative integer timestamp", "non-numeric 'soon'"]),
  "ts_negative": (P.parse_movielens_100k, "u.data", GOOD + "1\t10\t3\t-5\n",
                  ["line 2:", "negative -5"]),
  "ts_missing": (P.parse_movielens_100k, "u.data", GOOD + "1\t10\t3\t\n" + GOOD,
                 ["line 2:", "missing timestamp"]),
  "ts_float": (P.parse_movielens_100k, "u.data", GOOD + "1\t10\t3\t1.5\n",
               ["line 2:", "integer timestamp, got '1.5'"]),
  "blank_middle": (P.parse_movielens_100k, "u.data", GOOD + "\n" + GOOD,
                   ["line 2:", "blank line"]),
  "empty": (P.parse_movielens_100k, "u.data", "", ["empty file, expected tab-separated"]),
  "whitespace_only": (P.parse_movielens_100k, "u.data", "\n \n\n", ["empty file, expected"]),
  "ml1m_given_tabs": (P.parse_movielens_1m, "ratings.dat", GOOD,
                      ["line 1:", "expected 4 '::'-separated columns", "looks tab-separated"]),
  "ml1m_bad_ts": (P.parse_movielens_1m, "ratings.dat", "1::2::3::4\n1::2::3::x\n",
                  ["line 2:", "timestamp"]),
  "ml1m_triple_colon": (P.parse_movielens_1m, "ratings.dat", "1::2::3::4\n1:::2::3::4\n",
                        ["line 2:", "integer item id, got ':2'"]),
  "ml1m_empty": (P.parse_movielens_1m, "ratings.dat", "", ["empty file, expected '::'"]),
  "recbole_no_item": (P.parse_recbole_inter, "a.inter", "user_id:token\titem:token\n1\t2\n",
                      ["line 1:", "bad RecBole header", "'item_id'"]),
  "recbole_header_is_data": (P.parse_recbole_inter, "a.inter", "1\t2\t3\n",
                             ["line 1:", "missing field(s) 'user_id', 'item_id'"]),
  "recbole_header_only": (P.parse_recbole_inter, "a.inter",
                          "user_id:token\titem_id:token\n\n", ["header-only file"]),
  "recbole_empty": (P.parse_recbole_inter, "a.inter", "", ["empty file, expected a header"]),
  "recbole_columns": (P.parse_recbole_inter, "a.inter",
                      "user_id:token\titem_id:token\tx:float\n1\t2\t3\n1\t2\n",
                      ["line 3:", "expected 3 tab-separated columns", "got 2"]),
  "recbole_ts_text": (P.parse_recbole_inter, "a.inter",
                      "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\tx\n",
                      ["line 3:", "non-numeric 'x'"]),
  "recbole_ts_nan": (P.parse_recbole_inter, "a.inter",
                     "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n",
                     ["line 2:", "finite timestamp"]),
  "recbole_ts_negative": (P.parse_recbole_inter, "a.inter",
                          "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\t-1\n",
                          ["line 3:", "negative -1"]),
  "recbole_missing_user": (P.parse_recbole_inter, "a.inter",
                           "user_id:token\titem_id:token\n1\t2\n\t2\n",
                           ["line 3:", "missing user_id"]),
  "sasrec_not_int": (P.parse_sasrec_text, "b.txt", "1 2 3\n2 4 x5 6\n",
                     ["line 2:", "expected an integer item id, got 'x5'", "field 3"]),
  "sasrec_commas": (P.parse_sasrec_text, "b.txt", "1 2 3\n2,4,5\n",
                    ["line 2:", "integer user id", "looks comma-separated"]),
  "sasrec_blank_middle": (P.parse_sasrec_text, "b.txt", "1 2 3\n\n2 4 5\n",
                          ["line 2:", "blank line"]),
  "sasrec_duplicate_user": (P.parse_sasrec_text, "b.txt", "1 2 3\n2 4\n1 5 6\n",
                            ["line 3:", "user 1 already appeared on line 1"]),
  "sasrec_empty": (P.parse_sasrec_text, "b.txt", "\n", ["empty file, expected lines"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed(tmp_path, case):
  parser, name, text, needles = BAD_CASES[case]
  path = write(tmp_path, name, text)
  with pytest.raises(ValueError) as info:
    parser(path, min_events=1)
  msg = str(info.value)
  assert msg.startswith(f"{path}: "), msg
  for needle in needles:
    assert needle in msg, msg


def test_error_deep_in_a_large_file_names_the_line(tmp_path):
  rng = np.random.default_rng(0)
  rows = [f"{u}\t{i}\t3\t{t}" for u, i, t in rng.integers(1, 1000, (20000, 3))]
  rows[15432] = rows[15432].replace("\t3\t", "\t3\t-")
  path = write(tmp_path, "u.data", "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"u\.data: line 15433: .*negative"):
    P.parse_movielens_100k(path)
  rows[15432] = rows[15432].replace("\t3\t-", "::3::")
  path = write(tmp_path, "u.data", "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"u\.data: line 15433: expected 4 tab-separated"):
    P.parse_movielens_100k(path)


def test_invalid_utf8_names_the_line(tmp_path):
  path = write(tmp_path, "u.data", GOOD.encode() + b"1\t\xff\t3\t100\n", "wb")
  with pytest.raises(ValueError, match=r"u\.data: line 2: .*not valid UTF-8"):
    P.parse_movielens_100k(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    P.parse_movielens_100k(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# Split and popularity
# --------------------------------------------------------------------------------------------


def test_leave_one_out(tmp_path):
  text = ML100K + "".join(f"8\t{i}\t3\t{i}\n" for i in (40, 50, 60, 70, 80))
  inter = P.parse_movielens_100k(write(tmp_path, "u.data", text))
  split = P.leave_one_out(inter)
  assert len(split) == 3 and split.num_items == inter.num_items == 8
  np.testing.assert_array_equal(split.users, [5, 7, 8])
  assert split.valid_history is split.train
  np.testing.assert_array_equal(split.train.lengths(), [1, 1, 3])
  np.testing.assert_array_equal(split.test_history.lengths(), [2, 2, 4])
  seq, ts = inter.sequence(2)  # user 8: items 40..80 at times 40..80
  np.testing.assert_array_equal(split.train.sequence(2)[0], seq[:3])
  np.testing.assert_array_equal(split.valid_history.sequence(2)[1], ts[:3])
  np.testing.assert_array_equal(split.test_history.sequence(2)[0], seq[:4])
  np.testing.assert_array_equal(split.test_history.sequence(2)[1], [40, 50, 60, 70])
  assert split.valid_target[2] == seq[3] and split.test_target[2] == seq[4]
  assert split.valid_target_ts[2] == 70 and split.test_target_ts[2] == 80
  np.testing.assert_array_equal(inter.item_ids[split.valid_target], [10, 10, 70])
  np.testing.assert_array_equal(inter.item_ids[split.test_target], [20, 30, 80])
  np.testing.assert_array_equal(split.train.ratings, inter.ratings[[0, 3, 6, 7, 8]])
  short = P.parse_movielens_100k(write(tmp_path, "s.data", GOOD + GOOD), min_events=2)
  with pytest.raises(ValueError, match="at least 3 events per user; user 1 has 2"):
    P.leave_one_out(short)


def test_popularity():
  counts = P.popularity(np.array([1, 3, 3, 0, 3]), 4)
  np.testing.assert_array_equal(counts, [0, 1, 0, 3, 0])
  assert counts.dtype == np.int64
  with pytest.raises(ValueError, match=r"0\.\.4"):
    P.popularity(np.array([5]), 4)


# --------------------------------------------------------------------------------------------
# Real data (development copies in ../shared/data)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_real(shared_data):
  path = shared_data / "ml-100k" / "u.data"
  if not path.is_file():
    pytest.skip(f"real data not available: {path} does not exist")
  return path, P.parse_movielens_100k(path)


def test_ml100k_real(ml100k_real):
  _, inter = ml100k_real
  assert (len(inter), inter.num_items, inter.num_events) == (943, 1682, 100000)
  np.testing.assert_array_equal(inter.item_ids, np.arange(1683))  # ids already dense
  assert inter.lengths().min() == 20 and inter.skipped["short_users"] == 0
  assert np.all(np.diff(inter.timestamps)[np.diff(np.repeat(np.arange(943),
                                                           inter.lengths())) == 0] >= 0)
  last = inter.offsets[1:] - 1
  tie = np.mean(inter.timestamps[last] == inter.timestamps[last - 1])
  assert abs(tie - 0.44) < 0.005, tie


def test_ml100k_real_popularity_baseline(ml100k_real):
  # DESIGN.md: with row order on ties, popularity HR@10 0.0498, NDCG@10 0.0230 (an item-id
  # tie-break gives 0.0125). Popularity from training events; rank = items scored strictly higher.
  _, inter = ml100k_real
  split = P.leave_one_out(inter)
  pop = P.popularity(split.train.items, split.num_items)
  rank = (pop[1:][None, :] > pop[split.test_target][:, None]).sum(1)
  hr = np.mean(rank < 10)
  ndcg = np.mean(np.where(rank < 10, 1 / np.log2(rank + 2), 0))
  assert hr == pytest.approx(0.0498, abs=5e-4) and ndcg == pytest.approx(0.0230, abs=5e-4)


def test_ml100k_real_same_through_every_format(ml100k_real, tmp_path):
  path, inter = ml100k_real
  d = np.loadtxt(path, dtype=np.int64).tolist()
  (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in d))
  (tmp_path / "x.inter").write_text(
    "rating:float\ttimestamp:float\tuser_id:token\titem_id:token\n"
    + "".join(f"{r}\t{t}\t{u}\t{i}\n" for u, i, r, t in d))
  for other in (P.load("ml-1m", tmp_path), P.load("recbole", tmp_path / "x.inter")):
    for name in ("users", "offsets", "items", "timestamps", "ratings", "item_ids"):
      np.testing.assert_array_equal(getattr(other, name), getattr(inter, name), err_msg=name)


def test_beauty_real(shared_data):
  path = shared_data / "amazon-beauty" / "Beauty.txt"
  if not path.is_file():
    pytest.skip(f"real data not available: {path} does not exist")
  inter = P.load("sasrec", path)
  assert (len(inter), inter.num_items, inter.num_events) == (22363, 12101, 198502)
  assert inter.skipped["short_users"] == 0
  first = path.read_text().split("\n", 1)[0].split()
  assert inter.users[0] == int(first[0])
  np.testing.assert_array_equal(inter.item_ids[inter.sequence(0)[0]], [int(x) for x in first[1:]])
