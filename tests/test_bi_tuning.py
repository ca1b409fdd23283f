"""Bi-Tuning: one step's losses and state against a numpy transcription of tllib's per-sample loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods
from concept_jax.methods import bi_tuning
from tests.conftest import tiny_config

B, C = 5, 4


def normalize(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_bi_tuning(z_q, z_k, h_q, h_k, kernel, bias, queue_z, queue_h, ptr, labels, t):
  """tllib's BiTuning.forward + KLDivLoss(batchmean) from the outputs of q and k.

  Queues in tllib's layout (dim, C, K); h_q, h_k raw pooled features. Returns (projector loss,
  classifier loss, queue_z, queue_h, ptr) after the step.
  """
  queue_z, queue_h, ptr = queue_z.copy(), queue_h.copy(), ptr.copy()
  k = queue_z.shape[2]
  hn_q = normalize(np.concatenate([h_q, np.ones((len(h_q), 1))], 1))
  hn_k = normalize(np.concatenate([h_k, np.ones((len(h_k), 1))], 1))
  queue_z_before = queue_z.copy()
  logits_z = []
  for i, c in enumerate(labels):
    pos = z_q[i] @ queue_z_before[:, c, :]
    neg = z_q[i] @ np.concatenate([queue_z_before[:, :c], queue_z_before[:, c + 1:]], 1).reshape(
        queue_z.shape[0], -1)
    logits_z.append(np.concatenate([[z_q[i] @ z_k[i]], pos, neg]))
    queue_h[:, c, ptr[c]], queue_z[:, c, ptr[c]] = hn_k[i], z_k[i]
    ptr[c] = (ptr[c] + 1) % k
  w = normalize(np.concatenate([kernel.T, bias[:, None]], 1))                # C x (D + 1)
  cur = hn_q @ w.T
  queue_y = (queue_h.reshape(queue_h.shape[0], -1).T @ w.T).reshape(C, k, C)  # after the writes
  logits_y = [np.concatenate([[cur[i, c]], queue_y[c, :, c],
                              np.concatenate([queue_y[:c, :, c], queue_y[c + 1:, :, c]]).ravel()])
              for i, c in enumerate(labels)]
  target = np.zeros(1 + C * k)
  target[:k + 1] = 1.0 / (k + 1)

  def kl(logits):
    logp = log_softmax(np.stack(logits) / t)
    return np.sum(np.where(target > 0, target * (np.log(np.maximum(target, 1e-30)) - logp), 0.0)) / len(labels)

  return kl(logits_z), kl(logits_y), queue_z, queue_h, ptr


@pytest.fixture(scope='module')
def step():
  config = tiny_config('bi_tuning')
  method = methods.get('bi_tuning')(config, num_classes=C)
  size = config.image_size
  variables = method.model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
  state = method.init_state(jax.random.key(1), variables)
  # The key encoder differs from q and the pointers are mid-queue, as after some steps.
  state['key_params'] = jax.tree.map(lambda p: p + 0.01, state['key_params'])
  state['queues']['ptr'] = jnp.array([0, 3, 1, 2], jnp.int32)
  images = jax.random.normal(jax.random.key(2), (B, 2, size, size, 3))
  labels = jnp.array([1, 3, 1, 0, 1])
  params = variables['params']
  loss_fn = lambda p: method.loss(p, variables['batch_stats'], state, images, labels, jax.random.key(3))
  (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return config, method, variables, state, images, labels, aux, grads


def test_losses_and_queues_match_tllib(step):
  config, method, variables, state, images, labels, (metrics, _, new_state), _ = step
  m = config.method
  key_params = jax.tree.map(lambda k, q: m.momentum * k + (1 - m.momentum) * q, state['key_params'],
                            variables['params'])
  run = lambda p, view: jax.device_get(method.apply(p, variables['batch_stats'], images[:, view],
                                                    jax.random.key(0), train=True)[0])
  q, k = run(variables['params'], 0), run(key_params, 1)
  to_tllib = lambda queue: np.asarray(queue).transpose(2, 0, 1)              # (C, K, d) -> (d, C, K)
  head = variables['params']['head']
  loss_z, loss_y, queue_z, queue_h, ptr = np_bi_tuning(
      normalize(q['projector']), normalize(k['projector']), q['features'], k['features'],
      np.asarray(head['kernel']), np.asarray(head['bias']), to_tllib(state['queues']['z']),
      to_tllib(state['queues']['h']), np.asarray(state['queues']['ptr']), np.asarray(labels),
      m.temperature)
  np.testing.assert_allclose(metrics['projector_contrast'], loss_z, rtol=1e-4)
  np.testing.assert_allclose(metrics['classifier_contrast'], loss_y, rtol=1e-4)
  np.testing.assert_allclose(to_tllib(new_state['queues']['z']), queue_z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(to_tllib(new_state['queues']['h']), queue_h, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(new_state['queues']['ptr'], ptr)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new_state['key_params'], key_params)


def test_gradients_reach_q_only(step):
  *_, grads = step
  for part in ('backbone', 'head', 'projector'):
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[part])), part


def test_classifier_contrast_gives_no_gradient_to_the_head():
  rng = np.random.default_rng(0)
  hn_q = normalize(rng.normal(size=(3, 6)))
  queue_h = normalize(rng.normal(size=(C, 2, 6)))
  head = {'kernel': rng.normal(size=(5, C)), 'bias': rng.normal(size=(C,))}
  g_head, g_hn = jax.grad(bi_tuning.classifier_contrastive_loss, argnums=(2, 0))(
      hn_q, queue_h, head, jnp.array([0, 2, 2]))
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_head))
  assert float(jnp.abs(g_hn).max()) > 0


def test_projector_is_a_composed_head_at_its_own_learning_rate(step):
  config, method, variables, *_ = step
  assert variables['params']['projector']['dense']['kernel'].shape == (
      method.model.feature_dim, config.method.projection_dim)
  assert method.optimizer_rules() == {'lr_mults': ((r'^projector/', 0.1),)}
  assert len(method.views) == 2
