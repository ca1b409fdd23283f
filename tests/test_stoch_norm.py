"""StochNorm (models/stoch_norm.py) against BatchNorm and a numpy reference, in a layer and in the
ResNet: per-channel choice of statistics, its frequency, eval mode, names, and the method."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods
from concept_jax.models import resnet
from concept_jax.models.classifier import Classifier
from concept_jax.models.stoch_norm import StochNorm
from tests.conftest import tiny_config

C = 4096   # channels: the fraction drawn is close to p
X = jax.random.normal(jax.random.key(0), (6, 3, 3, C)) * 2.0 + 0.5


class _Layer(nn.Module):
  """One norm layer named as in the ResNet, built the way resnet._bn builds it."""
  norm: object

  @nn.compact
  def __call__(self, x, train: bool):
    return self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn1')(x)


class _TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return tuple(StochNorm(p=0.5, momentum=0.9, name=n)(x) for n in ('a', 'b'))


@pytest.fixture(scope='module')
def variables():
  """BatchNorm variables with running statistics unlike the batch's, and a non-trivial affine."""
  keys = jax.random.split(jax.random.key(1), 4)
  return {'params': {'bn1': {'scale': 1 + jax.random.uniform(keys[0], (C,)),
                             'bias': jax.random.normal(keys[1], (C,))}},
          'batch_stats': {'bn1': {'mean': jax.random.normal(keys[2], (C,)),
                                  'var': 0.5 + jax.random.uniform(keys[3], (C,))}}}


def _run(norm, variables, train, rng=2):
  out, mutated = _Layer(norm).apply(variables, X, train, rngs={'sample': jax.random.key(rng)},
                                    mutable=['batch_stats'])
  return np.asarray(out), mutated['batch_stats']


def _numpy_norm(x, mean, var, p):
  return (x - mean) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def test_p_half_draws_about_half_the_channels_and_each_is_exactly_one_branch(variables):
  out, stats = _run(functools.partial(StochNorm, p=0.5), variables, train=True)
  x, p = np.asarray(X, np.float64), jax.tree.map(np.asarray, variables['params']['bn1'])
  running = _numpy_norm(x, *map(np.asarray, variables['batch_stats']['bn1'].values()), p)
  batch = _numpy_norm(x, x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)), p)
  uses_batch = np.all(np.abs(out - batch) < 1e-4, axis=(0, 1, 2))
  uses_running = np.all(np.abs(out - running) < 1e-4, axis=(0, 1, 2))
  assert np.all(uses_batch ^ uses_running)      # every channel, for the whole batch, one branch only
  assert 0.46 < uses_batch.mean() < 0.54        # Bernoulli(0.5) over 4096 channels: sd 0.008
  # The running statistics are updated from the batch whatever was drawn.
  _, bn_stats = _run(nn.BatchNorm, variables, train=True)
  jax.tree.map(np.testing.assert_array_equal, stats, bn_stats)
  # Another step (another key) draws other channels, and so does another layer in the same step.
  other, _ = _run(functools.partial(StochNorm, p=0.5), variables, train=True, rng=3)
  assert 0.3 < np.mean(np.any(other != out, axis=(0, 1, 2))) < 0.7
  two = _TwoLayers().apply({'params': {n: variables['params']['bn1'] for n in ('a', 'b')},
                            'batch_stats': {n: variables['batch_stats']['bn1'] for n in ('a', 'b')}},
                           X, rngs={'sample': jax.random.key(2)}, mutable=['batch_stats'])[0]
  assert 0.3 < np.mean(np.any(two[0] != two[1], axis=(0, 1, 2))) < 0.7


def test_p_one_is_batchnorm_in_train_mode(variables):
  out, stats = _run(functools.partial(StochNorm, p=1.0), variables, train=True)
  bn_out, bn_stats = _run(nn.BatchNorm, variables, train=True)
  np.testing.assert_array_equal(out, bn_out)
  jax.tree.map(np.testing.assert_array_equal, stats, bn_stats)


def test_p_zero_is_eval_mode_normalisation_with_updated_statistics(variables):
  out, stats = _run(functools.partial(StochNorm, p=0.0), variables, train=True)
  np.testing.assert_array_equal(out, _run(nn.BatchNorm, variables, train=False)[0])
  jax.tree.map(np.testing.assert_array_equal, stats, _run(nn.BatchNorm, variables, train=True)[1])


@pytest.mark.parametrize('p', [0.0, 0.5, 1.0])
def test_eval_mode_always_uses_running_statistics(variables, p):
  out, stats = _run(functools.partial(StochNorm, p=p), variables, train=False)
  np.testing.assert_array_equal(out, _run(nn.BatchNorm, variables, train=False)[0])
  jax.tree.map(np.testing.assert_array_equal, stats, variables['batch_stats'])


def test_in_the_resnet_names_are_batchnorms_and_p_one_is_batchnorm():
  """Same parameter tree as norm='batch' (torchvision weights load)."""
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  rngs = {'params': jax.random.key(1), 'sample': jax.random.key(2)}
  batch = Classifier(num_classes=3, depth=0, width=8)
  variables = batch.init(rngs, x, train=False)
  stoch = Classifier(num_classes=3, depth=0, width=8, norm='stoch', stoch_norm_p=1.0)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(stoch.init(rngs, x, train=False)) == shapes(variables)

  def train_step(model):
    return model.apply(variables, x, train=True, rngs={'sample': jax.random.key(3)}, mutable=['batch_stats'])

  jax.tree.map(np.testing.assert_array_equal, train_step(stoch), train_step(batch))
  with pytest.raises(ValueError, match="model.norm='group' is unknown; choose 'batch' or 'stoch'"):
    resnet.norm_layer('group')


def test_stoch_norm_method_is_erm_with_stoch_norm_layers():
  method = methods.get('stoch_norm')(tiny_config('stoch_norm'), num_classes=10)
  assert method.model.norm == 'stoch' and method.model.stoch_norm_p == 0.5
  assert methods.get('erm')(tiny_config('erm'), num_classes=10).model.norm == 'batch'
  config = tiny_config('bss')
  config.model.norm = 'stoch'   # any method takes it as a model option
  assert methods.get('bss')(config, num_classes=10).model.norm == 'stoch'
