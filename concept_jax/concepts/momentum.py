"""Momentum (EMA) update of the key encoder (spec sections 1 and 3).

theta_k <- m theta_k + (1 - m) theta_q, parameters only (BN statistics are not averaged: pass
the 'params' trees, not 'batch_stats'). The official step does this after the query's forward
passes on views 0 and 2 and before the key encodes views 1 and 3, with q's parameters from before
that step's optimizer update.
"""
import jax


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
