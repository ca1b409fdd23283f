"""Concept-Tuning as a method: where gradients go, what state changes, and a short run that learns."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods, train
from tests.conftest import tiny_config

B = 4


@pytest.fixture(scope='module')
def setup():
  config = tiny_config('concept_tuning')
  method = methods.get('concept_tuning')(config, num_classes=10)
  size = config.image_size
  variables = method.model.init({'params': jax.random.key(0), 'sample': jax.random.key(1)},
                                jnp.zeros((1, size, size, 3)), train=False)
  state = method.init_state(jax.random.key(2), variables)
  # The key encoder differs from q, as it does after some steps, so EMA and gradients are visible.
  state['key_params'] = jax.tree.map(lambda p: p + 0.01, state['key_params'])
  images = jax.random.normal(jax.random.key(3), (B, 4, size, size, 3))
  labels = jnp.array([1, 3, 1, 7])
  return config, method, variables, state, images, labels


@pytest.fixture(scope='module')
def computed(setup):
  """Every gradient and output the tests inspect, from one compiled function (compiling is the cost)."""
  config, method, variables, state, images, labels = setup
  params, batch_stats = variables['params'], variables['batch_stats']
  boxes = jnp.tile(jnp.array([[0., 0., 16., 16.]]), (B, config.method.num_concepts, 1))

  def loss(p, key_params):
    return method.loss(p, batch_stats, dict(state, key_params=key_params), images, labels,
                       jax.random.key(4))

  def patch_sum(p):
    return jnp.sum(method.patch_embeddings(p, batch_stats, images[:, 2], boxes, jax.random.key(0))
                   * jnp.arange(10.))

  def everything(p, key_params):
    (_, aux), (grad_q, grad_k) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, key_params)
    _, mutated = method.model.apply({'params': p, 'batch_stats': batch_stats}, images[:, 0], train=True,
                                    mutable=['batch_stats'], rngs={'sample': jax.random.key(0)})
    return {'aux': aux, 'grad_q': grad_q, 'grad_k': grad_k, 'grad_patch': jax.grad(patch_sum)(p),
            'view0_batch_stats': mutated['batch_stats']}

  return jax.jit(everything)(params, state['key_params'])


def _norms(tree):
  return [float(jnp.abs(x).max()) for x in jax.tree.leaves(tree)]


def test_patch_path_reaches_the_backbone_but_not_the_head(computed):
  assert all(v == 0 for v in _norms(computed['grad_patch']['head']))
  assert any(v > 0 for v in _norms(computed['grad_patch']['backbone']))


def test_no_gradient_into_the_key_encoder(computed):
  assert all(v == 0 for v in _norms(computed['grad_k']))


def test_every_loss_term_gives_gradient_to_q(computed):
  for part in ('backbone', 'head', 'front_door'):
    assert any(v > 0 for v in _norms(computed['grad_q'][part])), part


def test_state_updates(setup, computed):
  config, _, variables, state, _, _ = setup
  metrics, batch_stats, new_state = computed['aux']
  assert all(math.isfinite(float(v)) for v in metrics.values())
  # EMA with q's parameters from before the update.
  m = config.method.momentum
  expected = jax.tree.map(lambda k, q: m * k + (1 - m) * q, state['key_params'], variables['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new_state['key_params'], expected)
  # Running statistics: only q's pass on view 0 updates them (patch passes leave them alone).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               batch_stats, computed['view0_batch_stats'])
  # Queues: class 1 wrote twice, 3 and 7 once.
  ptr = np.asarray(new_state['queues']['ptr'])
  k = config.method.queue_size
  assert ptr[1] == 2 % k and ptr[3] == 1 and ptr[7] == 1 and ptr.sum() == 2 % k + 2


def test_short_run_learns_with_every_term_finite(tmp_path):
  config = tiny_config('concept_tuning')
  config.epochs, config.iters_per_epoch, config.checkpoint_every = 1, 16, 16
  config.optim.update(lr=0.05, schedule='constant')
  train.run(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"loss"' in l]
  terms = ('loss', 'ce', 'image_contrast', 'concept_contrast', 'ib_ce', 'kl')
  assert all(math.isfinite(r[t]) for r in records for t in terms)
  # The logged Sinkhorn trip count (a mean over the logging window) lies within the loop's cap.
  assert all(1 <= r['sinkhorn_iters'] <= config.method.sinkhorn_iters for r in records)
  first = np.mean([r['loss'] for r in records[:4]])
  last = np.mean([r['loss'] for r in records[-4:]])
  assert last < first, (first, last)
