"""evaluate_by_length: grouped, trimmed windows give the full-window metrics."""

import numpy as np
import pytest

from malloc_jax import compressors as C
from malloc_jax.data.dataset import EvalSet
from malloc_jax.evaluate import evaluate, evaluate_by_length
from tests.helpers import random_events, random_model


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_trimmed_groups_match_full_windows(name):
  n, users, v = 32, 21, 40
  lengths = np.random.default_rng(3).integers(1, n + 1, users)
  lengths[:3] = [1, n, 17]  # the shortest, the full window, one past the edge (16 < 17)
  ev = random_events(users, n, lengths, num_items=v, seed=4)
  target = np.random.default_rng(5).integers(1, v + 1, users)
  split = EvalSet(items=np.asarray(ev.items), ts=np.asarray(ev.ts), length=lengths,
                  target=target, target_ts=np.asarray(ev.ts).max(axis=1) + 1)
  model = random_model(name, v, max_len=n)
  ref = evaluate(model, split, C.native(), batch_size=8).metrics  # full windows of 32
  got = evaluate_by_length(model, split, C.native(), buckets=2, batch_size=8)  # widths 16, 32
  assert set(got) == set(ref)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12, err_msg=k)
  part = evaluate_by_length(model, split, C.native(), buckets=2, batch_size=8, max_users=10)
  ref10 = evaluate(model, split, C.native(), batch_size=8, max_users=10).metrics
  np.testing.assert_allclose(part["NDCG@10"], ref10["NDCG@10"], rtol=1e-12)
  with pytest.raises(ValueError, match="buckets"):
    evaluate_by_length(model, split, C.native(), buckets=1)
