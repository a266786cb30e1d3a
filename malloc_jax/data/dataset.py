"""From per-user event sequences to static-shape arrays for training and evaluation.

Leave-one-out split (SASRec / HSTU protocol): for a user with events s_1..s_n,
* train:  s_1..s_{n-2} (every prefix predicts its next event),
* valid:  history s_1..s_{n-2}, target s_{n-1},
* test:   history s_1..s_{n-1}, target s_n.
Histories keep their last ``max_len`` events. Arrays are right-padded with item 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from malloc_jax.data.parsers import Interactions, leave_one_out, popularity


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Histories [U, N] (items, ts), their lengths [U] and the held-out targets [U]."""

  items: np.ndarray
  ts: np.ndarray
  length: np.ndarray
  target: np.ndarray
  target_ts: np.ndarray

  def __len__(self) -> int:
    return len(self.length)


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """Training windows [U, N + 1] (inputs are [:, :-1], targets [:, 1:]) and lengths [U]."""

  items: np.ndarray
  ts: np.ndarray
  length: np.ndarray

  def __len__(self) -> int:
    return len(self.length)


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
  """A split dataset ready for the model."""

  name: str
  num_items: int
  max_len: int
  train: TrainSet
  valid: EvalSet
  test: EvalSet
  popularity: np.ndarray  # [V + 1] training-event counts (index 0 unused)

  def eval_set(self, split: str) -> EvalSet:
    if split not in ("valid", "test"):
      raise ValueError(f"eval.split={split!r}: expected 'valid' or 'test'")
    return self.valid if split == "valid" else self.test

  def summary(self) -> str:
    lens = self.test.length + 1
    return (f"{self.name}: {len(self.test)} users, {self.num_items} items, "
            f"{int(lens.sum())} events (history length median {int(np.median(lens))}, "
            f"max {int(lens.max())}; windows of {self.max_len})")


def _pad(seqs: list[np.ndarray], width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  out = np.zeros((len(seqs), width), dtype)
  lens = np.zeros(len(seqs), np.int32)
  for i, s in enumerate(seqs):
    s = s[-width:]
    out[i, : len(s)] = s
    lens[i] = len(s)
  return out, lens


def build_dataset(name: str, items: list[np.ndarray], ts: list[np.ndarray], num_items: int,
                  max_len: int) -> SequenceDataset:
  """Splits per-user sequences (time-ordered, item ids 1..num_items, >= 3 events each).

  Args:
    name: dataset name for reports.
    items, ts: one int array per user.
    num_items: V.
    max_len: N, number of most recent events a history keeps.

  Returns:
    The split, padded dataset.
  """
  if max_len < 2:
    raise ValueError(f"data.max_len={max_len}: expected >= 2")
  if not items:
    raise ValueError(f"{name}: no users")
  # Timestamps are rebased to the earliest event so they fit the model's int32 time axis.
  base = min((int(np.min(t)) for t in ts if len(t)), default=0)
  ts = [np.asarray(t, np.int64) - base for t in ts]
  if max((int(t.max()) for t in ts if len(t)), default=0) >= 2**31:
    raise ValueError(f"{name}: timestamps span more than 2**31 seconds")
  # The one leave-one-out rule (parsers.leave_one_out), applied to these sequences.
  lens = np.array([len(s) for s in items], np.int64)
  split = leave_one_out(Interactions(
      users=np.arange(len(items)), offsets=np.concatenate([[0], np.cumsum(lens)]),
      items=np.concatenate(items).astype(np.int32), timestamps=np.concatenate(ts),
      ratings=None, item_ids=np.arange(num_items + 1), num_items=num_items, source=name))
  seqs = lambda h: list(zip(*(h.sequence(u) for u in range(len(h))), strict=True))
  tr_i, tr_t = seqs(split.train)
  tr_items, tr_len = _pad(tr_i, max_len + 1, np.int32)
  tr_ts, _ = _pad(tr_t, max_len + 1, np.int32)

  def eval_set(history, target, target_ts):
    h_i, h_t = seqs(history)
    h_items, h_len = _pad(h_i, max_len, np.int32)
    h_ts, _ = _pad(h_t, max_len, np.int32)
    return EvalSet(h_items, h_ts, h_len, target.astype(np.int32), target_ts.astype(np.int32))

  pop = popularity(split.train.items, num_items)  # training events
  return SequenceDataset(name=name, num_items=num_items, max_len=max_len,
                         train=TrainSet(tr_items, tr_ts, tr_len),
                         valid=eval_set(split.valid_history, split.valid_target,
                                        split.valid_target_ts),
                         test=eval_set(split.test_history, split.test_target,
                                       split.test_target_ts),
                         popularity=pop)
