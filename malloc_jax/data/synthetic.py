"""Seeded synthetic long histories whose next event depends on recent AND distant events.

Each user's sequence mixes two mechanisms:

* recent: a global Markov chain over items (each item has ``branching`` successors with
  decreasing probabilities), so the last event predicts the next one;
* distant: with probability ``p_copy`` the event at step t repeats the event at t - ``lag``
  (a periodic routine), so predicting it needs the memory of an event ``lag`` steps back.

A memory that keeps fewer than ``lag`` recent events cannot recover the copies; one that keeps
the right old events (by attention, say) can. Remaining events (``p_noise``) are drawn from a
Zipf popularity law. Timestamps increase by exponential gaps (mean ``mean_gap`` seconds).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Parameters of the generator (all validated by :func:`generate`)."""

  num_users: int = 2000
  num_items: int = 1000
  min_len: int = 160
  max_len: int = 256
  lag: int = 128
  p_copy: float = 0.3
  p_noise: float = 0.1
  branching: int = 4
  zipf: float = 1.0
  mean_gap: float = 3600.0
  seed: int = 0


def _check(spec: SyntheticSpec) -> None:
  def bad(field, why):
    raise ValueError(f"data.synthetic.{field}={getattr(spec, field)!r}: {why}")

  if spec.num_users < 1:
    bad("num_users", "expected >= 1")
  if spec.num_items < max(2, spec.branching):
    bad("num_items", f"expected >= max(2, branching={spec.branching})")
  if spec.min_len < 3:
    bad("min_len", "expected >= 3 (leave-one-out needs a history, a validation and a test event)")
  if spec.max_len < spec.min_len:
    bad("max_len", f"expected >= min_len={spec.min_len}")
  if not 1 <= spec.lag < spec.min_len:
    bad("lag", f"expected 1 <= lag < min_len={spec.min_len}")
  for f in ("p_copy", "p_noise"):
    if not 0.0 <= getattr(spec, f) <= 1.0:
      bad(f, "expected a probability in [0, 1]")
  if spec.p_copy + spec.p_noise > 1.0:
    bad("p_noise", f"p_copy + p_noise must be <= 1 (p_copy={spec.p_copy})")
  if spec.branching < 1:
    bad("branching", "expected >= 1")


def generate_sequences(spec: SyntheticSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Generates (items, timestamps) per user; item ids are 1..num_items.

  Returns:
    Two lists of length num_users: int32 item ids and int64 timestamps, in time order.
  """
  _check(spec)
  rng = np.random.default_rng(spec.seed)
  V, U = spec.num_items, spec.num_users
  succ = rng.integers(1, V + 1, size=(V + 1, spec.branching))  # successors of each item
  w = 0.5 ** np.arange(spec.branching)
  succ_p = np.cumsum(w / w.sum())
  pop = 1.0 / np.arange(1, V + 1) ** spec.zipf
  pop_cdf = np.cumsum(pop / pop.sum())
  perm = rng.permutation(V) + 1  # popularity rank -> item id, so ids carry no signal

  lengths = rng.integers(spec.min_len, spec.max_len + 1, size=U)
  T = int(lengths.max())
  x = np.zeros((U, T), np.int64)
  x[:, 0] = perm[np.searchsorted(pop_cdf, rng.random(U))]
  for t in range(1, T):
    u = rng.random(U)
    branch = np.searchsorted(succ_p, rng.random(U))
    markov = succ[x[:, t - 1], np.minimum(branch, spec.branching - 1)]
    noise = perm[np.minimum(np.searchsorted(pop_cdf, rng.random(U)), V - 1)]
    nxt = np.where(u < spec.p_noise, noise, markov)
    if t >= spec.lag:
      nxt = np.where(u >= 1.0 - spec.p_copy, x[:, t - spec.lag], nxt)
    x[:, t] = nxt
  gaps = rng.exponential(spec.mean_gap, size=(U, T)).astype(np.int64) + 1
  ts = 1_600_000_000 + rng.integers(0, 10**7, size=(U, 1)) + np.cumsum(gaps, axis=1)
  items = [x[i, : lengths[i]].astype(np.int32) for i in range(U)]
  stamps = [ts[i, : lengths[i]] for i in range(U)]
  return items, stamps
