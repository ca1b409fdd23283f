"""DELTA: the attention-weighted feature-map distance and the channel-ablation attention against numpy on
hand-built cases, the attention head's training against torch's SGD and the layers it reads (the
attention computed once per run and read back on resume: test_methods.py's resume test)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax import methods
from concept_jax.methods import delta
from tests.conftest import tiny_config


def test_layers_are_tllibs_return_layers():
  # tllib (resnet50): backbone.layer1.2.conv3, layer2.3.conv3, layer3.5.conv3, layer4.2.conv3.
  assert delta.delta_layers(50) == {'layer1': ('backbone', 'layer1_2', 'conv3'),
                                    'layer2': ('backbone', 'layer2_3', 'conv3'),
                                    'layer3': ('backbone', 'layer3_5', 'conv3'),
                                    'layer4': ('backbone', 'layer4_2', 'conv3')}
  assert delta.delta_layers(18)['layer3'] == ('backbone', 'layer3_1', 'conv2')


def test_attention_feature_distance_matches_numpy():
  rng = np.random.default_rng(0)
  shapes = {'layer1': (2, 4, 3, 5), 'layer2': (2, 2, 2, 7)}
  maps = {k: rng.normal(size=s) for k, s in shapes.items()}
  source = {k: rng.normal(size=s) for k, s in shapes.items()}
  attention = {k: rng.dirichlet(np.ones(s[-1])) for k, s in shapes.items()}
  expected = 0.0
  for k, (b, h, w, c) in shapes.items():          # tllib's loop, NCHW -> NHWC
    for i in range(b):
      for j in range(c):
        distance = np.linalg.norm(maps[k][i, :, :, j] - source[k][i, :, :, j])
        expected += 0.5 * c * attention[k][j] * distance ** 2 / (h * w)
  np.testing.assert_allclose(float(delta.attention_feature_distance(maps, source, attention)), expected,
                             rtol=1e-5)


def test_channel_attention_is_softmax_of_standardised_rise():
  rise = np.array([0.3, -0.1, 0.0, 1.2, 0.05])
  z = (rise - rise.mean()) / rise.std()
  expected = np.exp(z / 5) / np.exp(z / 5).sum()
  np.testing.assert_allclose(delta.channel_attention(rise), expected, rtol=1e-6)
  np.testing.assert_allclose(delta.channel_attention(np.full(4, 0.2)), np.full(4, 0.25))


def test_loss_rise_zeroes_one_output_channel_at_a_time():
  rng = np.random.default_rng(1)
  x, kernel = rng.normal(size=(6, 3)), rng.normal(size=(3, 4))
  params = {'layer': {'conv': {'kernel': jnp.asarray(kernel, jnp.float32)}}, 'other': jnp.ones(2)}
  loss_fn = lambda p, x: jnp.sum((x @ p['layer']['conv']['kernel']) ** 2) + jnp.sum(p['other'])
  rise = delta.loss_rise(loss_fn, params, ('layer', 'conv', 'kernel'), jnp.asarray(x, jnp.float32))
  expected = [np.sum((x @ np.where(np.arange(4) == j, 0.0, kernel)) ** 2) - np.sum((x @ kernel) ** 2)
              for j in range(4)]
  np.testing.assert_allclose(rise, expected, rtol=1e-4)


def test_attention_head_trains_like_torch_sgd_with_exponential_lr():
  torch = pytest.importorskip('torch', reason='the reference is torch.optim.SGD')
  rng = np.random.default_rng(2)
  features = rng.normal(size=(10, 6)).astype(np.float32)
  labels = rng.integers(0, 3, size=10)
  head = {'kernel': rng.normal(size=(6, 3)).astype(np.float32) * 0.1, 'bias': np.zeros(3, np.float32)}
  trained = delta.train_head(features, labels, head, np.random.default_rng(7), lr=0.5, epochs=3, batch_size=4,
                             lr_decay_epochs=2)

  linear = torch.nn.Linear(6, 3)
  with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(head['kernel'].T))
    linear.bias.copy_(torch.from_numpy(head['bias']))
  sgd = torch.optim.SGD(linear.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=0)
  schedule = torch.optim.lr_scheduler.ExponentialLR(sgd, gamma=math.exp(math.log(0.1) / 2))
  order_rng = np.random.default_rng(7)
  for _ in range(3):
    order = order_rng.permutation(10)
    for i in range(0, 10, 4):                        # batches of 4, 4, 2 (drop_last=False)
      batch = order[i:i + 4]
      sgd.zero_grad()
      torch.nn.functional.cross_entropy(linear(torch.from_numpy(features[batch])),
                                        torch.from_numpy(labels[batch])).backward()
      sgd.step()
    schedule.step()
  np.testing.assert_allclose(trained['kernel'], linear.weight.detach().numpy().T, atol=1e-5)
  np.testing.assert_allclose(trained['bias'], linear.bias.detach().numpy(), atol=1e-5)


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config('delta')
  method = methods.get('delta')(config, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = jax.device_get(method.model.init({'params': jax.random.key(1), 'sample': jax.random.key(1)}, x))
  return method, variables, x


def test_feature_maps_are_the_stage_convolutions(tiny):
  method, variables, x = tiny
  out, maps, stats = method.feature_maps(variables, x, jax.random.key(0), train=False)
  assert {k: v.shape for k, v in maps.items()} == {
      'layer1': (8, 8, 8, 8), 'layer2': (8, 4, 4, 16), 'layer3': (8, 2, 2, 32), 'layer4': (8, 1, 1, 64)}
  assert stats is variables['batch_stats'] and out['logits'].shape == (8, 10)
  # layer1_0 has no downsample: its output is relu(input + bn2(conv2's output)), bn2 in eval mode.
  bn2 = jax.tree.map(np.asarray, {**variables['params']['backbone']['layer1_0']['bn2'],
                                  **variables['batch_stats']['backbone']['layer1_0']['bn2']})
  residual = (maps['layer1'] - bn2['mean']) / np.sqrt(bn2['var'] + 1e-5) * bn2['scale'] + bn2['bias']
  np.testing.assert_allclose(np.maximum(out['stages']['stem'] + residual, 0), out['stages']['layer1'],
                             atol=1e-5)
  state = method.init_state(None, variables, {k: np.full(v.shape[-1], 1 / v.shape[-1], np.float32)
                                              for k, v in maps.items()})
  _, source_maps, _ = method.feature_maps(state['source'], x, jax.random.key(0), train=False, heads=False)
  assert float(delta.attention_feature_distance(maps, source_maps, state['attention'])) == 0.0


def test_prepare_gives_one_distribution_per_stage_deterministically(tiny):
  method, variables, x = tiny
  labels = np.arange(8) % 10
  batches = lambda: [(np.asarray(x[:5]), labels[:5]), (np.asarray(x[5:]), labels[5:])]
  attention = method.prepare(variables, batches())
  assert {k: v.shape for k, v in attention.items()} == {'layer1': (8,), 'layer2': (16,), 'layer3': (32,),
                                                         'layer4': (64,)}
  for a in attention.values():
    np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-5)
    assert np.all(a > 0) and a.std() > 0
  jax.tree.map(np.testing.assert_array_equal, method.prepare(variables, batches()), attention)
  with pytest.raises(ValueError, match="DELTA's channel attention for layer1 .* is missing"):
    method.init_state(None, variables, {})
