"""LwF, Co-Tuning and Bi-Tuning: where the source head comes from (their resume is checked with every
method's in test_methods.py)."""
import jax
import numpy as np
import pytest

from concept_jax import checkpoint, methods, recipes, train
from tests.conftest import tiny_config

METHODS = ('lwf', 'co_tuning', 'bi_tuning')


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
