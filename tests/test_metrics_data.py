"""Metrics against closed forms; the synthetic generator's distant dependence."""

import jax.numpy as jnp
import numpy as np
import pytest

from malloc_jax.data.dataset import build_dataset
from malloc_jax.data.synthetic import SyntheticSpec, generate_sequences, topic_structure
from malloc_jax.metrics import popularity_ranks, retrieval_metrics, target_rank


def test_target_rank_counts_strictly_higher_scores():
  logits = jnp.array([[-jnp.inf, 0.1, 0.5, 0.3, 0.5], [-jnp.inf, 1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(np.asarray(target_rank(logits, jnp.array([3, 1]))), [2, 0])


def test_retrieval_metrics_closed_form():
  m = retrieval_metrics(np.array([0, 1, 9, 10, 100]), ks=(10,))
  assert m["HR@10"] == pytest.approx(3 / 5)
  ndcg = (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5
  assert m["NDCG@10"] == pytest.approx(ndcg)
  assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 101) / 5)
  with pytest.raises(ValueError, match="no users"):
    retrieval_metrics(np.array([]))


def test_popularity_ranks():
  pop = np.array([0, 5, 3, 3, 9])
  np.testing.assert_array_equal(popularity_ranks(pop, np.array([4, 2, 1])), [0, 2, 1])


def test_synthetic_is_seeded_and_has_distant_copies():
  spec = SyntheticSpec(num_users=300, num_items=200, min_len=80, max_len=100, lag=40,
                       p_copy=0.3, p_noise=0.1)
  a, ta = generate_sequences(spec)
  b, _ = generate_sequences(spec)
  assert all((x == y).all() for x, y in zip(a, b))
  assert all((np.diff(t) > 0).all() for t in ta)
  # the event lag steps back predicts the next one far above chance (~1/200) ...
  same = np.mean(np.concatenate([s[40:] == s[:-40] for s in a]))
  assert same > 0.25
  # ... and it is not visible in the recent past: the previous 20 events rarely hold it
  recent = np.mean([s[t] in s[t - 20:t] for s in a[:50] for t in range(60, len(s))])
  assert recent < same - 0.1


def _bayes_ranks(spec, items, keep_last=None):
  """0-based rank of each user's last event under the Bayes-optimal predictor of the topics
  generator (float64 NumPy, written from its definition), seeing the whole history or only
  its last ``keep_last`` events; ties broken at random."""
  members, succ, succ_p, _ = topic_structure(spec)
  Z, S = members.shape
  topic = np.full(spec.num_items + 1, -1)
  slot = np.zeros(spec.num_items + 1, np.int64)
  for z in range(Z):
    topic[members[z]], slot[members[z]] = z, np.arange(S)
  p_branch = np.diff(np.concatenate([[0.0], succ_p]))
  hit, miss = spec.p_copy + (1 - spec.p_copy) / S, (1 - spec.p_copy) / S
  rng = np.random.default_rng(0)
  ranks = []
  for seq in items:
    hist, target = seq[:-1], seq[-1]
    seen = hist if keep_last is None else hist[-keep_last:]
    counts = np.zeros((Z, S))
    np.add.at(counts, (topic[seen], slot[seen]), 1.0)
    log_post = counts * np.log(hit / miss)  # preferred member: uniform prior x likelihood
    post = np.exp(log_post - log_post.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    p_topic = np.full(Z, spec.p_noise / Z)
    np.add.at(p_topic, succ[topic[hist[-1]]], (1 - spec.p_noise) * p_branch)
    score = np.zeros(spec.num_items + 1)
    score[members.ravel()] = (p_topic[:, None] * (post * spec.p_copy + miss)).ravel()
    score += rng.random(score.shape) * 1e-12
    ranks.append(int((score > score[target]).sum()))
  return np.array(ranks)


def test_synthetic_topics_needs_the_whole_history():
  """With the topics generator, the Bayes-optimal predictor loses accuracy when it sees only
  the recent eighth of the history (the configs/synthetic_long.py setting, 1,024 events)."""
  spec = SyntheticSpec(kind="topics", num_users=300, num_items=1000, topic_size=10,
                       min_len=900, max_len=1024, p_copy=0.5, p_noise=0.05, branching=2)
  items, stamps = generate_sequences(spec)
  again, _ = generate_sequences(spec)
  assert all((x == y).all() for x, y in zip(items, again))
  assert all((np.diff(t) > 0).all() for t in stamps)
  assert all(1 <= s.min() and s.max() <= 1000 for s in items)
  full = retrieval_metrics(_bayes_ranks(spec, items), ks=(10,))["NDCG@10"]
  recent = retrieval_metrics(_bayes_ranks(spec, items, keep_last=128), ks=(10,))["NDCG@10"]
  assert full > 0.4
  assert recent < full - 0.1, (full, recent)


def test_synthetic_bad_spec_names_field():
  with pytest.raises(ValueError, match=r"data\.synthetic\.lag=500"):
    generate_sequences(SyntheticSpec(min_len=100, max_len=120, lag=500))
  with pytest.raises(ValueError, match=r"data\.synthetic\.kind='topic'"):
    generate_sequences(SyntheticSpec(kind="topic"))
  with pytest.raises(ValueError, match=r"data\.synthetic\.topic_size=600"):
    generate_sequences(SyntheticSpec(kind="topics", num_items=1000, topic_size=600))


def test_leave_one_out_dataset():
  items = [np.array([1, 2, 3, 4], np.int32), np.array([5, 6, 7], np.int32)]
  ts = [np.array([10, 20, 30, 40]), np.array([1, 2, 3])]
  d = build_dataset("toy", items, ts, 7, max_len=2)
  np.testing.assert_array_equal(d.test.target, [4, 7])
  np.testing.assert_array_equal(d.valid.target, [3, 6])
  np.testing.assert_array_equal(d.test.items, [[2, 3], [5, 6]])  # last max_len events
  np.testing.assert_array_equal(d.valid.length, [2, 1])
  np.testing.assert_array_equal(d.train.items, [[1, 2, 0], [5, 0, 0]])
  np.testing.assert_array_equal(d.popularity, [0, 1, 1, 0, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="at least 3"):
    build_dataset("toy", [np.array([1, 2])], [np.array([1, 2])], 2, 4)


def _reference_loss(model, ev, candidates):
  """(mean loss, predictions) of the sampled softmax in float64 NumPy over every prediction
  (b, t) of the next event: the target's logit against itself plus ``candidates(b, t,
  target)`` (item ids; the full softmax: every other item)."""
  from malloc_jax.models import Events

  prefix = Events(ev.items[:, :-1], ev.ts[:, :-1], jnp.maximum(ev.length - 1, 0))
  h = np.asarray(model(prefix), np.float64)
  h = h / np.sqrt((h ** 2).sum(-1, keepdims=True) + 1e-6)
  table = np.asarray(model.item_embeddings(), np.float64)
  total, n = 0.0, 0
  for b, k in enumerate(np.asarray(ev.length)):
    for t in range(k - 1):
      tgt = int(ev.items[b, t + 1])
      z = table[[tgt] + candidates(b, t, tgt)] @ h[b, t] / model.temperature
      total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[0]
      n += 1
  return total / n, n


def test_full_softmax_loss_matches_numpy():
  """train.num_negatives=0: the mean cross-entropy over all items 1..V, in float64 NumPy."""
  import jax

  from malloc_jax.train import sampled_softmax_loss
  from tests.helpers import random_events, random_model

  model = random_model("sasrec", num_items=30)
  ev = random_events(3, 9, [9, 5, 2], num_items=30)
  loss, count = sampled_softmax_loss(model, ev.items, ev.ts, ev.length, jax.random.key(0), 0,
                                     dropout=False)
  want, n = _reference_loss(model, ev, lambda b, t, tgt: [i for i in range(1, 31) if i != tgt])
  assert int(count) == n
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_length_buckets_cover_every_user_once_an_epoch_and_trim_only_padding():
  from malloc_jax.train import batch_indices, bucket_width

  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 201, size=1000)
  per_epoch = 1000 // 64
  for epoch in range(2):
    batches = [batch_indices(1000, 64, epoch * per_epoch + i, seed=1, lengths=lengths)
               for i in range(per_epoch)]
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen) == per_epoch * 64  # no user twice an epoch
    # pools of 16 batches sorted by length: batches are much tighter than random ones
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths), spread
    widths = {bucket_width(lengths[b].max(), 201, 4) for b in batches}
    assert widths <= {51, 102, 153, 201} and len(widths) > 1
    assert all(bucket_width(lengths[b].max(), 201, 4) >= lengths[b].max() for b in batches)
  # same (step, seed) -> same users (resumable); no bucketing -> the old shuffles
  again = batch_indices(1000, 64, 3, seed=1, lengths=lengths)
  assert (again == batch_indices(1000, 64, 3, seed=1, lengths=lengths)).all()
  assert bucket_width(77, 201, 0) == 201 and bucket_width(77, 201, 1) == 201
  assert bucket_width(1, 201, 4) == 51 and bucket_width(200, 201, 4) == 201


@pytest.mark.parametrize("sharing", ["batch", "user", "position"])
def test_sampled_softmax_loss_matches_numpy_for_each_negative_sharing(sharing):
  """train.negative_sharing: the loss equals a float64 NumPy loop over every prediction with
  the negatives drawn as documented ([1, 1, K], [B, 1, K] or [B, N, K]; a negative equal to
  the target is dropped), and "user"/"position" really draw different negatives."""
  import jax

  from malloc_jax.train import sampled_softmax_loss
  from tests.helpers import random_events, random_model

  V, K = 30, 6
  model = random_model("sasrec", num_items=V)
  ev = random_events(3, 9, [9, 5, 2], num_items=V)
  key = jax.random.key(3)
  loss, count = sampled_softmax_loss(model, ev.items, ev.ts, ev.length, key, K, dropout=False,
                                     sharing=sharing)
  B, N = ev.items.shape[0], ev.items.shape[1] - 1
  shape = {"batch": (1, 1), "user": (B, 1), "position": (B, N)}[sharing] + (K,)
  neg = np.asarray(jax.random.randint(jax.random.split(key)[1], shape, 1, V + 1))
  neg = np.broadcast_to(neg, (B, N, K))
  if sharing != "batch":
    rows = neg[:, 0] if sharing == "user" else neg.reshape(-1, K)
    assert len({tuple(r) for r in rows}) > 1
  want, n = _reference_loss(model, ev, lambda b, t, tgt: [int(i) for i in neg[b, t] if i != tgt])
  assert int(count) == n
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_unknown_negative_sharing_is_refused_by_name():
  import jax

  from malloc_jax.train import sampled_softmax_loss
  from tests.helpers import random_events, random_model

  model = random_model("sasrec", num_items=30)
  ev = random_events(2, 5, [5, 3], num_items=30)
  with pytest.raises(ValueError, match="negative_sharing"):
    sampled_softmax_loss(model, ev.items, ev.ts, ev.length, jax.random.key(0), 4, dropout=False,
                         sharing="items")
