"""L2-SP: the distance to the starting point and the head's L2 against numpy, the frozen start copy, and
weight decay replaced by the penalties."""
import jax
import jax.numpy as jnp
import numpy as np

from concept_jax import methods, optim
from concept_jax.methods.l2_sp import half_squared_norm, starting_point_distance
from tests.conftest import tiny_config


def test_distance_to_the_start_on_a_small_pytree():
  rng = np.random.default_rng(0)
  start = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))}, 'bn': {'scale': rng.normal(size=4),
                                                                     'bias': rng.normal(size=4)}}
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape), start)
  expected = 0.5 * sum(np.sum((p - s) ** 2) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
  np.testing.assert_allclose(float(starting_point_distance(params, start)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(half_squared_norm(params)),
                             0.5 * sum(np.sum(p ** 2) for p in jax.tree.leaves(params)), rtol=1e-6)
  # The gradient pulls towards the start: w - w0.
  grad = jax.grad(starting_point_distance)(params, start)
  jax.tree.map(lambda g, p, s: np.testing.assert_allclose(g, p - s, atol=1e-6), grad, params, start)


def _setup():
  config = tiny_config('l2_sp')
  method = methods.get('l2_sp')(config, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 1, 32, 32, 3))
  variables = method.model.init({'params': jax.random.key(1), 'sample': jax.random.key(1)}, x[:, 0])
  return config, method, variables, x


def test_loss_adds_both_penalties_against_a_frozen_start():
  config, method, variables, x = _setup()
  assert (config.method.trade_off_backbone, config.method.trade_off_head) == (0.01, 0.01)   # tllib's
  state = method.init_state(jax.random.key(0), variables)
  start = state['start']
  assert jax.tree.structure(start) == jax.tree.structure(variables['params']['backbone'])
  moved = dict(variables['params'], backbone=jax.tree.map(lambda p: p + 0.1, variables['params']['backbone']))
  loss, (metrics, _, new_state) = method.loss(moved, variables['batch_stats'], state, x,
                                              jnp.array([0, 1, 2, 3]), jax.random.key(2))
  count = sum(p.size for p in jax.tree.leaves(start))
  np.testing.assert_allclose(float(metrics['sp']), 0.5 * 0.01 * count, rtol=1e-4)    # 1/2 sum 0.1^2
  head = variables['params']['head']
  np.testing.assert_allclose(float(metrics['head_l2']),
                             0.5 * (np.sum(head['kernel'] ** 2) + np.sum(head['bias'] ** 2)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(metrics['ce'] + 0.01 * metrics['sp']
                                                + 0.01 * metrics['head_l2']), rtol=1e-6)
  assert new_state is state   # the start never moves
  # No gradient into the start copy.
  grad_start = jax.grad(lambda s: method.loss(moved, variables['batch_stats'], {'start': s}, x,
                                              jnp.array([0, 1, 2, 3]), jax.random.key(2))[0])(start)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_start))


def test_penalties_replace_weight_decay_on_backbone_and_head():
  config, method, variables, _ = _setup()
  config.optim.weight_decay = 0.5
  tx, _ = optim.make_optimizer(config, variables['params'], 1, method.optimizer_rules())
  zero = jax.tree.map(jnp.zeros_like, variables['params'])
  updates, _ = tx.update(zero, tx.init(variables['params']), variables['params'])
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  # ERM keeps config's weight decay: the same zero gradient moves its parameters.
  tx, _ = optim.make_optimizer(config, variables['params'], 1)
  updates, _ = tx.update(zero, tx.init(variables['params']), variables['params'])
  assert float(jnp.abs(updates['head']['kernel']).max()) > 0
