"""The recipes (configs/*.py, built by concept_jax/recipes.py) hold every value their docstrings promise.

The optimizer values are checked through the optimizer the trainer builds from the config, on the
model's real parameter names, so a renamed parameter tree or a regex that stops matching fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods, optim, recipes
from concept_jax.data.builders import registry
from configs import aircraft, cub200, stanford_cars

# Nesterov's first step multiplies the gradient by 1 + momentum (buf = g; g + momentum * buf).
NESTEROV_FIRST_STEP = 1.9


def _abstract_params(config, num_classes):
  method = methods.get(config.method.name)(config, num_classes)
  shapes = jax.eval_shape(method.model.init, {'params': jax.random.key(0), 'sample': jax.random.key(1)},
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return method, shapes['params']


def effective_lr_and_decay(config, num_classes=10):
  """{parameter path: (lr multiplier, weight decay)} as the first optimizer step applies them.

  The parameter tree is the tiny model's (the same names as ResNet-50's); the method's own rules come
  first, as in the trainer.
  """
  tiny = recipes.tiny(config.copy_and_resolve_references())
  method, shapes = _abstract_params(tiny, num_classes)
  rules = method.optimizer_rules()
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes)
  ones = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
  tx, _ = optim.make_optimizer(config, zeros, config.iters_per_epoch, rules)
  # Gradient 1 at parameter 0: the update is -lr * mult * 1.9. Gradient 0 at parameter 1: -lr * mult * wd * 1.9.
  update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])   # one compilation, not one per op
  step_grad, step_decay = update(ones, zeros), update(zeros, ones)
  scale = -config.optim.lr * NESTEROV_FIRST_STEP
  value = lambda x: float(np.unique(np.asarray(x)).item())   # every entry of a leaf is the same
  return {optim.param_path(path): (value(g) / scale, value(d) / value(g))
          for (path, g), d in zip(jax.tree_util.tree_leaves_with_path(step_grad),
                                  jax.tree.leaves(step_decay))}


def _check_multipliers(config, backbone, others):
  rates = effective_lr_and_decay(config)
  assert any(p.startswith('head/') for p in rates) and any(p.startswith('front_door/') for p in rates)
  for path, (mult, decay) in rates.items():
    assert mult == pytest.approx(backbone if path.startswith('backbone/') else others, rel=1e-6), path
    assert decay == pytest.approx(5e-4, rel=1e-4), path   # every parameter, BatchNorm included


def _lr_at_epochs(config, epochs):
  lr = optim.schedule(config, config.iters_per_epoch)
  return [float(lr(e * config.iters_per_epoch)) for e in epochs]


@pytest.mark.parametrize('module', [cub200, aircraft])
def test_cub_recipe(module):
  c = module.get_config('')
  assert (c.epochs, c.iters_per_epoch, c.batch_size) == (40, 500, 48)
  assert (c.image_size, c.model.depth, c.model.width) == (224, 50, 64)
  assert c.pretrained.path == 'weights/resnet50-0676ba61.pth'
  assert (c.data.sampling_rate, c.seed, c.method.name) == (100, 0, 'concept_tuning')
  o = c.optim
  assert (o.lr, o.momentum, o.nesterov, o.weight_decay) == (0.01, 0.9, True, 5e-4)
  assert (o.schedule, tuple(o.milestones), o.gamma) == ('multistep', (12, 24), 0.1)
  # x0.1 at the start of epochs 12 and 24 (0-based, as torch's MultiStepLR counts scheduler steps).
  np.testing.assert_allclose(_lr_at_epochs(c, [0, 11, 12, 23, 24, 39]),
                             [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
  _check_multipliers(c, backbone=0.1, others=1.0)


def test_cub_uses_every_other_class_as_confusing():
  c = cub200.get_config('')
  assert c.method.confusing == 199
  assert methods.get('concept_tuning')(c, num_classes=200).num_confusing == 199
  # Aircraft keeps the default 100, which is every other class of its 100 variants too.
  a = aircraft.get_config('')
  assert methods.get('concept_tuning')(a, num_classes=100).num_confusing == 99


def test_stanford_cars_recipe():
  c = stanford_cars.get_config('')
  assert (c.epochs, c.iters_per_epoch, c.batch_size) == (20, 500, 48)
  assert c.optim.schedule == 'cosine' and tuple(c.optim.lr_mults) == ()
  assert (c.optim.lr, c.optim.nesterov, c.optim.weight_decay) == (0.01, True, 5e-4)
  # torch CosineAnnealingLR(T_max=20), stepped per epoch.
  np.testing.assert_allclose(_lr_at_epochs(c, [0, 10, 19]),
                             [0.01, 0.005, 0.005 * (1 + np.cos(np.pi * 19 / 20))], rtol=1e-5)
  _check_multipliers(c, backbone=1.0, others=1.0)   # the official `cos` drops the 0.1x backbone lr


@pytest.mark.parametrize('module, data, num_classes', [
    (cub200, 'cub200', 200), (stanford_cars, 'stanford_cars', 196), (aircraft, 'aircraft', 100)])
def test_data_set_and_its_classes(module, data, num_classes):
  c = module.get_config('sr=15,method=erm,seed=3')
  assert (c.data.name, c.data.sampling_rate, c.seed, c.method.name) == (data, 15, 3, 'erm')
  assert registry.get_spec(data).num_classes == num_classes   # 196 cars, not the official 362
  tiny = module.get_config('tiny')
  assert tiny.data.name == 'synthetic' and tiny.data.synthetic.num_classes == num_classes
  assert tiny.pretrained.path == '' and tiny.model.depth == 18


def test_stanford_cars_reads_the_196_class_release():
  assert registry.get_spec('stanford_cars').tfds_name == 'cars196'
