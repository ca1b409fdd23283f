"""EMA update of the key encoder."""
import jax
import jax.numpy as jnp
import numpy as np

from concept_jax.concepts import momentum


def test_ema_update_values_structure_and_no_gradient():
  key = {'a': jnp.ones((2, 3)), 'b': {'c': jnp.zeros((4,))}}
  query = {'a': jnp.full((2, 3), 3.0), 'b': {'c': jnp.full((4,), 2.0)}}
  new = momentum.ema_update(key, query, m=0.9)
  np.testing.assert_allclose(new['a'], 0.9 * 1 + 0.1 * 3, rtol=1e-6)
  np.testing.assert_allclose(new['b']['c'], 0.1 * 2, rtol=1e-6)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(key)
  default = momentum.ema_update(key, query)
  np.testing.assert_allclose(default['a'], 0.999 + 0.001 * 3, rtol=1e-6)
  g = jax.grad(lambda q: jnp.sum(momentum.ema_update(key, q)['a']))(query)
  np.testing.assert_array_equal(g['a'], 0.0)
