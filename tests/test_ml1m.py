"""The ML-1M protocol on the shared copy of ml-1m.txt / movies.dat (skips when absent)."""

import math

import numpy as np
import pytest

from malloc_jax.data import parsers
from malloc_jax.data.dataset import build_dataset
from malloc_jax.metrics import popularity_ranks, retrieval_metrics


@pytest.fixture(scope="module")
def ml1m(shared_data):
  path = shared_data / "ml-1m" / "ml-1m.txt"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  lines = [[int(t) for t in line.split()] for line in path.read_text().split("\n") if line]
  return path, lines


def test_sasrec_parser_reads_ml1m(ml1m):
  path, lines = ml1m
  inter = parsers.load("sasrec", path)
  assert len(inter) == 6040 and inter.num_events == 1_000_209 and inter.num_items == 3706
  by_user = {line[0]: line[1:] for line in lines}
  for u in (0, 17, 6039):  # users in increasing id order; events in line order
    items, ts = inter.sequence(u)
    raw = by_user[int(inter.users[u])]
    np.testing.assert_array_equal(inter.item_ids[items], raw)  # dense ids map back
    np.testing.assert_array_equal(ts, np.arange(len(raw)))  # event index as time
  assert inter.items.min() == 1 and inter.items.max() == 3706


def test_popularity_baseline_reproduces_reference(ml1m):
  """Popularity NDCG@10 0.0093 / HR@10 0.0189 (independent PyTorch implementation).

  Computed twice: through the project's pipeline, and from the raw lines (counts of the
  training events s_1..s_{n-2}, rank = items with a strictly larger count)."""
  path, lines = ml1m
  inter = parsers.load("sasrec", path)
  items, ts = zip(*(inter.sequence(u) for u in range(len(inter))))
  data = build_dataset("ml1m", list(items), list(ts), inter.num_items, 200)
  got = retrieval_metrics(popularity_ranks(data.popularity, data.test.target), (10,))
  counts = {}
  for line in lines:
    for it in line[1:-2]:
      counts[it] = counts.get(it, 0) + 1
  allc = np.array(sorted(counts.get(i, 0) for i in {i for line in lines for i in line[1:]}))
  ndcg = hr = 0.0
  for line in lines:
    c = counts.get(line[-1], 0)
    r = len(allc) - np.searchsorted(allc, c, side="right")
    if r < 10:
      hr += 1
      ndcg += 1 / math.log2(r + 2)
  assert got["NDCG@10"] == pytest.approx(ndcg / len(lines), abs=1e-12)
  assert got["HR@10"] == pytest.approx(hr / len(lines), abs=1e-12)
  assert got["NDCG@10"] == pytest.approx(0.0093, abs=0.00051)
  assert got["HR@10"] == pytest.approx(0.0189, abs=0.00051)


def test_history_lengths_of_the_buckets(ml1m):
  from malloc_jax import stats
  path, lines = ml1m
  inter = parsers.load("sasrec", path)
  hist = np.diff(inter.offsets) - 1  # test history: every event but the target
  counts = np.bincount(stats.length_buckets(hist), minlength=3)
  ref = [sum(1 for x in lines if len(x) - 2 <= 200),
         sum(1 for x in lines if 200 < len(x) - 2 <= 512), sum(1 for x in lines if len(x) - 2 > 512)]
  assert counts.tolist() == ref and sum(ref) == 6040


def test_genres(shared_data, tmp_path):
  path = shared_data / "ml-1m" / "movies.dat"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  g = parsers.parse_movielens_genres(path)
  assert len(g.movie_ids) == 3883 and len(g.names) == 18
  toy = g.multi_hot[list(g.movie_ids).index(1)]
  assert {g.names[j] for j in np.flatnonzero(toy)} == {"Animation", "Children's", "Comedy"}
  inter = parsers.load("sasrec", shared_data / "ml-1m" / "ml-1m.txt")
  hot = g.for_items(inter.item_ids)
  assert hot.shape == (3707, 18) and not hot[0].any() and hot[1:].any(axis=1).all()
  bad = tmp_path / "movies.dat"
  bad.write_bytes(b"1::Toy Story (1995)::Comedy\n2::Jumanji (1995)\n")
  with pytest.raises(ValueError, match=r"movies.dat: line 2: 2 '::'-separated fields"):
    parsers.parse_movielens_genres(bad)
  with pytest.raises(ValueError, match="movie id 99999"):
    g.for_items(np.array([0, 99999]))
