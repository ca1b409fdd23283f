"""BSS's spectral penalty against numpy's SVD, its gradient, and its place in the method's loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods
from concept_jax.methods.bss import spectral_shrinkage
from tests.conftest import tiny_config


@pytest.mark.parametrize('shape', [(6, 20), (20, 6)])
@pytest.mark.parametrize('k', [1, 3])
def test_smallest_singular_values_match_numpy(shape, k):
  f = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  sigma = np.linalg.svd(f.astype(np.float64), compute_uv=False)        # descending, min(shape) values
  expected = np.sum(np.sort(sigma)[:k] ** 2)
  np.testing.assert_allclose(float(jax.jit(spectral_shrinkage, static_argnums=1)(f, k)), expected,
                             rtol=1e-4)


def test_gradient_is_twice_sigma_u_v():
  """d sigma_min^2 / dF = 2 sigma_min u v^T (u, v the smallest pair), and finite at rank deficiency."""
  f = np.random.default_rng(1).normal(size=(5, 8))
  u, s, vt = np.linalg.svd(f, full_matrices=False)
  grad = jax.grad(spectral_shrinkage)(jnp.asarray(f, jnp.float32), 1)
  np.testing.assert_allclose(grad, 2 * s[-1] * np.outer(u[:, -1], vt[-1]), atol=1e-4)
  repeated = jnp.tile(jnp.asarray(f[:2], jnp.float32), (3, 1))         # rank 2 of 6: sigma_min = 0
  assert np.all(np.isfinite(jax.grad(spectral_shrinkage)(repeated, 1)))


def test_k_beyond_the_rank_is_refused():
  with pytest.raises(ValueError, match=r'method.k=5 must be between 1 and min\(batch, feature dim\) = 4'):
    spectral_shrinkage(jnp.ones((4, 16)), 5)


def test_loss_is_cross_entropy_plus_trade_off_times_penalty():
  config = tiny_config('bss')
  assert (config.method.k, config.method.trade_off) == (1, 0.001)   # tllib's defaults
  config.method.trade_off = 0.5
  method = methods.get('bss')(config, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 1, 32, 32, 3))
  variables = method.model.init({'params': jax.random.key(1), 'sample': jax.random.key(1)}, x[:, 0])
  loss, (metrics, _, _) = method.loss(variables['params'], variables['batch_stats'], {}, x,
                                      jnp.array([0, 1, 2, 3]), jax.random.key(2))
  out, _ = method.apply(variables['params'], variables['batch_stats'], x[:, 0], jax.random.key(2), train=True)
  sigma = np.linalg.svd(np.asarray(out['features'], np.float64), compute_uv=False)
  np.testing.assert_allclose(float(metrics['bss']), sigma[-1] ** 2, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(metrics['ce'] + 0.5 * metrics['bss']), rtol=1e-6)
