"""Seeded synthetic long histories whose next event depends on recent AND distant events.

Two generators (``kind``), both mixing a recent and a distant mechanism:

``kind="lag"`` (a periodic routine):

* recent: a global Markov chain over items (each item has ``branching`` successors with
  decreasing probabilities), so the last event predicts the next one;
* distant: with probability ``p_copy`` the event at step t repeats the event at t - ``lag``,
  so predicting it needs the memory of an event ``lag`` steps back.

  A memory that keeps fewer than ``lag`` recent events cannot recover the copies. The catch:
  the copy is addressed by *position*, which attention learns slowly at large lags (a model
  trained briefly at lag 512 ignores it; see BENCHMARKS.md).

``kind="topics"`` (user tastes, content-addressable):

* items are split into topics of ``topic_size`` items (a hidden random partition); the
  topic of the next event follows a global Markov chain over topics (``branching``
  successors with decreasing probabilities, each successor rank a permutation of the topics
  so all topics are equally frequent; with probability ``p_noise`` a uniform topic);
* each user has one preferred item per topic, drawn once; an event in a topic is that
  preferred item with probability ``p_copy``, otherwise a uniform item of the topic.

  Predicting the next event means knowing the next topic (recent: the last event) and the
  user's preferred item in it, which only the user's past visits to that topic reveal: with
  many topics, the last visit is typically far back and the preference is a majority vote
  over all of them. A memory that keeps only recent events sees few visits per topic; one
  that keeps the repeated preferred items (what attention-based eviction tends to keep)
  loses little. Attention finds the evidence by content (same topic), so a model learns it
  quickly at any history length.

In ``lag`` mode the remaining events (``p_noise``) follow a Zipf popularity law. Timestamps
increase by exponential gaps (mean ``mean_gap`` seconds).
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("lag", "topics")


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
  kind: str = "lag"
  topic_size: int = 20


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
  if spec.kind not in KINDS:
    bad("kind", f"expected one of {KINDS}")
  if spec.kind == "topics" and not 2 <= spec.topic_size <= spec.num_items // 2:
    bad("topic_size", f"expected 2 <= topic_size <= num_items / 2 = {spec.num_items // 2}")


def generate_sequences(spec: SyntheticSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Generates (items, timestamps) per user; item ids are 1..num_items.

  Returns:
    Two lists of length num_users: int32 item ids and int64 timestamps, in time order.
  """
  _check(spec)
  if spec.kind == "topics":
    return _topics(spec)
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
  return _finish(spec, rng, x, lengths)


def _finish(spec, rng, x, lengths):
  U, T = x.shape
  gaps = rng.exponential(spec.mean_gap, size=(U, T)).astype(np.int64) + 1
  ts = 1_600_000_000 + rng.integers(0, 10**7, size=(U, 1)) + np.cumsum(gaps, axis=1)
  items = [x[i, : lengths[i]].astype(np.int32) for i in range(U)]
  stamps = [ts[i, : lengths[i]] for i in range(U)]
  return items, stamps


def topic_structure(spec: SyntheticSpec):
  """The hidden structure of ``kind="topics"``: (members, succ, succ_p).

  ``members[z]`` are the item ids of topic z ([num_topics, topic_size]; items beyond
  num_topics * topic_size are never drawn), ``succ[z]`` its successor topics and ``succ_p``
  the cumulative probabilities of the successor ranks. Drawn first from ``spec.seed``, so
  tests can compute the Bayes-optimal predictor.
  """
  rng = np.random.default_rng(spec.seed)
  Z = spec.num_items // spec.topic_size
  members = (rng.permutation(spec.num_items)[: Z * spec.topic_size] + 1).reshape(Z, -1)
  # Each successor rank is a permutation of the topics, so the chain is doubly stochastic:
  # every topic is visited equally often in the long run (no topic hogs the history).
  succ = np.stack([rng.permutation(Z) for _ in range(spec.branching)], axis=1)
  w = 0.5 ** np.arange(spec.branching)
  return members, succ, np.cumsum(w / w.sum()), rng


def _topics(spec: SyntheticSpec):
  members, succ, succ_p, rng = topic_structure(spec)
  Z, S = members.shape
  U = spec.num_users
  pref = rng.integers(0, S, size=(U, Z))  # each user's preferred member of each topic
  lengths = rng.integers(spec.min_len, spec.max_len + 1, size=U)
  T = int(lengths.max())
  z = rng.integers(0, Z, size=U)
  x = np.zeros((U, T), np.int64)
  rows = np.arange(U)
  for t in range(T):
    if t:
      branch = np.minimum(np.searchsorted(succ_p, rng.random(U)), spec.branching - 1)
      z = np.where(rng.random(U) < spec.p_noise, rng.integers(0, Z, size=U), succ[z, branch])
    member = np.where(rng.random(U) < spec.p_copy, pref[rows, z], rng.integers(0, S, size=U))
    x[:, t] = members[z, member]
  return _finish(spec, rng, x, lengths)


# ------------------------------------------------------------------------------------------
# The topics generator served as a ranking task


