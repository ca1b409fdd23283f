"""Per-class queues against the official sequential write loop."""
import jax
import jax.numpy as jnp
import numpy as np

from concept_jax.concepts import queues


def np_enqueue(q, z_k, h_k, labels):
  """The official loop: in batch order, write at the class pointer, pointer += 1 mod K."""
  z, h, ptr = np.array(q['z']), np.array(q['h']), np.array(q['ptr'])
  k = z.shape[1]
  for i, c in enumerate(labels):
    z[c, ptr[c]] = z_k[i]
    h[c, ptr[c]] = h_k[i]
    ptr[c] = (ptr[c] + 1) % k
  return z, h, ptr


def test_init_shapes_and_norms():
  q = queues.init_queues(jax.random.PRNGKey(0), num_classes=5, K=3,
                          shapes={'z': (6,), 'h': (9, 6)})
  assert q['z'].shape == (5, 3, 6) and q['h'].shape == (5, 3, 9, 6)
  assert q['ptr'].shape == (5,) and q['ptr'].dtype == jnp.int32
  np.testing.assert_allclose(jnp.linalg.norm(q['z'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(q['h'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(q['ptr'], 0)
  assert not np.allclose(q['z'][0, 0], q['h'][0, 0, 0, :])


def test_enqueue_matches_sequential_loop():
  rng = np.random.default_rng(0)
  num_classes, k, dim = 5, 4, 3
  q = queues.init_queues(jax.random.PRNGKey(1), num_classes, k, {'z': (dim,), 'h': (2, dim)})
  q['ptr'] = jnp.array([0, 3, 2, 1, 3], jnp.int32)          # some pointers about to wrap
  step = jax.jit(queues.enqueue)
  batches = [np.array([1, 1, 1, 4, 0, 1, 4, 2]),             # repeats, wrap-around
             np.array([3, 3, 3, 3, 3, 3, 3, 2, 3, 3]),        # class 3 nine times > K
             np.array([0, 1, 2, 3, 4, 0])]
  ref = (np.asarray(q['z']), np.asarray(q['h']), np.asarray(q['ptr']))
  for labels in batches:
    z_k = rng.standard_normal((len(labels), dim)).astype(np.float32)
    h_k = rng.standard_normal((len(labels), 2, dim)).astype(np.float32)
    q = step(q, {'z': z_k, 'h': h_k}, labels)
    ref = np_enqueue({'z': ref[0], 'h': ref[1], 'ptr': ref[2]}, z_k, h_k, labels)
    np.testing.assert_array_equal(q['z'], ref[0])
    np.testing.assert_array_equal(q['h'], ref[1])
    np.testing.assert_array_equal(q['ptr'], ref[2])


def test_enqueue_keeps_extra_entries_unwritten_queues_and_untouched_classes():
  q = queues.init_queues(jax.random.PRNGKey(2), 4, 2, {'z': (3,), 'h': (9, 3)})
  q['note'] = jnp.ones(())
  new = queues.enqueue(q, {'z': jnp.zeros((2, 3))}, jnp.array([2, 2]))
  assert 'note' in new
  np.testing.assert_array_equal(new['h'], q['h'])            # not written this time
  np.testing.assert_array_equal(new['z'][np.array([0, 1, 3])], q['z'][np.array([0, 1, 3])])
  np.testing.assert_array_equal(new['z'][2], 0.0)
  np.testing.assert_array_equal(new['ptr'], [0, 0, 0, 0])
