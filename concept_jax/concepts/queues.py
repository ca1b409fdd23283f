"""Per-class ring buffers of key embeddings (spec section 7).

queues = {'z': (C, K, dim) image keys, 'h': (C, K, num_patches, dim) patch-set keys,
          'ptr': (C,) int32 next write slot per class}.

Writes are vectorised but equal the official sequential loop "for each sample in batch order:
write at its class pointer, pointer += 1 mod K": a sample's slot is its class pointer plus its
rank among the earlier samples of the same class. If a class appears more than K times in a
batch, only its last K samples are written (the earlier ones would be overwritten anyway), so
the scatter never has duplicate indices. Losses must read the queues from before `enqueue`.
"""
from typing import Dict

import jax
import jax.numpy as jnp


def l2_normalise(x: jax.Array) -> jax.Array:
  """x / ||x|| along the last axis (F.normalize's eps 1e-12): how keys and queue entries are stored."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_queues(key: jax.Array, num_classes: int, K: int, dim: int,
                num_patches: int = 9) -> Dict[str, jax.Array]:
  """Random normal entries, l2-normalised along `dim`; pointers at 0.

  Returns {'z': (C, K, dim), 'h': (C, K, num_patches, dim), 'ptr': (C,) int32}, float32.
  """
  kz, kh = jax.random.split(key)
  return {
      'z': l2_normalise(jax.random.normal(kz, (num_classes, K, dim), jnp.float32)),
      'h': l2_normalise(jax.random.normal(kh, (num_classes, K, num_patches, dim), jnp.float32)),
      'ptr': jnp.zeros((num_classes,), jnp.int32),
  }


def enqueue(queues: Dict[str, jax.Array], z_k: jax.Array, h_k: jax.Array,
            labels: jax.Array) -> Dict[str, jax.Array]:
  """Writes each sample's keys into its class queue.

  Args:
    queues: as from `init_queues`.
    z_k: (B, dim) image keys; h_k: (B, num_patches, dim) patch-set keys.
    labels: (B,) int classes.
  Returns:
    New queues dict (same shapes); ptr[c] advances by the count of class c mod K.
  """
  num_classes, k = queues['z'].shape[:2]
  labels = labels.astype(jnp.int32)
  b = labels.shape[0]
  same = labels[:, None] == labels[None, :]                                   # (B, B)
  earlier = jnp.tril(jnp.ones((b, b), bool), k=-1)
  rank = jnp.sum(same & earlier, axis=1)                                      # earlier same-class
  count = jnp.sum(same, axis=1)                                               # class size in batch
  slot = (queues['ptr'][labels] + rank) % k
  keep = rank >= count - k                                                    # last K per class
  row = jnp.where(keep, labels, num_classes)  # out of range: dropped
  z_k = jax.lax.stop_gradient(z_k).astype(queues['z'].dtype)
  h_k = jax.lax.stop_gradient(h_k).astype(queues['h'].dtype)
  counts = jnp.zeros((num_classes,), jnp.int32).at[labels].add(1)
  return {
      **queues,  # keeps any extra entries a caller stores alongside
      'z': queues['z'].at[row, slot].set(z_k, mode='drop'),
      'h': queues['h'].at[row, slot].set(h_k, mode='drop'),
      'ptr': (queues['ptr'] + counts) % k,
  }
