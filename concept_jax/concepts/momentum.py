"""The momentum key encoder (spec sections 1 and 3), shared by Concept-Tuning and Bi-Tuning: its start,
its EMA update and its forward pass.

theta_k <- m theta_k + (1 - m) theta_q, parameters only (BN statistics are not averaged: pass
the 'params' trees, not 'batch_stats'). The official step does this after the query's forward
passes and before the key encodes its views, with q's parameters from before that step's optimizer
update.
"""
import jax
import jax.numpy as jnp


def init_key_params(query_params):
  """The key encoder's starting parameters: a copy of q's (a pytree of the same structure)."""
  return jax.tree.map(jnp.copy, query_params)


def ema_update(key_params, query_params, m: float = 0.999):
  """Returns m * key + (1 - m) * query, leaf by leaf (same tree structure; no gradient into q).

  Args:
    key_params: pytree of arrays (key encoder parameters).
    query_params: pytree with the same structure (query encoder parameters).
    m: momentum.
  """
  return jax.tree_util.tree_map(
      lambda k, q: (m * k + (1.0 - m) * jax.lax.stop_gradient(q)).astype(k.dtype),
      key_params, query_params)


def encode(apply, key_params, batch_stats, images, rng) -> dict:
  """The key encoder's outputs on images (B, H, W, 3), under stop_gradient.

  apply: Method.apply. The key encoder runs in train mode, as the official code's does: BatchNorm
  normalises with the batch's own statistics, and the running statistics it would update are
  discarded (they are never read), so q's batch_stats only fill the collection.
  """
  out, _ = apply(key_params, batch_stats, images, rng, train=True)
  return jax.lax.stop_gradient(out)
