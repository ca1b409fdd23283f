"""LwF: the distillation term against numpy, and what one step trains and keeps."""
import jax
import jax.numpy as jnp
import numpy as np

from concept_jax import methods
from concept_jax.methods import lwf
from tests.conftest import tiny_config


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_distillation_matches_numpy_kl_batchmean():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 5, 11)) * 4
  t = 3.0
  p, q = np_softmax(teacher / t), np_softmax(student / t)
  expected = np.sum(p * (np.log(p) - np.log(q))) / 5        # torch KLDivLoss(reduction='batchmean')
  got = jax.jit(lwf.distillation_loss, static_argnums=2)(student, teacher, t)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert float(lwf.distillation_loss(teacher, teacher, t)) < 1e-6
  g_teacher = jax.grad(lwf.distillation_loss, argnums=1)(student, teacher, t)
  np.testing.assert_array_equal(g_teacher, 0.0)


def test_loss_distils_towards_the_frozen_start_and_keeps_it():
  config = tiny_config('lwf')
  method = methods.get('lwf')(config, num_classes=10)
  size = config.image_size
  variables = method.model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
  state = method.init_state(jax.random.key(1), variables)
  images = jax.random.normal(jax.random.key(2), (4, 1, size, size, 3))
  labels = jnp.array([0, 3, 3, 9])
  # q has moved away from the start, as it does after some steps.
  params = jax.tree.map(lambda p: p * 1.1, variables['params'])

  (_, (metrics, _, new_state)), grads = jax.jit(jax.value_and_grad(
      lambda p: method.loss(p, variables['batch_stats'], state, images, labels, jax.random.key(3)),
      has_aux=True))(params)
  teacher, _ = method.apply(variables['params'], variables['batch_stats'], images[:, 0],
                            jax.random.key(0), train=False)
  student, _ = method.apply(params, variables['batch_stats'], images[:, 0], jax.random.key(0),
                            train=True)
  t = config.method.temperature
  p, q = np_softmax(np.asarray(teacher['source_logits']) / t), np_softmax(np.asarray(student['source_logits']) / t)
  np.testing.assert_allclose(metrics['distillation'], np.sum(p * np.log(p / q)) / 4, rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, new_state['teacher'], dict(variables))
  assert float(jnp.abs(grads['source_head']['kernel']).max()) > 0       # the optimizer's rule freezes it
  assert method.optimizer_rules() == {'lr_mults': ((r'^source_head/', 0.0),)}