def topic_index(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(members [Z, S], topic [V + 1], slot [V + 1]) of ``kind="topics"``: each item's topic
  and its index within the topic (-1 / 0 for item 0 and items never drawn)."""
  members, _, _, _ = topic_structure(spec)
  Z, S = members.shape
  topic = np.full(spec.num_items + 1, -1, np.int64)
  slot = np.zeros(spec.num_items + 1, np.int64)
  for z in range(Z):
    topic[members[z]], slot[members[z]] = z, np.arange(S)
  return members, topic, slot


def ranking_candidates(spec: SyntheticSpec, target: np.ndarray, num_hard: int, num_easy: int,
                       seed: int = 0) -> np.ndarray:
  """Impressions of the topics task: the true next item and hard and easy negatives.

  Hard negatives are other members of the target's topic (drawn without replacement, so
  ``num_hard <= topic_size - 1``); easy negatives are uniform items of other topics (with
  replacement). Drawn from ``np.random.default_rng(seed)``.

  Args:
    spec: a ``kind="topics"`` spec. target: [U] true next items. num_hard, num_easy: counts.

  Returns:
    candidates [U, 1 + num_hard + num_easy] int32, the target in column 0.
  """
  if spec.kind != "topics":
    raise ValueError(f"ranking_candidates: data.synthetic.kind={spec.kind!r}; expected 'topics'")
  members, topic, slot = topic_index(spec)
  Z, S = members.shape
  if not 0 <= num_hard <= S - 1:
    raise ValueError(f"ranking_candidates: num_hard={num_hard}: expected 0..{S - 1}")
  target = np.asarray(target, np.int64)
  if np.any(topic[target] < 0):
    raise ValueError("ranking_candidates: a target item belongs to no topic")
  rng = np.random.default_rng(seed)
  U = len(target)
  off = np.argsort(rng.random((U, S - 1)), axis=1)[:, :num_hard] + 1  # distinct 1..S-1
  hard = members[topic[target][:, None], (slot[target][:, None] + off) % S]
  other = (topic[target][:, None] + rng.integers(1, Z, (U, num_easy))) % Z  # another topic
  easy = members[other, rng.integers(0, S, (U, num_easy))]
  return np.concatenate([target[:, None], hard, easy], axis=1).astype(np.int32)


def bayes_ranking_scores(spec: SyntheticSpec, memory: list[np.ndarray], last: np.ndarray,
                         candidates: np.ndarray) -> np.ndarray:
  """The Bayes-optimal ranker of the topics task, float64, written from the generator.

  P(next = i) = P(topic z_i | last event's topic) · (p_copy · P(pref_{z_i} = i | memory) +
  (1 - p_copy) / S), where the topic chain is (1 - p_noise) · successor ranks + p_noise / Z
  and the preferred member's posterior under a uniform prior is proportional to
  r^{n_i}, r = (p_copy + (1 - p_copy)/S) / ((1 - p_copy)/S), n_i = visits of i in the memory.

  Args:
    spec: the ``kind="topics"`` spec. memory: per user, the events the ranker may see (any
      subset of the history). last: [U] the request's last event (always seen: it sets the
      next topic). candidates: [U, C] item ids.

  Returns:
    scores [U, C] float64 (probabilities of being the next event).
  """
  members, succ, succ_p, _ = topic_structure(spec)
  _, topic, slot = topic_index(spec)
  Z, S = members.shape
  p_branch = np.diff(np.concatenate([[0.0], succ_p]))
  hit, miss = spec.p_copy + (1 - spec.p_copy) / S, (1 - spec.p_copy) / S
  candidates = np.asarray(candidates, np.int64)
  out = np.zeros(candidates.shape, np.float64)
  for u, seen in enumerate(memory):
    seen = np.asarray(seen, np.int64)
    counts = np.zeros((Z, S))
    np.add.at(counts, (topic[seen], slot[seen]), 1.0)
    log_post = counts * np.log(hit / miss)
    post = np.exp(log_post - log_post.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    p_topic = np.full(Z, spec.p_noise / Z)
    np.add.at(p_topic, succ[topic[last[u]]], (1 - spec.p_noise) * p_branch)
    z, s = topic[candidates[u]], slot[candidates[u]]
    out[u] = p_topic[z] * (post[z, s] * spec.p_copy + miss)
  return out


def memory_views(history: list[np.ndarray], seed: int = 0) -> dict[str, list[np.ndarray]]:
  """The subsets of each memory the Bayes ranker is evaluated on.

  Keys: "whole", "last_1/2", "last_1/4", "last_1/8", "last_1/16" (the newest fraction,
  at least one event) and "random_1/8" (a uniform random eighth of the events, kept in
  order, from ``np.random.default_rng(seed)``).
  """
  rng = np.random.default_rng(seed)
  out = {"whole": [np.asarray(h) for h in history]}
  for f in (2, 4, 8, 16):
    out[f"last_1/{f}"] = [h[len(h) - max(1, len(h) // f):] if len(h) else h for h in history]
  rand = []
  for h in history:
    k = max(1, len(h) // 8) if len(h) else 0
    rand.append(h[np.sort(rng.choice(len(h), k, replace=False))] if k else h)
  out["random_1/8"] = rand
  return out
