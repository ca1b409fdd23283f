"""Shapes, names, dtypes and BN behaviour of the ResNet backbones and the Classifier."""
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.models import conv, resnet
from concept_jax.models.classifier import Classifier
from concept_jax.models.projector import Projector

RNGS = {'params': jax.random.key(0), 'sample': jax.random.key(1)}

# torchvision's parameter counts (backbone + 1000-way fc), from its weight metadata.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope='module')
def tiny():
  model = Classifier(num_classes=5, depth=0, width=8, front_door=True, ib_dim=16, source_classes=7)
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  return model, images, jax.jit(model.init)(RNGS, images)  # jit: eager init compiles op by op


def test_tiny_outputs_shapes_and_dtypes(tiny):
  model, images, variables = tiny
  out = model.apply(variables, images, rngs={'sample': jax.random.key(3)})
  d = resnet.feature_dim(0, 8)
  assert out['feature_map'].shape == (2, 2, 2, d) and out['features'].shape == (2, d)
  assert out['logits'].shape == (2, 5) and out['ib_logits'].shape == (2, 5)
  assert out['mu'].shape == (2, 16) and out['std'].shape == (2, 16)
  assert out['source_logits'].shape == (2, 7)
  strides = {'stem': 4, 'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}
  assert set(out['stages']) == set(strides)
  for name, s in strides.items():
    assert out['stages'][name].shape[:3] == (2, 64 // s, 64 // s), name
  np.testing.assert_array_equal(out['stages']['layer4'], out['feature_map'])
  np.testing.assert_allclose(out['features'], out['feature_map'].mean(axis=(1, 2)), rtol=1e-6)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
  assert model.stride == 32 and model.feature_dim == d


def test_small_stem_keeps_resolution_until_layer2():
  model = Classifier(num_classes=5, depth=0, width=8, stem='small')
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0), 'sample': jax.random.key(1)}, x, train=False)
  out = model.apply(variables, x, train=False)
  strides = {'stem': 1, 'layer1': 1, 'layer2': 2, 'layer3': 4, 'layer4': 8}
  for name, s in strides.items():
    assert out['stages'][name].shape[:3] == (2, 32 // s, 32 // s), name
  assert model.stride == 8 and out['feature_map'].shape == (2, 4, 4, resnet.feature_dim(0, 8))
  assert variables['params']['backbone']['conv1']['kernel'].shape == (3, 3, 3, 8)
  with pytest.raises(ValueError, match="model.stem='cifar' is unknown"):
    resnet.stride('cifar')


def test_parameter_tree_names(tiny):
  _, _, variables = tiny
  params, stats = variables['params'], variables['batch_stats']
  assert set(params) == {'backbone', 'head', 'front_door', 'source_head'}
  assert set(stats) == {'backbone'}
  assert set(params['backbone']) == {'conv1', 'bn1', 'layer1_0', 'layer2_0', 'layer3_0', 'layer4_0'}
  assert set(params['backbone']['layer2_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'downsample_conv',
                                                 'downsample_bn'}
  assert set(params['front_door']) == {'pam', 'cam', 'ib'}
  assert params['backbone']['conv1']['kernel'].shape == (7, 7, 3, 8)
  assert 'bias' not in params['backbone']['conv1']
  assert set(stats['backbone']['bn1']) == {'mean', 'var'}
  # 'head': normal(0.01) kernel, zero bias.
  assert np.all(params['head']['bias'] == 0)
  assert 0.005 < float(np.std(params['head']['kernel'])) < 0.02


def test_heads_false_returns_backbone_only(tiny):
  model, images, variables = tiny
  out = model.apply(variables, images, heads=False)  # no 'sample' rng needed
  assert set(out) == {'feature_map', 'features', 'stages'}


def test_feature_heads_are_composed_under_their_names():
  model = Classifier(num_classes=5, depth=0, width=8, feature_heads=(('projector', Projector(6)),))
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = model.init(RNGS, images)
  d = resnet.feature_dim(0, 8)
  assert set(variables['params']) == {'backbone', 'head', 'projector'}
  kernel = variables['params']['projector']['dense']['kernel']
  assert kernel.shape == (d, 6) and 0 < float(np.abs(kernel).max()) <= 1 / np.sqrt(d)  # torch's init
  out = model.apply(variables, images)
  np.testing.assert_allclose(out['projector'], out['features'] @ kernel
                             + variables['params']['projector']['dense']['bias'], rtol=1e-5, atol=1e-6)
  assert 'projector' not in model.apply(variables, images, heads=False)


def _apply_capturing(model, variables, images, train, capture):
  """model.apply that also returns the outputs of the modules `capture(module)` selects, by path."""
  out, state = model.apply(variables, images, train=train, rngs={'sample': jax.random.key(3)},
                           mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=lambda module, _: capture(module))
  captured = {path[:-1]: value[0] for path, value in
              traverse_util.flatten_dict(state.get('intermediates', {})).items()}
  return out, state['batch_stats'], captured


def test_running_statistics_after_a_train_step(tiny):
  """Every BatchNorm: new = 0.9 old + 0.1 batch statistic (torch's momentum 0.1), where the variance is
  the biased batch variance. That is Flax's rule; torch's running_var takes the unbiased one, n / (n - 1)
  larger (n = B H W per channel; README's quirks table). The normalisation itself uses the biased
  variance in both."""
  model, images, variables = tiny
  rng = np.random.default_rng(0)
  old = jax.tree_util.tree_map_with_path(
      lambda path, v: (rng.uniform(0.5, 2.0, v.shape) if path[-1].key == 'var' else
                       rng.normal(0, 0.5, v.shape)).astype(np.float32), variables['batch_stats'])
  variables = {**variables, 'batch_stats': old}
  _, new, conv_out = _apply_capturing(model, variables, images, True, lambda m: isinstance(m, nn.Conv))
  new, old = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
  checked = set()
  for path, x in conv_out.items():      # a BatchNorm reads its conv's output: conv1 -> bn1, ...
    bn = path[:-1] + (path[-1].replace('conv', 'bn'),)
    if bn + ('mean',) not in new:
      continue                          # the front door's convolutions have no BatchNorm
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(new[bn + ('mean',)], 0.9 * old[bn + ('mean',)] + 0.1 * x.mean(0),
                               rtol=1e-5, atol=1e-6, err_msg=str(bn))
    np.testing.assert_allclose(new[bn + ('var',)], 0.9 * old[bn + ('var',)] + 0.1 * x.var(0),
                               rtol=1e-5, err_msg=str(bn))
    checked.add(bn)
  assert len(checked) == len(new) // 2 == 12     # every BatchNorm; layer4's map is 2x2, so n = 8
  # Evaluation reads the running statistics and leaves them alone.
  eval_out, kept, _ = _apply_capturing(model, variables, images, False, lambda m: False)
  jax.tree.map(np.testing.assert_array_equal, traverse_util.flatten_dict(kept), old)
  train_out, _, _ = _apply_capturing(model, variables, images, True, lambda m: False)
  assert not np.allclose(eval_out['features'], train_out['features'])


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  model, images, variables = tiny
  rngs = {'sample': jax.random.key(1)}
  out = model.clone(dtype=jnp.bfloat16).apply(variables, images, rngs=rngs)  # same parameter tree
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
  ref = model.apply(variables, images, rngs=rngs)
  for name in ('features', 'logits', 'ib_logits'):
    scale = float(np.abs(ref[name]).max())
    np.testing.assert_allclose(out[name], ref[name], atol=0.05 * scale, err_msg=name)


def test_missing_sample_rng_is_a_clear_error(tiny):
  model, images, variables = tiny
  with pytest.raises(ValueError, match="rngs={'sample'"):
    model.apply(variables, images)


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_full_depths_shapes_and_torchvision_param_counts(depth):
  model = Classifier(num_classes=10, depth=depth, source_classes=1000)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(RNGS, x), images)
  d = resnet.feature_dim(depth)
  assert d == (512 if depth < 50 else 2048)
  assert out['feature_map'].shape == (2, 7, 7, d) and out['logits'].shape == (2, 10)
  assert out['stages']['stem'].shape == (2, 56, 56, 64)
  params = variables['params']
  assert _count(params['backbone']) + _count(params['source_head']) == TORCHVISION_PARAMS[depth]
  kind, blocks = resnet.layout(depth)
  assert f'layer3_{blocks[2] - 1}' in params['backbone'] and f'layer3_{blocks[2]}' not in params['backbone']
  if kind == 'bottleneck':
    assert params['backbone']['layer1_0']['conv3']['kernel'].shape == (1, 1, 64, 256)
    # stride on the 3x3 conv (torchvision v1.5): layer2_0's conv1 keeps the resolution.
    assert params['backbone']['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)


def test_width_scales_channels():
  assert resnet.feature_dim(50, 16) == 512 and resnet.feature_dim(18, 16) == 128
  with pytest.raises(ValueError, match='Unsupported ResNet depth 20'):
    resnet.feature_dim(20)


def test_stem_max_pool_uses_torchs_windows(tiny):
  """The stem's pool is torch's MaxPool2d(3, 2, padding=1): output (i, j) is the max over the rows
  2i-1..2i+1 and columns 2j-1..2j+1 that exist. Flax's padding='SAME' would pad (0, 1) and shift every
  window by a pixel. (Its -inf padding cannot show: the pool reads ReLU outputs, never below 0.)"""
  model, images, variables = tiny
  out, _, captured = _apply_capturing(model, variables, images, False,
                                      lambda m: isinstance(m, nn.BatchNorm) and m.name == 'bn1')
  x = np.maximum(np.asarray(captured[('backbone', 'bn1')]), 0)     # (2, 32, 32, C) after the ReLU
  size = (x.shape[1] - 1) // 2 + 1
  expected = np.stack([np.stack([x[:, max(2 * i - 1, 0):2 * i + 2, max(2 * j - 1, 0):2 * j + 2].max((1, 2))
                                 for j in range(size)], 1) for i in range(size)], 1)
  np.testing.assert_array_equal(out['stages']['stem'], expected)


@pytest.mark.parametrize('shape,kernel,stride', [
    ((3, 2, 2, 5), 3, 1),    # a 16 px patch's layer4 through the small stem: the im2col path
    ((3, 4, 4, 5), 3, 2),    # the strided conv into it
    ((3, 3, 5, 5), 3, 2),    # not square
    ((3, 6, 6, 5), 7, 2),    # a 7x7 kernel
    ((3, 8, 8, 5), 3, 1)])   # a map as large as the kernel's output: lax's own convolution
def test_conv_on_small_maps_equals_lax_conv_with_its_gradients(shape, kernel, stride):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], 4))
  pad = ((kernel // 2,) * 2,) * 2
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w, (stride, stride), pad, dimension_numbers=numbers)))

  want, want_grads = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  got, got_grads = jax.value_and_grad(loss(conv.conv_general_dilated), (0, 1))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, h in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)
  small = (shape[1] + 2 * pad[0][0] - kernel) // stride + 1 < kernel
  hlo = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), pad,
                                                       dimension_numbers=numbers)).lower(x, w).as_text()
  assert ('convolution' in hlo) != small   # which path ran
