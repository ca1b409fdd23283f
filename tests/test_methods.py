"""Every registered method, checked alike (a new method gets these for free): its defaults select it,
one loss step is finite, keeps the state's structure and moves the backbone and the head, and two
trainer steps interrupted after one resume to the bitwise-identical state."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import checkpoint, methods, recipes, train
from concept_jax.methods.base import Method
from tests.conftest import tiny_config

NAMES = methods.names()
B = 4


def test_every_method_is_selected_by_name_in_every_recipe():
  from configs import aircraft, cub200, stanford_cars
  for recipe in (cub200, stanford_cars, aircraft):
    for name in NAMES:
      config = recipe.get_config(f'method={name},sr=15')
      assert config.method.name == name and config.data.sampling_rate == 15
      assert methods.get(name).name == name
  with pytest.raises(ValueError, match="method.name='sgd' is unknown; choose one of"):
    recipes.method_config('sgd')


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.fixture(scope='module', params=NAMES)
def one_step(request):
  """(method, state before, loss, metrics, new batch stats, new state, gradients) of one jitted step."""
  config = tiny_config(request.param)
  method = methods.get(request.param)(config, num_classes=10)
  size = config.image_size
  variables = jax.jit(lambda r: method.model.init({'params': r, 'sample': r}, jnp.zeros((1, size, size, 3)),
                                                  train=False))(jax.random.key(0))
  images = jax.random.normal(jax.random.key(3), (B, len(method.views), size, size, 3))
  labels = jnp.array([1, 3, 1, 7])
  prepared = method.prepare(jax.device_get(variables), [(np.asarray(images[:, 0]), np.asarray(labels))])
  state = method.init_state(jax.random.key(2), variables, prepared)
  grad_fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
  (loss, (metrics, batch_stats, new_state)), grads = grad_fn(
      variables['params'], variables['batch_stats'], state, images, labels, jax.random.key(4))
  return method, variables, state, loss, metrics, batch_stats, new_state, grads


def test_loss_and_metrics_are_finite(one_step):
  _, _, _, loss, metrics, _, _, grads = one_step
  assert np.isfinite(float(loss))
  assert all(np.ndim(v) == 0 and np.isfinite(float(v)) for v in metrics.values()), metrics
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_state_keeps_its_structure(one_step):
  """A state whose tree changed would not restore from a checkpoint or donate its buffers."""
  _, variables, state, _, _, batch_stats, new_state, _ = one_step
  assert _shapes(new_state) == _shapes(state)
  assert _shapes(batch_stats) == _shapes(variables['batch_stats'])


def test_backbone_and_head_get_gradient(one_step):
  _, _, _, _, _, _, _, grads = one_step
  for part in ('backbone', 'head'):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part


# What each method keeps beyond the parameters, optimizer and BatchNorm statistics.
METHOD_STATE = {'erm': set(), 'stoch_norm': set(), 'bss': set(), 'l2_sp': {'start'},
                'delta': {'source', 'attention'}, 'lwf': {'teacher'}, 'co_tuning': {'relationship'},
                'bi_tuning': {'key_params', 'queues'}, 'concept_tuning': {'key_params', 'queues'}}


@pytest.mark.parametrize('name', NAMES)
def test_resume_from_an_earlier_checkpoint_is_bitwise(tmp_path, monkeypatch, name):
  """4 steps with a checkpoint every 2; the last removed, the rerun resumes from step 2 and ends in
  the bitwise-identical state (parameters, optimizer, the method's state, which holds DELTA's
  attention and Co-Tuning's relationship); their method.prepare runs once per workdir, the resume
  reads prepared.npz back. tiny_config's own schedule: the step program other tests compile too (a
  cache hit for whichever runs second)."""
  cls = methods.get(name)
  calls = []
  prepare = cls.prepare
  monkeypatch.setattr(cls, 'prepare', lambda self, *a: calls.append(1) or prepare(self, *a))
  config = tiny_config(name)
  assert (config.epochs * config.iters_per_epoch, config.checkpoint_every) == (4, 2)
  run = tmp_path / 'run'
  train.run(config, str(run))
  uninterrupted = checkpoint.load_state(run)
  prepared_once = len(calls)
  calls.clear()
  shutil.rmtree(run / checkpoint.SUBDIR / '4')
  os.remove(run / 'results.json')
  assert train.run(config, str(run))['steps'] == 4                      # resumes at step 2

  resumed = checkpoint.load_state(run)
  assert set(resumed) == {'step', 'params', 'batch_stats', 'opt', 'method'} and int(resumed['step']) == 4
  assert set(resumed['method']) == METHOD_STATE[name]
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, resumed)
  losses = [r['loss'] for r in map(json.loads, open(run / 'metrics.jsonl')) if 'loss' in r]
  assert len(losses) == 4 and all(map(math.isfinite, losses))
  assert prepared_once == 1
  if prepare is not Method.prepare:  # one-time statistics: read back from prepared.npz, not recomputed
    assert calls == [] and os.path.exists(run / train.PREPARED)
  if name == 'co_tuning':
    with np.load(run / train.PREPARED) as cached:
      np.testing.assert_array_equal(resumed['method']['relationship'], cached['relationship'])
    np.testing.assert_allclose(resumed['method']['relationship'].sum(1), 1.0, rtol=1e-5)
  if name == 'delta':  # one channel attention per stage, the one read back
    with np.load(run / train.PREPARED) as cached:
      assert set(resumed['method']['attention']) == set(cached) == {'layer1', 'layer2', 'layer3', 'layer4'}
      for stage in cached:
        np.testing.assert_array_equal(resumed['method']['attention'][stage], cached[stage])
