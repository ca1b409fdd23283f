"""Co-Tuning: the category relationship on a hand-built case and from a model, and its loss, vs numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods
from concept_jax.methods import co_tuning
from tests.conftest import tiny_config


def np_relationship(probabilities, labels, num_classes):
  """tllib's Relationship.get_category_relationship: mean probability over each class's examples."""
  return np.stack([probabilities[labels == c].mean(0) for c in range(num_classes)])


def test_relationship_of_a_hand_built_case():
  # 3 target classes, 4 source classes, examples spread over two batches in mixed order.
  probabilities = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                            [0.0, 0.0, 0.0, 1.0], [0.0, 0.2, 0.2, 0.6], [0.1, 0.1, 0.1, 0.7]])
  labels = np.array([0, 0, 1, 2, 2, 2])
  got = co_tuning.category_relationship([(probabilities[:4], labels[:4]), (probabilities[4:], labels[4:])], 3)
  np.testing.assert_allclose(got, [[0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                                   [0.1 / 3, 0.1, 0.1, 2.3 / 3]], rtol=1e-6)
  np.testing.assert_allclose(got, np_relationship(probabilities, labels, 3), rtol=1e-6)
  assert got.dtype == np.float32


def test_a_class_without_examples_gets_a_uniform_row():
  got = co_tuning.category_relationship([(np.array([[0.2, 0.8], [1.0, 0.0]]), np.array([0, 2]))], 4)
  np.testing.assert_allclose(got, [[0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]], rtol=1e-7)


def test_prepare_relates_the_source_heads_predictions_to_the_labels():
  config = tiny_config('co_tuning')
  config.model.source_classes = 6
  method = methods.get('co_tuning')(config, num_classes=3)
  size = config.image_size
  variables = jax.device_get(method.model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3))))
  images = np.asarray(jax.random.normal(jax.random.key(1), (7, size, size, 3)))
  labels = np.array([2, 0, 1, 2, 0, 0, 1])
  prepared = method.prepare(variables, [(images[:4], labels[:4]), (images[4:], labels[4:])])
  logits = method.model.apply(variables, images, train=False)['source_logits']
  expected = np_relationship(np.asarray(jax.nn.softmax(logits)), labels, 3)
  np.testing.assert_allclose(prepared['relationship'], expected, rtol=1e-5)
  state = method.init_state(jax.random.key(2), variables, prepared)
  np.testing.assert_array_equal(state['relationship'], prepared['relationship'])
  with pytest.raises(ValueError, match='category relationship'):
    method.init_state(jax.random.key(2), variables, {})


def test_relationship_loss_is_cross_entropy_to_the_soft_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5))
  targets = rng.dirichlet(np.ones(5), size=4)
  log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(co_tuning.relationship_loss(logits, targets), -np.mean(np.sum(targets * log_q, -1)),
                             rtol=1e-5)
