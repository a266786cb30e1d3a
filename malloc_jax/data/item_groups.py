"""Item groups (genres, topics) for hard negatives of the ranking task, in NumPy.

A group is a set of items that share a label, e.g. a MovieLens movie's primary genre
(``parsers.Genres.primary_for_items``). Training impressions draw "hard" negatives among
the other members of the positive's group (``train.RankingSampler`` reads the ``members`` /
``item_group`` arrays built here); evaluation impressions are the target, ``num_hard``
other members of its group and ``num_easy`` items of other groups
(:func:`grouped_candidates`), as the synthetic topics task builds them
(``data.synthetic.ranking_candidates``).
"""

from __future__ import annotations

import numpy as np


def groups_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The member table of items labelled by group.

  Args:
    labels: [V + 1] int group of each dense item id (-1: none; row 0, padding, must be -1).

  Returns:
    (members [G, S] int32: row g holds the items of group g in increasing id order, 0-padded,
    G = max label + 1, S = the largest group's size; item_group [V + 1] int64 = ``labels``).
  """
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or len(labels) < 2:
    raise ValueError(f"groups_from_labels: expected labels [V + 1], got shape {labels.shape}")
  if labels[0] != -1:
    raise ValueError("groups_from_labels: item 0 (padding) must have label -1")
  if labels.min() < -1:
    raise ValueError(f"groups_from_labels: labels must be >= -1, got {labels.min()}")
  G = int(labels.max()) + 1
  if G < 1:
    raise ValueError("groups_from_labels: no item has a group")
  sizes = np.bincount(labels[labels >= 0], minlength=G)
  members = np.zeros((G, int(sizes.max())), np.int32)
  items = np.flatnonzero(labels >= 0)  # increasing id
  order = items[np.argsort(labels[items], kind="stable")]
  slot = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  members[labels[order], slot] = order
  return members, labels


def grouped_candidates(target: np.ndarray, members: np.ndarray, item_group: np.ndarray,
                       num_hard: int, num_easy: int, seed: int = 0) -> np.ndarray:
  """Evaluation impressions: each target, hard negatives from its group, easy ones outside.

  Hard negatives are drawn uniformly without replacement among the other members of the
  target's group; when the group has fewer than ``num_hard`` other members, all of them are
  taken and the remaining hard slots are filled like easy ones (so every impression has
  ``1 + num_hard + num_easy`` candidates). Easy negatives are uniform with replacement over
  the grouped items outside the target's group. Drawn from ``np.random.default_rng(seed)``.

  Args:
    target: [U] item ids (each in a group). members, item_group: :func:`groups_from_labels`.
    num_hard, num_easy: counts (>= 0, at least one negative).
    seed: integer seed.

  Returns:
    candidates [U, 1 + num_hard + num_easy] int32, the target in column 0, then the hard
    columns, then the easy ones.
  """
  target = np.asarray(target, np.int64)
  item_group = np.asarray(item_group, np.int64)
  if num_hard < 0 or num_easy < 0 or num_hard + num_easy < 1:
    raise ValueError(f"grouped_candidates: num_hard={num_hard}, num_easy={num_easy}: expected "
                     "counts >= 0 with at least one negative")
  if target.size and (target.min() < 1 or target.max() >= len(item_group)):
    raise ValueError(f"grouped_candidates: targets must lie in 1..{len(item_group) - 1}")
  g = item_group[target]
  if np.any(g < 0):
    u = int(np.flatnonzero(g < 0)[0])
    raise ValueError(f"grouped_candidates: target item {target[u]} (user {u}) has no group")
  rng = np.random.default_rng(seed)
  U, S = len(target), members.shape[1]
  grouped = np.flatnonzero(item_group >= 0)  # [N] every grouped item
  gsize = np.bincount(item_group[grouped], minlength=members.shape[0])
  mem = members[g]  # [U, S]
  other = (mem > 0) & (mem != target[:, None])  # the other members of each target's group
  key = np.where(other, rng.random((U, S)), 2.0)
  pick = np.argsort(key, axis=1, kind="stable")[:, :num_hard]  # [U, H] random order, first H
  hard = np.take_along_axis(mem, pick, 1)
  hard_ok = np.take_along_axis(key, pick, 1) < 2.0
  # Easy: uniform over grouped items outside the target's group (rank within the complement).
  n_out = len(grouped) - gsize[g]  # [U]
  if np.any(n_out < 1):
    raise ValueError("grouped_candidates: every grouped item is in the target's group")
  by_group = grouped[np.argsort(item_group[grouped], kind="stable")]  # items sorted by group
  start = np.cumsum(gsize) - gsize  # [G] first index of each group in by_group
  E = num_hard + num_easy
  r = np.floor(rng.random((U, E)) * n_out[:, None]).astype(np.int64)  # rank in the complement
  r = r + np.where(r >= start[g][:, None], gsize[g][:, None], 0)  # skip the target's group
  fill = by_group[r]  # [U, H + E]
  hard = np.where(hard_ok, hard, fill[:, :num_hard])
  return np.concatenate([target[:, None], hard, fill[:, num_hard:]], axis=1).astype(np.int32)
