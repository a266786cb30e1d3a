"""Training with sampled softmax over negatives (the HSTU recipe), resumable.

The model is split into a graph definition and parameter pytree (``nnx.split``) so that the
update is a pure, jitted function of (params, opt_state, batch, key) with donated buffers,
and the whole training state is a plain pytree that Orbax saves and restores.

Data parallel (``malloc_jax.parallel``): :func:`fit` replicates the state and shards every
batch of users over all devices (or ``num_devices``); ``jit`` partitions the update (the loss
and gradient sums become all-reduces). On one device it is the single-device loop, unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from malloc_jax import parallel
from malloc_jax.data.dataset import SequenceDataset, TrainSet
from malloc_jax.models.base import Events, l2_normalize

NEGATIVE_SHARING = ("batch", "user", "position")


def sampled_softmax_loss(model, items, ts, length, rng, num_negatives: int, dropout: bool,
                         sharing: str = "batch"):
  """Mean sampled-softmax loss over every next-event prediction of a batch.

  Args:
    model: backbone. items, ts: [B, N + 1] windows; length [B] events in each window.
    rng: key for dropout and negatives. num_negatives: K uniform negatives (items 1..V); a
      negative equal to the target is masked out. 0: the full softmax over all items.
    sharing: which predictions share one draw of K negatives. "batch": one draw for the
      whole batch ([K]; cheapest, but only K items receive a negative gradient a step);
      "user": one draw per user ([B, K]); "position": one draw per prediction ([B, N, K], as
      the HSTU reference code's sampled softmax draws them).

  Returns:
    (loss, number of predictions).
  """
  if sharing not in NEGATIVE_SHARING:
    raise ValueError(f"train.negative_sharing={sharing!r}: expected one of {NEGATIVE_SHARING}")
  r1, r2 = jax.random.split(rng)
  n_in = jnp.maximum(length - 1, 0)
  h = model(Events(items[:, :-1], ts[:, :-1], n_in), train_rng=r1 if dropout else None)
  h = l2_normalize(h)  # [B, N, d]
  table = model.item_embeddings()  # [V + 1, d]
  tgt = items[:, 1:]  # [B, N]
  valid = jnp.arange(tgt.shape[1])[None, :] < n_in[:, None]
  pos = jnp.sum(h * table[tgt], axis=-1) / model.temperature  # [B, N]
  if num_negatives == 0:  # full softmax over items 1..V (the target included once)
    lse = jax.nn.logsumexp(jnp.einsum("bnd,vd->bnv", h, table[1:]) / model.temperature, -1)
  else:
    B, N = tgt.shape
    shape = {"batch": (1, 1), "user": (B, 1), "position": (B, N)}[sharing] + (num_negatives,)
    neg = jax.random.randint(r2, shape, 1, model.num_items + 1)  # [1|B, 1|N, K]
    if sharing == "position":
      nl = jnp.einsum("bnd,bnkd->bnk", h, table[neg])  # [B, N, K]
    else:
      nl = jnp.einsum("bnd,bkd->bnk", h, table[neg[:, 0]])  # [B, N, K]
    nl = jnp.where(neg == tgt[..., None], -jnp.inf, nl / model.temperature)
    lse = jax.nn.logsumexp(jnp.concatenate([pos[..., None], nl], axis=-1), axis=-1)
  count = jnp.sum(valid)
  loss = jnp.sum(jnp.where(valid, lse - pos, 0.0)) / jnp.maximum(count, 1)
  return loss, count


TASKS = ("retrieval", "ranking")
RANK_LOSSES = ("bce", "listwise")


@dataclasses.dataclass(frozen=True)
class RankingSampler:
  """How ranking impressions are drawn from training windows (``config.task = "ranking"``).

  At ``positions`` positions p per window (each uniform in [ceil(min_frac * n), n - 1] of the
  window's n events) the event at p is the positive and ``uniform + popularity + hard`` negatives are
  drawn: uniform over items 1..V, from ``popularity`` (training counts, [V + 1]), and
  "hard" from the other members of the positive's group without replacement (``groups``
  [G, S] item ids, 0-padded, ``item_group`` [V + 1] group of each item, -1 for none: topics,
  genres; ``hard = S - 1`` takes every other member, a group too small leaves the rest out).

  ``loss`` scores the impression: ``"bce"`` (binary cross-entropy of every candidate, as CTR
  logs) or ``"listwise"`` (softmax cross-entropy of the positive among the 1 + K candidates).
  On the synthetic topics task only the listwise loss over hard negatives leaves the initial
  plateau in a CPU budget (BENCHMARKS.md, target-aware ranking).
  """

  uniform: int = 10
  popularity: int = 0
  hard: int = 9
  min_frac: float = 0.5
  item_popularity: Any = None  # [V + 1] counts, needed when popularity > 0
  groups: Any = None  # [G, S] int, needed when hard > 0
  item_group: Any = None  # [V + 1] int
  loss: str = "bce"  # "bce" | "listwise" (config: train.rank_loss)
  positions: int = 1  # impressions per window (config: train.rank_positions)

  def __post_init__(self):
    if self.positions < 1:
      raise ValueError(f"train.rank_positions={self.positions}: expected >= 1")
    if self.loss not in RANK_LOSSES:
      raise ValueError(f"train.rank_loss={self.loss!r}: expected one of {RANK_LOSSES}")
    for f in ("uniform", "popularity", "hard"):
      if getattr(self, f) < 0:
        raise ValueError(f"train.rank_negatives.{f}={getattr(self, f)}: expected >= 0")
    if self.uniform + self.popularity + self.hard < 1:
      raise ValueError("train.rank_negatives: expected at least one negative")
    if self.popularity and self.item_popularity is None:
      raise ValueError("train.rank_negatives.popularity > 0 needs item popularity counts")
    if self.hard and (self.groups is None or self.item_group is None):
      raise ValueError("train.rank_negatives.hard > 0 needs item groups (topics or genres); "
                       "this dataset has none")
    if not 0.0 <= self.min_frac < 1.0:
      raise ValueError(f"train.rank_min_frac={self.min_frac}: expected in [0, 1)")
    if self.hard and self.hard > np.shape(self.groups)[1] - 1:
      raise ValueError(f"train.rank_negatives.hard={self.hard}: a group has at most "
                       f"{np.shape(self.groups)[1] - 1} other members")

  @property
  def num_negatives(self) -> int:
    return self.uniform + self.popularity + self.hard


def tie_query_key_init(model, score_offset: float = 0.0, qk_scale: float = 1.0) -> None:
  """Sets each layer's key projection equal to its query projection (in place, at init).

  With W_k = W_q a token's attention score to an event of the same item is |W x|^2, the
  largest a key of equal norm can get, so at initialization a ranking candidate already
  attends to the history events of its own item and the count of those events reaches its
  output. From a random init the listwise ranking loss sits at ln(1 + K) for thousands of
  steps on the synthetic topics task (BENCHMARKS.md, target-aware ranking); training unties
  the two projections freely afterwards. SASRec (``qkv``) and HSTU (``uvqk``) layers; with
  head sharing (GQA, MQA: ``kv_heads`` key heads) each key head is tied to the first query
  head of its group.

  ``score_offset`` (HSTU only) also sets the relative-position bias to that constant: HSTU's
  pointwise SiLU attention sums rather than normalizes, and with SiLU'd queries and keys
  every score is positive on average, so a negative offset lets mainly the matching events
  through at init (BENCHMARKS.md, probe p10). ``qk_scale`` multiplies the (tied) query and
  key columns of the projection, weights and bias, so that the pre-SiLU scores of a matching
  event stand further from the rest (HSTU: with ``score_offset`` a sharper threshold).

  References: Kang & McAuley, ICDM 2018 (SASRec); Zhai et al., ICML 2024 (HSTU).
  """
  for layer in model.layers:
    H = getattr(layer, "heads", 1)
    G = getattr(layer, "kv_heads", H)  # head sharing (GQA, MQA): G key heads
    if hasattr(layer, "qkv"):  # SASRec: [q (H dh) | k (G dh) | v (G dh)]
      lin, dq = layer.qkv, layer.dh
      q0, k0 = 0, H * dq
    elif hasattr(layer, "uvqk"):  # HSTU: [u (H dv) | v (G dv) | q (H dqk) | k (G dqk)]
      lin, dq = layer.uvqk, layer.dqk
      q0 = (H + G) * layer.dv
      k0 = q0 + H * dq
    else:
      raise ValueError(f"tie_query_key_init: {type(layer).__name__} has no qkv/uvqk "
                       "projection (SASRec and HSTU layers only)")
    if score_offset and hasattr(layer, "rab_pos"):
      layer.rab_pos[...] = jnp.full_like(layer.rab_pos[...], score_offset)
    # Key head g takes the columns of query head g * H / G (the first of the query heads that
    # share it); every query column is scaled by qk_scale.
    qcols = jnp.arange(q0, q0 + H * dq)
    src = jnp.concatenate([jnp.arange(q0 + g * (H // G) * dq, q0 + (g * (H // G) + 1) * dq)
                           for g in range(G)])
    kcols = jnp.arange(k0, k0 + G * dq)
    if int(kcols[-1]) >= lin.kernel[...].shape[1]:
      raise ValueError(f"tie_query_key_init: {type(layer).__name__}'s projection has "
                       f"{lin.kernel[...].shape[1]} columns, fewer than its heads imply")
    w = lin.kernel[...]
    lin.kernel[...] = w.at[:, qcols].multiply(qk_scale).at[:, kcols].set(w[:, src] * qk_scale)
    if lin.bias is not None:
      b = lin.bias[...]
      lin.bias[...] = b.at[qcols].multiply(qk_scale).at[kcols].set(b[src] * qk_scale)


def ranking_impressions(items, length, rng, sampler: RankingSampler, num_items: int):
  """Draws ``sampler.positions`` impressions per window (see :class:`RankingSampler`).

  Args:
    items: [B, N + 1] windows; length [B] events in each. rng: key. num_items: V.

  Returns:
    (p [B, P] positions of the positives, cands [B, P, 1 + K] item ids with the positive
    (``items`` at p) in column 0; a hard slot a group cannot fill is 0).
  """
  B, P = items.shape[0], sampler.positions
  r_pos, r_u, r_p, r_h = jax.random.split(rng, 4)
  n = length
  lo = jnp.maximum(jnp.ceil(sampler.min_frac * n).astype(jnp.int32), 1)
  u = jax.random.uniform(r_pos, (B, P))
  p = lo[:, None] + jnp.floor(u * jnp.maximum(n - lo, 1)[:, None]).astype(jnp.int32)
  p = jnp.clip(p, 1, jnp.maximum(n - 1, 1)[:, None])  # [B, P] index of each positive
  pos_item = jnp.take_along_axis(items, p, 1)[..., None]  # [B, P, 1]
  negs = []
  if sampler.uniform:
    negs.append(jax.random.randint(r_u, (B, P, sampler.uniform), 1, num_items + 1))
  if sampler.popularity:
    logp = jnp.log(jnp.asarray(sampler.item_popularity, jnp.float32) + 1e-9).at[0].set(-jnp.inf)
    negs.append(jax.random.categorical(r_p, logp, shape=(B, P, sampler.popularity)))
  if sampler.hard:
    groups = jnp.asarray(sampler.groups)
    g = jnp.asarray(sampler.item_group)[pos_item[..., 0]]  # [B, P]
    mem = groups[jnp.maximum(g, 0)]  # [B, P, S] members of each positive's group
    # Without replacement: the other (non-padding) members in a random order, first `hard`.
    key = jax.random.uniform(r_h, mem.shape)
    key = jnp.where((mem == pos_item) | (mem <= 0) | (g < 0)[..., None], 2.0, key)
    pick = jnp.argsort(key, axis=-1)[..., :sampler.hard]
    negs.append(jnp.where(jnp.take_along_axis(key, pick, -1) < 2.0,
                          jnp.take_along_axis(mem, pick, -1), 0))
  cands = jnp.concatenate([pos_item] + [x.astype(items.dtype) for x in negs], axis=-1)
  return p, cands


def ranking_logits(model, items, ts, length, p, cands, train_rng=None):
  """Logits [B, P, 1 + K] of candidates cands [B, P, 1 + K] placed at positions p [B, P].

  The candidates of position p read the window's events before p (M-FALCON, one pass for all
  P positions when P > 1; ``model.rank`` of the first p events when P = 1). items, ts:
  [B, N + 1] windows; length [B]. When the top layer's ``step`` takes ``rows`` (HSTU and its
  GQA, MQA, MLA, LSH variants), the top layer computes only the candidates' rows (the
  window's own outputs are discarded there), the same logits at a fraction of the cost
  (BENCHMARKS.md, HSTU at 512 events).
  """
  B, N = items.shape[0], items.shape[1] - 1
  P, K1 = cands.shape[1], cands.shape[2]
  n = length
  if P == 1:
    request = Events(items[:, :-1], ts[:, :-1], jnp.minimum(p[:, 0], N))
    # Candidates carry the request's time (its last event's), as when serving.
    return model.rank(model.empty_cache(B), request, cands[:, 0], train_rng=train_rng)[:, None]
  if not hasattr(model, "_run_tokens"):
    raise ValueError(f"train.rank_positions={P}: {type(model).__name__} serves ranking "
                     "from its own memory; use rank_positions=1")
  seq_len = jnp.minimum(n, N)
  seq_valid = jnp.arange(N)[None] < seq_len[:, None]  # [B, N]
  s_pos = jnp.where(seq_valid, jnp.arange(N, dtype=jnp.int32)[None], -1)
  c_ts = jnp.take_along_axis(ts, jnp.maximum(p - 1, 0), 1)  # [B, P] time of the event before p
  flat = cands.reshape(B, P * K1)
  tok = jnp.concatenate([items[:, :-1], flat.astype(items.dtype)], axis=1)  # [B, N + P(1+K)]
  q_pos = jnp.concatenate([s_pos, jnp.repeat(p, K1, axis=1)], axis=1)
  q_ts = jnp.concatenate([jnp.where(seq_valid, ts[:, :-1], 0), jnp.repeat(c_ts, K1, axis=1)],
                         axis=1)
  q_valid = jnp.concatenate([seq_valid, jnp.ones(flat.shape, bool)], axis=1)
  isolated = jnp.concatenate([jnp.zeros((B, N), bool), jnp.ones(flat.shape, bool)], axis=1)
  # The top layer needs only the candidates' rows (the history's own outputs are discarded):
  # a layer that can compute a subset of its queries (HSTU) skips the history's attention.
  fast = ("rows" in inspect.signature(model.layers[-1].step).parameters
          and "last_rows" in inspect.signature(model._run_tokens).parameters)
  extra = {"last_rows": P * K1} if fast else {}  # CLA's _run_tokens takes no last_rows
  x, *_ = model._run_tokens(model.empty_cache(B), tok, q_pos, q_ts, q_valid, train_rng, isolated,
                            **extra)
  return model.rank_logits(x[:, -P * K1:], flat).reshape(B, P, K1)


def ranking_loss(model, items, ts, length, rng, sampler: RankingSampler, dropout: bool):
  """Loss of target-aware ranking impressions drawn from training windows.

  ``sampler.positions`` = P impressions per window: at each sampled position p the event at
  p is the positive and K negatives come from ``sampler``; the P (1 + K) candidate tokens
  read the window M-FALCON style in one pass (:func:`attention_mask` with ``isolated``: a
  candidate at p sees the window's events before p and itself, never another candidate or a
  later event), so a window is encoded once for all its impressions. With P = 1 the
  candidates read a request of the first p events through ``model.rank`` (every variant);
  P > 1 needs a per-event cache backbone (``_run_tokens``: HSTU, SASRec). Candidates carry
  the time of the event before p (the request's time when serving). A negative equal to its
  positive (or a padding id) is masked out. ``sampler.loss`` picks binary cross-entropy per
  candidate or the listwise softmax cross-entropy of the positive among its impression.

  Args:
    model: backbone. items, ts: [B, N + 1] windows; length [B] events in each window.
    rng: key. sampler: :class:`RankingSampler`. dropout: apply the model's dropout.

  Returns:
    (mean loss over impressions (listwise) or candidates (bce), number counted).

  References: Zhai et al., "Actions Speak Louder than Words", ICML 2024 (ranking with
    M-FALCON).
  """
  B, P = items.shape[0], sampler.positions
  r_imp, r_d = jax.random.split(rng)
  p, cands = ranking_impressions(items, length, r_imp, sampler, model.num_items)
  pos_item = cands[..., :1]
  n = length
  logits = ranking_logits(model, items, ts, length, p, cands, r_d if dropout else None)
  keep = jnp.concatenate([jnp.ones((B, P, 1), bool), (cands[..., 1:] != pos_item) &
                          (cands[..., 1:] > 0)], axis=-1)
  real = (n >= 2)[:, None, None]
  keep = keep & real
  if sampler.loss == "listwise":
    keep_lw = keep.at[..., 0].set(True)  # the positive stays in: no all -inf row (NaN grads)
    lse = jax.nn.logsumexp(jnp.where(keep_lw, logits, -jnp.inf), axis=-1)  # [B, P]
    count = jnp.sum(real) * P
    total = jnp.sum(jnp.where(real[..., 0], lse - logits[..., 0], 0.0))
    return total / jnp.maximum(count, 1), count
  labels = jnp.zeros_like(logits).at[..., 0].set(1.0)
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  count = jnp.sum(keep)
  return jnp.sum(jnp.where(keep, bce, 0.0)) / jnp.maximum(count, 1), count


@dataclasses.dataclass
class Trainer:
  """Owns the jitted update of one backbone; the training state is a plain pytree."""

  model: nnx.Module
  tx: optax.GradientTransformation
  num_negatives: int
  dropout: bool = True
  task: str = "retrieval"
  sampler: RankingSampler | None = None  # ranking impressions (task="ranking")
  negative_sharing: str = "batch"  # see sampled_softmax_loss

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
    if self.task == "ranking" and self.sampler is None:
      raise ValueError("task='ranking' needs a RankingSampler (train.rank_negatives)")
    self.graphdef, params, self.rest = nnx.split(self.model, nnx.Param, ...)
    self.init_state = {"params": params, "opt_state": self.tx.init(params)}
    self.compiles = 0
    self._step = jax.jit(self._update, donate_argnums=(0,))

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)

  def _update(self, state, items, ts, length, rng):
    self.compiles += 1  # runs only while tracing: counts compilations

    def loss_fn(params):
      if self.task == "ranking":
        return ranking_loss(self.merge(params), items, ts, length, rng, self.sampler,
                            self.dropout)
      return sampled_softmax_loss(self.merge(params), items, ts, length, rng,
                                  self.num_negatives, self.dropout, self.negative_sharing)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, loss, count

  def step(self, state, batch, rng):
    return self._step(state, batch[0], batch[1], batch[2], rng)


BIAS_TABLES = ("rab_pos", "rab_time")


def make_optimizer(lr: float, weight_decay: float, clip: float = 1.0,
                   bias_lr_scale: float = 1.0):
  """Global-norm clipping, then AdamW.

  ``bias_lr_scale`` multiplies the learning rate of HSTU's relative attention bias tables
  (``BIAS_TABLES``). Adam moves a parameter by about ``lr`` a step whatever its gradient, and
  HSTU's pointwise scores need biases of order 10 (a recent event standing out of N summed
  weights) where lr = 3e-3 moves them by 0.003 a step (BENCHMARKS.md, HSTU at 512 events).
  Training only: the model is unchanged.
  """
  adam = lambda rate: optax.adamw(rate, b1=0.9, b2=0.98, weight_decay=weight_decay)
  if bias_lr_scale == 1.0:
    return optax.chain(optax.clip_by_global_norm(clip), adam(lr))

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "bias" if any(str(getattr(k, "key", k)) in BIAS_TABLES for k in path)
        else "rest", params)

  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.multi_transform({"bias": adam(lr * bias_lr_scale), "rest": adam(lr)},
                                           labels))


def batch_indices(num_users: int, batch_size: int, step: int, seed: int,
                  lengths: np.ndarray | None = None, pool: int = 16) -> np.ndarray:
  """Users of training step ``step``: epoch-wise shuffles, a pure function of (step, seed).

  With ``lengths`` (length bucketing), each epoch's shuffled users are taken in pools of
  ``pool`` batches, sorted by length within a pool and cut into batches, and the epoch's
  batches are then shuffled: every user is still seen once an epoch, but a batch holds users
  of similar lengths, so it can be trimmed to a shorter window (see :func:`bucket_width`).
  """
  per_epoch = max(num_users // batch_size, 1)
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_users)
  if lengths is not None and num_users >= batch_size:
    span = batch_size * pool
    perm = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                           for c in np.split(perm, range(span, num_users, span))])
    order = np.random.default_rng([seed, epoch, 2]).permutation(per_epoch)
    i = int(order[i])
  idx = perm[i * batch_size:(i + 1) * batch_size]
  if len(idx) < batch_size:  # fewer users than a batch: sample with replacement
    idx = np.random.default_rng([seed, epoch, 1]).choice(num_users, batch_size)
  return idx


def bucket_width(max_length: int, full: int, buckets: int) -> int:
  """The window a batch whose longest user has ``max_length`` events is trimmed to.

  One of ``buckets`` static widths, the multiples of ceil(full / buckets) capped at the full
  window ``full`` (so at most ``buckets`` shapes are compiled); ``full`` when buckets <= 1.
  Windows are left-aligned (padding on the right), so trimming drops only padding and the
  loss is unchanged.
  """
  if buckets <= 1:
    return full
  unit = -(-full // buckets)
  return min(full, max(1, -(-int(max_length) // unit)) * unit)


def get_batch(train: TrainSet, idx: np.ndarray, mesh=None, width: int | None = None):
  """The users ``idx`` as device arrays (rows sharded over ``mesh`` when given), their
  windows trimmed to ``width`` columns when given."""
  cols = slice(None) if width is None else slice(0, width)
  items, ts = train.items[idx, cols], train.ts[idx, cols]
  if mesh is None:
    return jnp.asarray(items), jnp.asarray(ts), jnp.asarray(train.length[idx])
  return parallel.shard_batch(mesh, items, ts, train.length[idx])


def fit(trainer: Trainer, data: SequenceDataset, *, steps: int, batch_size: int, seed: int,
        state: Any = None, start_step: int = 0, log_every: int = 50,
        on_step: Callable[[int, Any, dict], bool] | None = None, print_fn=print, num_devices: int = 0,
        length_buckets: int = 0):
  """Runs the training loop from ``start_step`` to ``steps``.

  ``on_step(step, state, logs)`` is called after every update (checkpointing, validation);
  returning True stops training early. The state is replicated and each batch sharded over
  ``num_devices`` devices (0: all, see ``parallel.data_mesh``); ``batch_size`` must divide
  over them. ``length_buckets`` > 1 batches users of similar lengths together and trims each
  batch's windows to one of that many static widths (:func:`batch_indices`,
  :func:`bucket_width`); 0 keeps uniformly shuffled batches of full windows. Returns the
  final state.
  """
  mesh = parallel.data_mesh(num_devices)
  parallel.check_batch_size(batch_size, mesh, "train.batch_size")
  state = trainer.init_state if state is None else state
  state = parallel.replicate(mesh, state)
  key = jax.random.key(seed)
  t0, events, losses = time.time(), 0, []
  window_start = t0
  lengths = data.train.length if length_buckets > 1 else None
  for step in range(start_step, steps):
    idx = batch_indices(len(data.train), batch_size, step, seed, lengths)
    width = bucket_width(data.train.length[idx].max(), data.train.items.shape[1],
                         length_buckets)
    batch = get_batch(data.train, idx, mesh, width)
    state, loss, count = trainer.step(state, batch, jax.random.fold_in(key, step))
    losses.append(loss)
    events += int(np.maximum(data.train.length[idx] - 1, 0).sum())
    done = step + 1
    logs = {}
    if done % log_every == 0 or done == steps:
      loss_v = float(np.mean(jax.device_get(losses)))
      if not np.isfinite(loss_v):
        raise FloatingPointError(f"training loss became {loss_v} at step {done}; "
                                 "lower train.lr or check the data")
      now = time.time()
      rate = events / max(now - window_start, 1e-9)
      eta = (now - t0) / max(done - start_step, 1) * (steps - done)
      logs = {"loss": loss_v, "events_per_s": rate}
      print_fn(f"step {done}/{steps}  loss {loss_v:.4f}  {rate:,.0f} events/s  "
               f"eta {eta:.0f}s")
      losses, events, window_start = [], 0, now
    if on_step is not None and on_step(done, state, logs):
      break
  logging.info("training compiled the update %d time(s)", trainer.compiles)
  return state
