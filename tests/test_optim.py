"""The optimizer against torch's formulas: schedules, lr multipliers, SGD-Nesterov with coupled decay."""
import math

import jax
import jax.numpy as jnp
from flax import traverse_util
import ml_collections
import numpy as np
import optax
import pytest

from concept_jax import optim


def _config(schedule='multistep', milestones=(2, 4), lr_mults=((r'^backbone/', 0.1),), epochs=6):
  return ml_collections.ConfigDict(dict(
      epochs=epochs,
      optim=dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, no_weight_decay=(),
                 schedule=schedule, milestones=milestones, gamma=0.1, lr_mults=lr_mults)))


def test_multistep_matches_torch_multisteplr():
  lr = optim.schedule(_config(), iters_per_epoch=10)
  for step in range(60):
    epoch = step // 10
    expected = 0.01 * 0.1 ** sum(epoch >= m for m in (2, 4))
    assert float(lr(step)) == pytest.approx(expected, rel=1e-6)


def test_cosine_matches_torch_cosineannealinglr():
  lr = optim.schedule(_config('cosine', ()), iters_per_epoch=5)
  for step in range(30):
    expected = 0.01 * (1 + math.cos(math.pi * (step // 5) / 6)) / 2
    assert float(lr(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match="schedule='linear'"):
    optim.schedule(_config('linear'), 10)(0)


def test_multipliers_by_path():
  params = {'backbone': {'conv1': {'kernel': 0.}}, 'head': {'kernel': 0.}}
  mults = optim.tree_by_pattern(params, ((r'^backbone/', 0.1),), 1.0)
  assert mults == {'backbone': {'conv1': {'kernel': 0.1}}, 'head': {'kernel': 1.0}}


def _torch_sgd_reference(params, grads_seq, lrs, mults, wd=5e-4, momentum=0.9):
  """torch.optim.SGD(nesterov=True) step by step in numpy, one lr per parameter group."""
  params = {k: v.copy() for k, v in params.items()}
  wd = wd if isinstance(wd, dict) else dict.fromkeys(params, wd)   # per-group decay, like torch's groups
  bufs = {}
  for grads, lr in zip(grads_seq, lrs):
    for k in params:
      g = grads[k] + wd[k] * params[k]
      bufs[k] = g.copy() if k not in bufs else momentum * bufs[k] + g
      g = g + momentum * bufs[k]
      params[k] = params[k] - lr * mults[k] * g
  return params


def test_sgd_matches_torch_update_rule():
  rng = np.random.default_rng(0)
  # Leaves named like the model's ('backbone/...' matches the 0.1x pattern, 'head/...' does not).
  params = {'backbone/kernel': rng.normal(size=(3, 4)).astype(np.float32),
            'head/kernel': rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(25)]
  config = _config(milestones=(1, 2), epochs=3)
  tx, lr = optim.make_optimizer(config, params, iters_per_epoch=10)
  state, p = tx.init(params), jax.tree.map(jnp.asarray, params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  expected = _torch_sgd_reference(params, grads_seq, [float(lr(s)) for s in range(25)],
                                  {'backbone/kernel': 0.1, 'head/kernel': 1.0})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-6)


def test_no_weight_decay_patterns_rules_and_a_zero_multiplier():
  """Decay exemptions by pattern, a frozen parameter (multiplier 0) and a method's rules matched first,
  against torch's update with one parameter group per distinct (lr multiplier, weight decay)."""
  rng = np.random.default_rng(2)
  shapes = {'backbone/conv1/kernel': (3, 3, 2, 4), 'backbone/bn1/scale': (4,), 'backbone/bn1/bias': (4,),
            'backbone/layer1_0/conv1/kernel': (3, 3, 4, 4), 'head/kernel': (4, 5), 'head/bias': (5,)}
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  grads_seq = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(8)]
  config = _config(lr_mults=((r'^backbone/conv1/', 0.0), (r'^backbone/', 0.1)))
  config.optim.no_weight_decay = (r'/bn\d*/', r'/bias$')
  # A method's rules come first: 0.5 for layer1 although config's '^backbone/' (0.1) matches it too.
  rules = {'lr_mults': ((r'^backbone/layer1_', 0.5),), 'no_weight_decay': (r'^head/kernel$',)}
  mults = {'backbone/conv1/kernel': 0.0, 'backbone/bn1/scale': 0.1, 'backbone/bn1/bias': 0.1,
           'backbone/layer1_0/conv1/kernel': 0.5, 'head/kernel': 1.0, 'head/bias': 1.0}
  decay = {k: 5e-4 if k in ('backbone/conv1/kernel', 'backbone/layer1_0/conv1/kernel') else 0.0
           for k in shapes}
  tx, lr = optim.make_optimizer(config, params, iters_per_epoch=3, rules=rules)
  update = jax.jit(tx.update)
  state, p = tx.init(params), params
  for grads in grads_seq:
    updates, state = update(traverse_util.unflatten_dict(grads, sep='/'), state, p)
    p = optax.apply_updates(p, updates)
  got = traverse_util.flatten_dict(p, sep='/')
  expected = _torch_sgd_reference(flat, grads_seq, [float(lr(s)) for s in range(8)], mults, wd=decay)
  for k in shapes:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(got['backbone/conv1/kernel'], flat['backbone/conv1/kernel'])  # frozen


def test_sgd_matches_torch_itself():
  torch = pytest.importorskip('torch', reason='torch is an optional extra (pip install torch==2.13.0)')
  rng = np.random.default_rng(1)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  grads = [(rng.normal(size=w0.shape).astype(np.float32), rng.normal(size=b0.shape).astype(np.float32))
           for _ in range(12)]
  tw, tb = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
  opt = torch.optim.SGD([{'params': [tw], 'lr': 0.001}, {'params': [tb], 'lr': 0.01}], lr=0.01,
                        momentum=0.9, weight_decay=5e-4, nesterov=True)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
  config = _config(milestones=(1,), epochs=2)
  params = {'backbone': {'w': jnp.asarray(w0)}, 'head': {'b': jnp.asarray(b0)}}
  tx, _ = optim.make_optimizer(config, params, iters_per_epoch=6)
  state = tx.init(params)
  for i, (gw, gb) in enumerate(grads):
    tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
    opt.step()
    if (i + 1) % 6 == 0:
      sched.step()
    updates, state = tx.update({'backbone': {'w': gw}, 'head': {'b': gb}}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params['backbone']['w']), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params['head']['b']), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
