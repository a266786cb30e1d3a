"""The topics generator as a ranking task: Bayes-optimal ranker, impressions, ranking loss."""

from __future__ import annotations

import numpy as np
import pytest

from malloc_jax.data.synthetic import (
  SyntheticSpec,
  bayes_ranking_scores,
  generate_sequences,
  memory_views,
  ranking_candidates,
  topic_index,
)
from malloc_jax.ranking import impression_metrics, paired_se, per_user_candidate_metrics

SPEC = SyntheticSpec(kind="topics", num_users=300, num_items=1000, topic_size=10, min_len=460,
                     max_len=512, lag=1, p_copy=0.5, p_noise=0.05, branching=2)


def test_candidates_are_target_hard_and_easy():
  items, _ = generate_sequences(SPEC)
  target = np.array([s[-1] for s in items])
  cands = ranking_candidates(SPEC, target, 9, 10, seed=0)
  _, topic, _ = topic_index(SPEC)
  assert cands.shape == (300, 20)
  np.testing.assert_array_equal(cands[:, 0], target)
  # Hard: the 9 other members of the target's topic, each exactly once.
  assert np.all(topic[cands[:, 1:10]] == topic[target][:, None])
  assert all(len(set(r)) == 10 for r in cands[:, :10])
  # Easy: other topics.
  assert np.all(topic[cands[:, 10:]] != topic[target][:, None])
  with pytest.raises(ValueError, match="num_hard=10"):
    ranking_candidates(SPEC, target, 10, 0)


def test_per_user_metrics_closed_form():
  s = np.array([[3.0, 1.0, 2.0, 5.0], [0.0, 0.0, 1.0, -1.0]])
  per = per_user_candidate_metrics(s)
  np.testing.assert_allclose(per["auc"], [2 / 3, 1 - 1.5 / 3])
  np.testing.assert_allclose(per["ndcg10"], [1 / np.log2(3), 1 / np.log2(3.5)])
  summary, _ = impression_metrics(s)
  assert summary["GAUC"] == pytest.approx(np.mean(per["auc"]))
  d, se = paired_se([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  assert d == 2.0 and se == pytest.approx(1.0 / np.sqrt(3))


def test_bayes_ranker_needs_the_whole_history():
  """The Bayes-optimal ranker (float64, from the generator's definition) loses GAUC and
  candidate NDCG@10 when it sees only the last eighth of the memory: the gap the ranking
  table measures compressors against."""
  items, _ = generate_sequences(SPEC)
  target = np.array([s[-1] for s in items])
  last = np.array([s[-2] for s in items])
  hist = [s[:-2] for s in items]
  cands = ranking_candidates(SPEC, target, 9, 10, seed=0)
  res = {}
  for view, mem in memory_views(hist, seed=0).items():
    _, per = impression_metrics(np.log(bayes_ranking_scores(SPEC, mem, last, cands)))
    res[view] = per
  whole, eighth = res["whole"], res["last_1/8"]
  d, se = paired_se(whole["ndcg10"], eighth["ndcg10"])
  assert d > 0.05 and d > 3 * se, (d, se)
  d, se = paired_se(whole["auc"], eighth["auc"])
  assert d > 0.02 and d > 3 * se, (d, se)
  # Monotone in the kept fraction (means over the same users).
  g = [res[k]["auc"].mean() for k in ("whole", "last_1/2", "last_1/4", "last_1/8", "last_1/16")]
  assert all(a >= b - 1e-3 for a, b in zip(g, g[1:])), g
  # A cross-check of the closed form: with an empty memory, a hard negative and the target
  # score alike unless the topic chain separates them (it cannot: same topic).
  blank = bayes_ranking_scores(SPEC, [np.zeros(0, np.int64)] * 300, last, cands)
  np.testing.assert_allclose(blank[:, 0], blank[:, 1], rtol=1e-12)


def test_ranking_training_step_reduces_loss():
  """A few ranking updates on a tiny topics set lower the BCE (end-to-end, jitted)."""
  from malloc_jax.data.dataset import build_dataset
  from malloc_jax.models import make_model
  from malloc_jax.train import RankingSampler, Trainer, fit, make_optimizer

  spec = SyntheticSpec(kind="topics", num_users=64, num_items=60, topic_size=6, min_len=20,
                       max_len=24, lag=1, p_copy=0.8, p_noise=0.0, branching=1)
  items, ts = generate_sequences(spec)
  data = build_dataset("tiny", items, ts, spec.num_items, 24)
  members, topic, _ = topic_index(spec)
  for name in ("hstu", "sasrec", "hstu_rwkv"):
    model = make_model(name, spec.num_items, dim=16, heads=1, num_layers=1, max_len=24,
                       dropout=0.0, seed=0)
    sampler = RankingSampler(uniform=3, popularity=2, hard=3, item_popularity=data.popularity,
                             groups=members, item_group=topic)
    trainer = Trainer(model, make_optimizer(1e-2, 0.0), 0, dropout=False, task="ranking",
                      sampler=sampler)
    losses = []
    fit(trainer, data, steps=60, batch_size=16, seed=0, log_every=20,
        on_step=lambda s, st, logs: losses.append(logs["loss"]) if logs else None,
        print_fn=lambda *_: None)
    assert losses[-1] < losses[0] - 0.05, (name, losses)
  with pytest.raises(ValueError, match="needs item groups"):
    RankingSampler(hard=2)
  with pytest.raises(ValueError, match="task='bogus'"):
    Trainer(model, make_optimizer(1e-2, 0.0), 0, task="bogus")
