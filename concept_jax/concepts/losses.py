"""Image-level and concept-level contrastive losses, and the information-bottleneck KL (spec 6).

Both contrastive losses score a row of logits per sample whose first P entries are positives
(P = K + 1) with the soft target 1/P on them, 0 elsewhere:

    loss = batch mean of KL(target || softmax(row)) = -log P - mean_{t < P} log_softmax(row)_t

The value depends only on which entries are positive, not on their order, so the negatives are
computed in whatever order is cheapest (all queue entries at once with a class mask; confusing
classes gathered from a similarity against the whole queue).
"""
from typing import Dict, Tuple, Union

import jax
import jax.numpy as jnp

from concept_jax.concepts import transport

HIGHEST = jax.lax.Precision.HIGHEST


def _soft_target_kl(positives: jax.Array, log_norm: jax.Array) -> jax.Array:
  """positives: (B, P) positive logits; log_norm: (B,) logsumexp of the full row -> scalar."""
  num_pos = positives.shape[-1]
  log_q = positives - log_norm[:, None]
  return jnp.mean(-jnp.log(float(num_pos)) - jnp.mean(log_q, axis=-1))


def image_contrastive_loss(z_q: jax.Array, z_k: jax.Array, queue_z: jax.Array,
                           labels: jax.Array, temperature: float = 0.07,
                           precision=HIGHEST) -> jax.Array:
  """Bi-Tuning's categorical contrast on normalised logits.

  Row of sample i (class c): [z_q.z_k, z_q.queue_z[c] (K), z_q.queue_z[other classes]] / T,
  target 1/(K+1) on the first K+1 entries.

  Args:
    z_q: (B, E) l2-normalised query logits (gradient flows here).
    z_k: (B, E) l2-normalised key logits (no gradient).
    queue_z: (C, K, E) queue before this step's writes (no gradient).
    labels: (B,) int classes.
    temperature: T.
  Returns:
    scalar, batch mean.
  """
  z_k = jax.lax.stop_gradient(z_k)
  queue_z = jax.lax.stop_gradient(queue_z)
  l_pair = jnp.sum(z_q * z_k, axis=-1) / temperature                         # (B,)
  l_queue = jnp.einsum('be,cke->bck', z_q, queue_z, precision=precision) / temperature
  return class_queue_contrast(l_pair, l_queue, labels)


def class_queue_contrast(l_pair: jax.Array, l_queue: jax.Array, labels: jax.Array) -> jax.Array:
  """The soft-target contrast over per-class queues, from its logits (already divided by T).

  Row of sample i (class c): [l_pair[i], l_queue[i, c] (K), l_queue[i, other classes]], target
  1/(K+1) on the first K+1 entries (Bi-Tuning's row layout; the order does not change the value).

  Args:
    l_pair: (B,) the current pair's logit; l_queue: (B, C, K) one logit per queue entry.
    labels: (B,) int classes.
  Returns:
    scalar, batch mean.
  """
  b, num_classes, k = l_queue.shape
  positives = jnp.concatenate([l_pair[:, None], l_queue[jnp.arange(b), labels]], axis=1)
  row = jnp.concatenate([l_pair[:, None], l_queue.reshape(b, num_classes * k)], axis=1)
  return _soft_target_kl(positives, jax.nn.logsumexp(row, axis=-1))


