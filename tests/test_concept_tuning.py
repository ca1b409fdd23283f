"""Concept-Tuning as a method: where gradients go, what state changes, and a short run that learns."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from concept_jax import methods, train
from concept_jax.concepts import losses, momentum, queues
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


def test_contrast_warmup_ramps_both_contrastive_weights_up_from_zero(setup):
  _, _, variables, official_state, images, labels = setup
  assert 'step' not in official_state  # the official state (no warm-up) has no clock
  config = tiny_config('concept_tuning')
  config.method.update(contrast_warmup=4, trade_off=0.5, beta=2.0)
  method = methods.get('concept_tuning')(config, num_classes=10)
  state = method.init_state(jax.random.key(2), variables)
  assert int(state['step']) == 0
  loss = jax.jit(method.loss)
  m = config.method
  for step, ramp in ((0, 0.0), (2, 0.5), (4, 1.0), (7, 1.0)):
    state['step'] = jnp.int32(step)
    total, (metrics, _, new_state) = loss(variables['params'], variables['batch_stats'], state,
                                          images, labels, jax.random.key(4))
    assert metrics['image_contrast'] > 0 and metrics['concept_contrast'] > 0  # the ramp is visible
    expected = (metrics['ce'] + ramp * (m.trade_off * metrics['image_contrast']
                                        + m.beta * metrics['concept_contrast'])
                + m.ib_weight * metrics['ib_ce'] + m.infow * metrics['kl'])
    np.testing.assert_allclose(total, expected, rtol=1e-5, err_msg=f'step {step}')
    assert int(new_state['step']) == step + 1


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


# ---------------------------------------------------------------------------------------------------
# How the loss composes its terms (spec section 3 and 6): the weights, and the view each encoder reads.

TERMS = ('ce', 'image_contrast', 'concept_contrast', 'ib_ce', 'kl')
# Distinct weights, none 1: a dropped, swapped or unweighted term changes the total.
WEIGHTS = {'image_contrast': ('trade_off', 0.5), 'concept_contrast': ('beta', 2.0),
           'ib_ce': ('ib_weight', 0.25), 'kl': ('infow', 3.0)}


def _weighted_method():
  config = tiny_config('concept_tuning')
  # eps 0.1 keeps the OT top entries apart, so the two compiled programs below select the same ones
  # (the concept loss at the recipes' eps 0.01 is checked in test_concepts_losses).
  config.method.sinkhorn_eps = 0.1
  # Without type checks config.method can hold traced weights (see _loss_and_grads).
  config.method = ml_collections.ConfigDict(config.method.to_dict(), type_safe=False)
  return methods.get('concept_tuning')(config, num_classes=10)


def _picked(params):
  """The leaves whose gradients are compared: every term reaches at least one of them (the concept
  term only the backbone, through the patch passes; the head runs under stop_gradient there)."""
  return {'head': params['head'], 'front_door': params['front_door'],
          'layer4_0/bn2': params['backbone']['layer4_0']['bn2']}


def _loss_and_grads(method):
  """jit of method.loss -> (total, metrics, new state, gradients of the picked leaves), with the four
  weights as an argument: one compilation serves every setting (compiling is the cost)."""
  m = method.config.method

  def f(weights, params, batch_stats, state, images, labels, rng):
    saved = {name: m[name] for name in weights}
    m.update(weights)          # read by method.loss while it is traced
    try:
      (total, (metrics, _, new_state)), grads = jax.value_and_grad(method.loss, has_aux=True)(
          params, batch_stats, state, images, labels, rng)
    finally:
      m.update(saved)
    return total, metrics, new_state, _picked(grads)
  return jax.jit(f)


def reference_terms(method, params, batch_stats, state, images, labels, rng):
  """The five terms in TERMS' order, composed from the spec (section 3) with the separately tested pieces."""
  m = method.config.method
  # method.loss's use of rng: q's IB noise first, the positive draws last; the passes in between
  # draw IB noise that no term reads (the key encoder's IB head), as `unread` does here.
  r_q, *_, r_pos = jax.random.split(rng, 7)
  unread = jax.random.key(99)
  out, _ = method.model.apply({'params': params, 'batch_stats': batch_stats}, images[:, 0],  # 1. q, view 0
                              train=True, mutable=['batch_stats'], rngs={'sample': r_q})
  key_before = state['key_params']
  _, boxes_q, confusing = method.concepts(key_before, batch_stats, images[:, 2], labels, unread)  # 2.
  zq_p = method.patch_embeddings(params, batch_stats, images[:, 2], boxes_q, unread)           # 3.
  key_after = jax.lax.stop_gradient(momentum.ema_update(key_before, params, m.momentum))      # 4.
  z_k, _, _ = method.concepts(key_after, batch_stats, images[:, 1], labels, unread)            # 5.
  _, boxes_k, _ = method.concepts(key_after, batch_stats, images[:, 3], labels, unread)
  zk_p = method.patch_embeddings(key_after, batch_stats, images[:, 3], boxes_k, unread)
  q = state['queues']
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jnp.stack([
      ce(out['logits']),
      losses.image_contrastive_loss(queues.l2_normalise(out['logits']), z_k, q['z'], labels,
                                    m.temperature),
      losses.concept_contrastive_loss(zq_p, zk_p, q['h'], labels, confusing, r_pos,
                                      m.temperature, top_pos=m.top_pos, top_neg=m.top_neg,
                                      eps=m.sinkhorn_eps, thresh=m.sinkhorn_thresh,
                                      max_iter=m.sinkhorn_iters),
      ce(out['ib_logits']),
      losses.ib_kl(out['mu'], out['std'], scale=m.kl_scale)])


