"""Front-door branch against plain numpy references (DANet PAM/CAM, information bottleneck)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.models import front_door as fd

B, H, W, D = 2, 3, 4, 16


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def pam_reference(f, p):
  """DANet PAM in torch layout (B, C, N), written from the paper's formulas."""
  b, h, w, d = f.shape
  x = f.reshape(b, h * w, d).transpose(0, 2, 1).astype(np.float64)  # (B, C, N)

  def conv(name):
    kernel = np.asarray(p[name]['kernel'], np.float64)[0, 0]  # (Cin, Cout)
    return np.einsum('bcn,co->bon', x, kernel) + np.asarray(p[name]['bias'])[None, :, None]

  q, k, v = conv('query_conv'), conv('key_conv'), conv('value_conv')
  attention = _softmax(np.einsum('bcn,bcm->bnm', q, k))  # (B, N, N), softmax over key positions m
  out = np.einsum('bcm,bnm->bcn', v, attention)  # torch: bmm(V, A^T)
  out = float(p['gamma'][0]) * out + x
  return out.transpose(0, 2, 1).reshape(b, h, w, d)


def cam_reference(f, gamma):
  b, h, w, d = f.shape
  x = f.reshape(b, h * w, d).transpose(0, 2, 1).astype(np.float64)  # (B, C, N)
  energy = x @ x.transpose(0, 2, 1)  # (B, C, C)
  energy = energy.max(axis=-1, keepdims=True) - energy
  out = _softmax(energy) @ x
  return (gamma * out + x).transpose(0, 2, 1).reshape(b, h, w, d)


@pytest.fixture(scope='module')
def f():
  return np.abs(np.random.default_rng(0).normal(size=(B, H, W, D))).astype(np.float32)  # post-ReLU


def test_pam_matches_numpy(f):
  module = fd.PositionAttention()
  params = module.init(jax.random.key(0), f)['params']
  assert params['query_conv']['kernel'].shape == (1, 1, D, D // 8)
  assert params['value_conv']['kernel'].shape == (1, 1, D, D)
  assert float(params['gamma'][0]) == 0.0
  params = {**params, 'gamma': jnp.array([0.7])}
  out = module.apply({'params': params}, f)
  np.testing.assert_allclose(out, pam_reference(f, params), rtol=1e-5, atol=1e-5)


def test_cam_matches_numpy_and_is_stable(f):
  module = fd.ChannelAttention()
  params = module.init(jax.random.key(0), f)['params']
  assert set(params) == {'gamma'} and float(params['gamma'][0]) == 0.0
  out = module.apply({'params': {'gamma': jnp.array([0.7])}}, f)
  np.testing.assert_allclose(out, cam_reference(f, 0.7), rtol=1e-5, atol=1e-5)
  # Energies in the thousands (real layer4 maps): the softmax must stay finite and exact.
  big = f * 30.0
  out = module.apply({'params': {'gamma': jnp.array([0.7])}}, big)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, cam_reference(big, 0.7), rtol=1e-4, atol=1e-3)


def test_bfloat16_input_attention_in_float32(f):
  out = fd.ChannelAttention().apply({'params': {'gamma': jnp.array([0.7])}}, jnp.asarray(f, jnp.bfloat16))
  assert out.dtype == jnp.float32
  ref = cam_reference(np.asarray(jnp.asarray(f, jnp.bfloat16), np.float32), 0.7)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def front_door(f):
  module = fd.FrontDoor(num_classes=5, ib_dim=6)
  variables = jax.jit(module.init)({'params': jax.random.key(0), 'sample': jax.random.key(1)}, f)
  return module, variables['params']


def test_da_is_2f_at_init_and_ib_formulas(f, front_door):
  module, params = front_door
  out = module.apply({'params': params}, f, rngs={'sample': jax.random.key(2)})
  enc = params['ib']['encoder']
  pooled = (2.0 * f).mean(axis=(1, 2))  # DA(f) = PAM(f) + CAM(f) = 2f while both gammas are 0
  stats = pooled @ np.asarray(enc['kernel']) + np.asarray(enc['bias'])
  mu, s = stats[:, :6], stats[:, 6:]
  np.testing.assert_allclose(out['mu'], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['std'], np.log1p(np.exp(s - 5.0)), rtol=1e-5, atol=1e-7)
  assert out['ib_logits'].shape == (B, 5) and out['mu'].shape == (B, 6) and out['std'].shape == (B, 6)


def test_ib_sampling_is_reparametrised_noise():
  """With an identity decoder the IB logits are z itself: (z - mu) / std must be N(0, 1)."""
  module = fd.InformationBottleneck(num_classes=64, ib_dim=64)
  x = np.random.default_rng(1).normal(size=(256, 1, 1, 8)).astype(np.float32)
  params = jax.jit(module.init)({'params': jax.random.key(0), 'sample': jax.random.key(1)}, x)['params']
  params['decoder'] = {'kernel': jnp.eye(64), 'bias': jnp.zeros(64)}
  params['encoder']['bias'] = params['encoder']['bias'].at[64:].add(6.0)  # s - 5 near 1: std near softplus(1)
  out = module.apply({'params': params}, x, rngs={'sample': jax.random.key(5)})
  eps = (np.asarray(out['ib_logits']) - np.asarray(out['mu'])) / np.asarray(out['std'])
  assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1.0) < 0.02
  again = module.apply({'params': params}, x, rngs={'sample': jax.random.key(5)})
  other = module.apply({'params': params}, x, rngs={'sample': jax.random.key(6)})
  np.testing.assert_array_equal(out['ib_logits'], again['ib_logits'])
  assert not np.allclose(out['ib_logits'], other['ib_logits'])


def test_torch_default_init_bounds(front_door):
  _, params = front_door
  for layer, fan_in in [(params['pam']['query_conv'], D), (params['pam']['value_conv'], D),
                        (params['ib']['encoder'], D), (params['ib']['decoder'], 6)]:
    bound = 1.0 / np.sqrt(fan_in)
    for leaf in (layer['kernel'], layer['bias']):
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound


def test_missing_sample_rng(f, front_door):
  module, params = front_door
  with pytest.raises(ValueError, match='sample'):
    module.apply({'params': params}, f)