def concept_contrastive_loss(
    zq_p: jax.Array, zk_p: jax.Array, queue_h: jax.Array, labels: jax.Array,
    confusing: jax.Array, key: jax.Array, temperature: float = 0.07, *, top_pos: int = 3,
    top_neg: int = 10, eps: float = transport.EPS, thresh: float = transport.THRESH,
    max_iter: int = transport.MAX_ITER, precision=HIGHEST, with_aux: bool = False
) -> Union[jax.Array, Tuple[jax.Array, Dict[str, jax.Array]]]:
  """Class-conditional contrast between sets of patch embeddings matched by OT.

  Row of sample i (class c, confusing list conf_i), all divided by T:
    [pos(zq_p[i], zk_p[i]), pos(zq_p[i], queue_h[c, k]) for k < K,
     neg(zq_p[i], queue_h[c', k]) for c' in conf_i, k < K]          length 1 + K + top_neg*n_conf*K
  pos = 1 - M at one entry drawn uniformly among the top_pos plan entries; neg = 1 - M at the
  top_neg plan entries. Sinkhorn stopping groups (as the official per-group calls):
  group 0 = the B current pairs, 1 + i = sample i's K positives, 1 + B + i = its n_conf*K
  negatives. Random draws: `transport.positive_choice(key, B + B*K, top_pos)`, current pairs first,
  then the queue positives in (i, k) row-major order.

  Args:
    zq_p: (B, n, d) l2-normalised query patch embeddings (gradient flows here only).
    zk_p: (B, n, d) key patch embeddings; queue_h: (C, K, n, d) queue before this step's writes.
    labels: (B,) int; confusing: (B, n_conf) int from `search.concept_boxes` (view-2 search).
    key: PRNG key for the positive draws.
    with_aux: also return {'sinkhorn_iters_max', 'sinkhorn_iters_mean'} over the 1 + 2B groups.
  Returns:
    scalar loss (batch mean), and the aux dict if with_aux.

  Memory (CUB recipe B=48, C=200, K=40, n_conf=199, n=9, d=200; float32): the similarity of every
  query patch to every queue patch (B, C, K, n, n) is 31.1 M floats (124 MB); the negative costs
  gathered for the confusing classes (B, n_conf, K, n, n) another 124 MB, the packed Sinkhorn cost
  and its log-plan 124 MB each; 384,048 problems in total. Gathering the confusing classes'
  *vectors* instead would need (B, n_conf, K, n, d) = 688 M floats (2.75 GB), hence the order.
  Backward adds one (B, C, K, n, n) cotangent. Peak about 0.6-0.8 GB; each Sinkhorn iteration
  reads the 124 MB cost twice.
  """
  zk_p = jax.lax.stop_gradient(zk_p)
  queue_h = jax.lax.stop_gradient(queue_h)
  b, n, _ = zq_p.shape
  k = queue_h.shape[1]
  n_conf = confusing.shape[1]
  rows = jnp.arange(b)
  sim_queue = jnp.einsum('bpd,ckqd->bckpq', zq_p, queue_h, precision=precision)  # (B, C, K, n, n)
  cost_pair = transport.cost_matrix(zq_p, zk_p, precision)                      # (B, n, n)
  cost_pos = 1.0 - sim_queue[rows, labels].reshape(b * k, n, n)                  # (B K, n, n)
  cost_neg = 1.0 - sim_queue[rows[:, None], confusing].reshape(b * n_conf * k, n, n)
  cost_all = jnp.concatenate([cost_pair, cost_pos, cost_neg], axis=0)          # (P, n, n)
  group_ids = jnp.concatenate([
      jnp.zeros((b,), jnp.int32),
      1 + jnp.repeat(rows, k).astype(jnp.int32),
      1 + b + jnp.repeat(rows, n_conf * k).astype(jnp.int32)])
  res = transport.sinkhorn_log(cost_all, group_ids, 1 + 2 * b, eps=eps, thresh=thresh,
                               max_iter=max_iter)
  n_pos = b + b * k
  pos = transport.select_similarities(
      jnp.concatenate([cost_pair, cost_pos], axis=0), res.log_plan[:n_pos], key=key, top=top_pos,
      positive=True)                                                             # (B + B K,)
  neg = transport.select_similarities(cost_neg, res.log_plan[n_pos:], top=top_neg,
                                      positive=False)                            # (B n_conf K, top)
  positives = jnp.concatenate([pos[:b, None], pos[b:].reshape(b, k)], axis=1) / temperature
  negatives = neg.reshape(b, n_conf * k * top_neg) / temperature
  log_norm = jax.nn.logsumexp(jnp.concatenate([positives, negatives], axis=1), axis=-1)
  loss = _soft_target_kl(positives, log_norm)
  if not with_aux:
    return loss
  iters = res.num_iters
  return loss, {'sinkhorn_iters_max': jnp.max(iters),
                'sinkhorn_iters_mean': jnp.mean(iters.astype(jnp.float32))}


def ib_kl(mu: jax.Array, std: jax.Array, scale: str = 'exp') -> jax.Array:
  """Information-bottleneck KL to N(0, I): batch mean of the sum over dims.

  Args:
    mu, std: (B, Z) from the front-door head (std = softplus(s - 5), used to sample z).
    scale: 'exp' (official quirk, default): KL(N(mu, exp(std)^2) || N(0, 1)), i.e. `std` is
      treated as a log-scale here although sampling used it as the scale;
      'std' (textbook): KL(N(mu, std^2) || N(0, 1)).
  Returns:
    scalar.
  """
  if scale == 'exp':
    kl = -0.5 * (1.0 + 2.0 * std - mu ** 2 - jnp.exp(2.0 * std))
  elif scale == 'std':
    kl = -0.5 * (1.0 + 2.0 * jnp.log(std) - mu ** 2 - std ** 2)
  else:
    raise ValueError(f"scale must be 'exp' (official) or 'std' (textbook), got {scale!r}.")
  return jnp.mean(jnp.sum(kl, axis=-1))