@pytest.fixture(scope='module')
def composed(setup):
  """Reference terms and their gradients, and method.loss with the WEIGHTS, on four distinct views."""
  _, _, variables, state, images, labels = setup
  method = _weighted_method()
  weights = {name: value for name, value in WEIGHTS.values()}
  params, batch_stats = variables['params'], variables['batch_stats']
  rng = jax.random.key(4)

  def terms(picked):
    p = jax.tree.map(lambda x: x, params)      # a copy of the dict tree, to put the picked leaves in
    p['head'], p['front_door'] = picked['head'], picked['front_door']
    p['backbone']['layer4_0']['bn2'] = picked['layer4_0/bn2']
    return reference_terms(method, p, batch_stats, state, images, labels, rng)

  ref, jac = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(_picked(params))
  run = _loss_and_grads(method)
  return {'ref': dict(zip(TERMS, ref)), 'jac': {t: jax.tree.map(lambda g, i=i: g[i], jac)
                                                for i, t in enumerate(TERMS)},
          'run': run, 'weights': weights, 'args': (params, batch_stats, state, images, labels, rng),
          'full': run(weights, params, batch_stats, state, images, labels, rng)}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_close(got, expected, what):
  """Trees equal up to 1e-4 of expected's largest entry, which must not be 0 (the check can fail)."""
  got, expected = _flat(got), _flat(expected)
  scale = np.abs(expected).max()
  assert scale > 0, what
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale, err_msg=what)


def test_loss_is_the_documented_weighted_sum_of_its_terms(composed):
  total, metrics, _, grads = composed['full']
  ref, jac = composed['ref'], composed['jac']
  for term in TERMS:   # each logged term is the piece computed on its own
    np.testing.assert_allclose(metrics[term], ref[term], rtol=1e-5, err_msg=term)
  # CE + trade_off image + beta concept + ib_weight IB CE + infow KL
  weights = {'ce': 1.0, **{term: w for term, (_, w) in WEIGHTS.items()}}
  np.testing.assert_allclose(total, sum(weights[t] * ref[t] for t in TERMS), rtol=1e-5)
  expected = jax.tree.map(lambda *g: sum(weights[t] * x for t, x in zip(TERMS, g)),
                          *[jac[t] for t in TERMS])
  _assert_close(grads, expected, 'gradient of the total')


@pytest.mark.parametrize('term', list(WEIGHTS))
def test_a_weight_at_zero_removes_exactly_its_terms_gradient(composed, term):
  name, weight = WEIGHTS[term]
  total, metrics, _, grads = composed['run'](dict(composed['weights'], **{name: 0.0}), *composed['args'])
  full_total, _, _, full_grads = composed['full']
  np.testing.assert_allclose(metrics[term], composed['ref'][term], rtol=1e-5)  # still computed, logged
  np.testing.assert_allclose(full_total - total, weight * composed['ref'][term], rtol=1e-4, atol=1e-6)
  _assert_close(jax.tree.map(lambda a, b: a - b, full_grads, grads),
                jax.tree.map(lambda g: weight * g, composed['jac'][term]), f'{name}=0')


# Which terms and queues read each view (spec section 3): q reads view 0; the pre-EMA key encoder's
# concept search (boxes, confusing classes) and q's patch passes view 2; the key z_k view 1; the key
# encoder's boxes and patch embeddings, which are enqueued, view 3.
READS = {0: ({'ce', 'image_contrast', 'ib_ce', 'kl'}, set()),
         1: ({'image_contrast'}, {'z'}),
         2: ({'concept_contrast'}, set()),
         3: ({'concept_contrast'}, {'h'})}


@pytest.mark.parametrize('view', sorted(READS))
def test_each_encoder_reads_the_view_the_spec_says(composed, view):
  """Replacing one view changes exactly the terms (and enqueued keys) that read it."""
  params, batch_stats, state, images, labels, rng = composed['args']
  new_view = jax.random.normal(jax.random.key(10 + view), images[:, view].shape)
  _, metrics, new_state, _ = composed['run'](composed['weights'], params, batch_stats, state,
                                             images.at[:, view].set(new_view), labels, rng)
  _, base, base_state, _ = composed['full']
  terms, written = READS[view]
  for term in TERMS:
    if term in terms:
      assert abs(metrics[term] - base[term]) > 1e-3 * abs(base[term]), (view, term)
    else:
      np.testing.assert_allclose(metrics[term], base[term], rtol=1e-6, err_msg=f'{view} {term}')
  for queue in ('z', 'h'):
    same = np.array_equal(new_state['queues'][queue], base_state['queues'][queue])
    assert same == (queue not in written), (view, queue)
