"""LwF, Co-Tuning and Bi-Tuning end to end through train.run: two steps, an exact resume with their
extra state, Co-Tuning's relationship computed once, and where the source head comes from."""
import json
import math

import jax
import numpy as np
import pytest

from concept_jax import checkpoint, methods, recipes, train
from tests.conftest import tiny_config

METHODS = ('lwf', 'co_tuning', 'bi_tuning')
STATE = {'lwf': {'teacher'}, 'co_tuning': {'relationship'}, 'bi_tuning': {'key_params', 'queues'}}


@pytest.mark.parametrize('method', METHODS)
def test_two_steps_then_resume_is_bitwise_identical(tmp_path, monkeypatch, method):
  """2 steps, stop, resume to 4 == 4 uninterrupted steps, the method's state included; Co-Tuning's
  prepare runs once per workdir (the resume reads prepared.npz)."""
  cls = methods.get(method)
  calls = []
  prepare = cls.prepare
  monkeypatch.setattr(cls, 'prepare', lambda self, *a: calls.append(1) or prepare(self, *a))
  full = tiny_config(method)
  train.run(full, str(tmp_path / 'full'))

  half = tiny_config(method)
  half.epochs = 1
  assert train.run(half, str(tmp_path / 'split'))['steps'] == 2
  computed = len(calls)                                            # once per fresh workdir
  calls.clear()
  assert train.run(full, str(tmp_path / 'split'))['steps'] == 4     # resumes at step 2

  a, b = checkpoint.load_state(tmp_path / 'full'), checkpoint.load_state(tmp_path / 'split')
  assert set(a['method']) == STATE[method]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'split' / 'metrics.jsonl')) if 'loss' in r]
  assert len(losses) == 4 and all(map(math.isfinite, losses))
  if method == 'co_tuning':
    assert (computed, calls) == (2, [])
    with np.load(tmp_path / 'split' / train.PREPARED) as cached:
      np.testing.assert_array_equal(b['method']['relationship'], cached['relationship'])
    np.testing.assert_allclose(b['method']['relationship'].sum(1), 1.0, rtol=1e-5)


def test_lwf_from_a_workdir_takes_its_head_as_the_source_head(tmp_path):
  """The negative-transfer benchmark's case: a source model trained in a stage, then LwF on the target;
  the source head is the stage's head, and LwF keeps it (tllib: not in the optimizer)."""
  train.run(tiny_config('erm'), str(tmp_path / 'source'))
  lwf = tiny_config('lwf', epochs=1)
  lwf.model.source_classes = 10
  lwf.pretrained.path = str(tmp_path / 'source')
  train.run(lwf, str(tmp_path / 'lwf'))
  source = checkpoint.load_variables(str(tmp_path / 'source'))['params']
  state = checkpoint.load_state(tmp_path / 'lwf')
  for params in (state['params'], state['method']['teacher']['params']):
    jax.tree.map(np.testing.assert_array_equal, params['source_head'], source['head'])
  jax.tree.map(np.testing.assert_array_equal, state['method']['teacher']['params']['backbone'],
               source['backbone'])


def test_recipes_keep_the_imagenet_classifier_for_methods_that_read_it():
  for method in METHODS + ('erm',):
    c = recipes.recipe(f'method={method},sr=15', data='cub200', num_classes=200)
    assert c.model.source_classes == (1000 if method in ('lwf', 'co_tuning') else 0), method
  no_source = tiny_config('co_tuning')
  no_source.model.source_classes = 0
  with pytest.raises(ValueError, match=r"source_classes=0: method 'co_tuning' uses the pre-trained classifier"):
    methods.get('co_tuning')(no_source, num_classes=10)
