"""Per-class ring buffers of key embeddings (spec section 7), shared by Concept-Tuning and Bi-Tuning.

queues = {name: (C, K, *shape) per stored key, 'ptr': (C,) int32 next write slot per class}; e.g.
Concept-Tuning's {'z': (C, K, dim) image keys, 'h': (C, K, num_patches, dim) patch-set keys},
Bi-Tuning's {'z': (C, K, projection_dim), 'h': (C, K, D + 1)}.

Writes are vectorised but equal the official sequential loop "for each sample in batch order:
write at its class pointer, pointer += 1 mod K": a sample's slot is its class pointer plus its
rank among the earlier samples of the same class. If a class appears more than K times in a
batch, only its last K samples are written (the earlier ones would be overwritten anyway), so
the scatter never has duplicate indices.
"""
from typing import Dict, Mapping

import jax
import jax.numpy as jnp


def l2_normalise(x: jax.Array) -> jax.Array:
  """x / ||x|| along the last axis (F.normalize's eps 1e-12): how keys and queue entries are stored."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_queues(key: jax.Array, num_classes: int, K: int,
                shapes: Mapping[str, tuple[int, ...]]) -> Dict[str, jax.Array]:
  """Random normal entries, l2-normalised along their last axis; pointers at 0.

  Args:
    shapes: {name: shape of one key}, e.g. {'z': (dim,), 'h': (num_patches, dim)}; the entries draw
      from jax.random.split(key, len(shapes)) in this order.
  Returns {name: (C, K, *shape) float32, ..., 'ptr': (C,) int32}.
  """
  keys = jax.random.split(key, len(shapes))
  queues = {name: l2_normalise(jax.random.normal(k, (num_classes, K, *shape), jnp.float32))
            for k, (name, shape) in zip(keys, shapes.items())}
  queues['ptr'] = jnp.zeros((num_classes,), jnp.int32)
  return queues


def enqueue(queues: Dict[str, jax.Array], keys: Mapping[str, jax.Array],
            labels: jax.Array) -> Dict[str, jax.Array]:
  """Writes each sample's keys into its class queue.

  Args:
    queues: as from `init_queues`.
    keys: {name: (B, *shape)} for names of `queues` (no gradient is taken through them).
    labels: (B,) int classes.
  Returns:
    New queues dict (same shapes; entries not in `keys` kept); ptr[c] advances by the count of
    class c mod K.
  """
  num_classes, k = queues['ptr'].shape[0], next(queues[name] for name in keys).shape[1]
  labels = labels.astype(jnp.int32)
  b = labels.shape[0]
  same = labels[:, None] == labels[None, :]                                   # (B, B)
  earlier = jnp.tril(jnp.ones((b, b), bool), k=-1)
  rank = jnp.sum(same & earlier, axis=1)                                      # earlier same-class
  count = jnp.sum(same, axis=1)                                               # class size in batch
  slot = (queues['ptr'][labels] + rank) % k
  keep = rank >= count - k                                                    # last K per class
  row = jnp.where(keep, labels, num_classes)  # out of range: dropped
  written = {name: queues[name].at[row, slot].set(
      jax.lax.stop_gradient(value).astype(queues[name].dtype), mode='drop')
             for name, value in keys.items()}
  counts = jnp.zeros((num_classes,), jnp.int32).at[labels].add(1)
  return {**queues, **written, 'ptr': (queues['ptr'] + counts) % k}
