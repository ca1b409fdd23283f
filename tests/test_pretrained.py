"""Weight conversion (torchvision / timm safetensors / MoCo), strict merge, and file checks.

The parity tests build a torch ResNet here, with torchvision's module names (torchvision itself is
not imported), give it random weights and BN statistics, save it, convert it and compare stage
outputs and logits in eval mode. They need torch; everything else runs without it.
"""
import hashlib
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from concept_jax import pretrained
from concept_jax.models import resnet
from concept_jax.models.classifier import Classifier

WIDTH, SOURCE_CLASSES, IMAGE = 8, 10, 64


def torchvision_state_dict(depth, width=WIDTH, num_classes=SOURCE_CLASSES, seed=0):
  """Random float32 numpy arrays under torchvision's ResNet state-dict names (plus num_batches_tracked)."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, cin, cout, k):
    state[f'{name}.weight'] = (rng.normal(size=(cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(
        np.float32)

  def bn(name, c):
    state[f'{name}.weight'] = rng.uniform(0.3, 1.0, c).astype(np.float32)
    state[f'{name}.bias'] = rng.normal(0, 0.2, c).astype(np.float32)
    state[f'{name}.running_mean'] = rng.normal(0, 0.2, c).astype(np.float32)
    state[f'{name}.running_var'] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    state[f'{name}.num_batches_tracked'] = np.array(7, np.int64)

  kind, blocks = resnet.layout(depth)
  expansion = 1 if kind == 'basic' else 4
  conv('conv1', 3, width, 7)
  bn('bn1', width)
  cin = width
  for stage, count in enumerate(blocks):
    planes = width * 2**stage
    for i in range(count):
      p = f'layer{stage + 1}.{i}'
      if kind == 'basic':
        conv(f'{p}.conv1', cin, planes, 3), bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3), bn(f'{p}.bn2', planes)
      else:
        conv(f'{p}.conv1', cin, planes, 1), bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3), bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', planes, planes * expansion, 1), bn(f'{p}.bn3', planes * expansion)
      if i == 0 and (stage > 0 or cin != planes * expansion):
        conv(f'{p}.downsample.0', cin, planes * expansion, 1), bn(f'{p}.downsample.1', planes * expansion)
      cin = planes * expansion
  state['fc.weight'] = (rng.normal(size=(num_classes, cin)) / np.sqrt(cin)).astype(np.float32)
  state['fc.bias'] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return state


def torch_resnet(depth, width=WIDTH, num_classes=SOURCE_CLASSES):
  """A torch ResNet with torchvision's structure and module names (BasicBlock / Bottleneck v1.5)."""
  torch = pytest.importorskip('torch', reason='torch is optional; the parity tests need it')
  tnn = torch.nn

  class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.relu = tnn.ReLU()
      self.downsample = downsample

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes * 4)
      self.relu = tnn.ReLU()
      self.downsample = downsample

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(tnn.Module):

    def __init__(self):
      super().__init__()
      kind, blocks = resnet.layout(depth)
      block = BasicBlock if kind == 'basic' else Bottleneck
      self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      self.relu = tnn.ReLU()
      self.maxpool = tnn.MaxPool2d(3, 2, 1)
      cin = width
      for stage, count in enumerate(blocks):
        planes, stride, layers = width * 2**stage, (1 if stage == 0 else 2), []
        for i in range(count):
          s = stride if i == 0 else 1
          downsample = None
          if s != 1 or cin != planes * block.expansion:
            downsample = tnn.Sequential(tnn.Conv2d(cin, planes * block.expansion, 1, s, bias=False),
                                        tnn.BatchNorm2d(planes * block.expansion))
          layers.append(block(cin, planes, s, downsample))
          cin = planes * block.expansion
        setattr(self, f'layer{stage + 1}', tnn.Sequential(*layers))
      self.avgpool = tnn.AdaptiveAvgPool2d(1)
      self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
      out = {'stem': self.maxpool(self.relu(self.bn1(self.conv1(x))))}
      x = out['stem']
      for i in range(1, 5):
        x = out[f'layer{i}'] = getattr(self, f'layer{i}')(x)
      out['features'] = torch.flatten(self.avgpool(x), 1)
      out['logits'] = self.fc(out['features'])
      return out

  return torch, ResNet().eval()


def _init_zeros(model, image_size=IMAGE):
  """Cheap stand-in for model.init: zeros of the right shapes (merge only needs shapes and dtypes)."""
  shapes = jax.eval_shape(model.init, {'params': jax.random.key(0), 'sample': jax.random.key(1)},
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _relative_error(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---------------------------------------------------------------------------------------------------
# Parity with torch.

@pytest.mark.parametrize('depth', [18, 50])
def test_parity_with_torch_reference(depth, tmp_path):
  torch, net = torch_resnet(depth)
  state = torchvision_state_dict(depth)
  expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  assert {k: v.shape for k, v in state.items()} == expected  # the generator writes torchvision's names
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  images = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in net(torch.from_numpy(images.transpose(0, 3, 1, 2))).items()}

  torch.save(net.state_dict(), tmp_path / 'weights.pth')
  save_file(state, str(tmp_path / 'model.safetensors'))
  from_pth = pretrained.load(str(tmp_path / 'weights.pth'))
  from_st = pretrained.load(str(tmp_path / 'model.safetensors'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_st)

  model = Classifier(num_classes=3, depth=depth, width=WIDTH, source_classes=SOURCE_CLASSES)
  variables = pretrained.merge(_init_zeros(model), from_pth)
  out = jax.jit(model.apply)(variables, images)
  for name in ('stem', 'layer1', 'layer2', 'layer3', 'layer4'):
    assert _relative_error(out['stages'][name], ref[name].transpose(0, 2, 3, 1)) < 1e-4, name
  assert _relative_error(out['features'], ref['features']) < 1e-4
  assert _relative_error(out['source_logits'], ref['logits']) < 1e-4


def test_train_mode_parity_with_torch():
  """A fine-tuning step's pass: batch statistics, the gradient of every parameter, running statistics.

  The running variance differs by design: torch updates it with the unbiased batch variance, Flax with
  the biased one (README's quirks table), so Flax's 0.1 share is torch's times (n - 1) / n.
  """
  torch, net = torch_resnet(0)
  state = torchvision_state_dict(0)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  net.train()
  rng = np.random.default_rng(2)
  images = rng.normal(size=(4, IMAGE, IMAGE, 3)).astype(np.float32)
  weights = rng.normal(size=(4, SOURCE_CLASSES)).astype(np.float32)   # loss = sum(weights * logits)
  counts = {}                                                          # BN name -> values per channel

  def count(name):
    def hook(module, inputs, output):
      del module, output
      counts[name] = inputs[0][:, 0].numel()
    return hook

  for name, module in net.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.register_forward_hook(count(name))
  ref = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  (ref['logits'] * torch.from_numpy(weights)).sum().backward()
  ref_grads = pretrained.convert('grads', {k: p.grad.numpy() for k, p in net.named_parameters()})
  ref_stats = pretrained.convert('stats', {k: v.numpy() for k, v in net.state_dict().items()})

  model = Classifier(num_classes=3, depth=0, width=WIDTH, source_classes=SOURCE_CLASSES)
  variables = pretrained.merge(_init_zeros(model), pretrained.convert('x', state))

  def loss(params):
    out, mutated = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                               train=True, mutable=['batch_stats'])
    return jnp.sum(out['source_logits'] * weights), (out, mutated['batch_stats'])

  (_, (out, new_stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  for name in ('stem', 'layer1', 'layer2', 'layer3', 'layer4'):
    assert _relative_error(out['stages'][name], ref[name].detach().numpy().transpose(0, 2, 3, 1)) < 1e-4
  flat_grads = traverse_util.flatten_dict(grads, sep='/')
  for path, expected in traverse_util.flatten_dict(ref_grads['params'], sep='/').items():
    assert _relative_error(flat_grads[path], expected) < 1e-4, path
  old = traverse_util.flatten_dict(variables['batch_stats']['backbone'])
  new = traverse_util.flatten_dict(new_stats['backbone'])
  for path, torch_value in traverse_util.flatten_dict(ref_stats['batch_stats']['backbone']).items():
    if path[-1] == 'mean':
      np.testing.assert_allclose(new[path], torch_value, rtol=1e-5, atol=1e-6, err_msg=str(path))
    else:
      n = counts['.'.join(path[:-1]).replace('_', '.').replace('downsample.bn', 'downsample.1')]
      np.testing.assert_allclose(new[path] - 0.9 * old[path], (torch_value - 0.9 * old[path]) * (n - 1) / n,
                                 rtol=1e-4, err_msg=str(path))
  assert min(counts.values()) == 4 * 2 * 2           # layer4: (n - 1) / n = 15 / 16 is far from 1


# ---------------------------------------------------------------------------------------------------
# Conversion and merge (no torch needed).

def test_conversion_layout():
  state = torchvision_state_dict(50)
  # torchvision's kernels are square; non-square ones make a swap of height and width fail here.
  rng = np.random.default_rng(5)
  state['conv1.weight'] = rng.normal(size=(WIDTH, 3, 7, 5)).astype(np.float32)
  state['layer2.0.conv2.weight'] = rng.normal(size=(2 * WIDTH, 2 * WIDTH, 3, 1)).astype(np.float32)
  loaded = pretrained.convert('x', state)
  backbone, stats = loaded['params']['backbone'], loaded['batch_stats']['backbone']
  for torch_name, kernel in (('conv1.weight', backbone['conv1']['kernel']),
                             ('layer2.0.conv2.weight', backbone['layer2_0']['conv2']['kernel']),
                             ('layer2.0.downsample.0.weight', backbone['layer2_0']['downsample_conv']['kernel'])):
    weight = state[torch_name]
    o, i, h, w = np.indices(weight.shape)
    assert kernel.shape == weight.shape[2:] + weight.shape[1::-1], torch_name     # OIHW -> HWIO
    np.testing.assert_array_equal(kernel[h, w, i, o], weight, err_msg=torch_name)
  np.testing.assert_array_equal(loaded['params']['source_head']['kernel'].T, state['fc.weight'])
  np.testing.assert_array_equal(loaded['params']['source_head']['bias'], state['fc.bias'])
  bn, bn_stats = backbone['layer2_0']['downsample_bn'], stats['layer2_0']['downsample_bn']
  assert set(bn) == {'scale', 'bias'} and set(bn_stats) == {'mean', 'var'}
  for leaf, torch_leaf in (('scale', 'weight'), ('bias', 'bias')):
    np.testing.assert_array_equal(bn[leaf], state[f'layer2.0.downsample.1.{torch_leaf}'])
  for leaf in ('mean', 'var'):
    np.testing.assert_array_equal(bn_stats[leaf], state[f'layer2.0.downsample.1.running_{leaf}'])
  assert 'num_batches_tracked' not in str(jax.tree_util.tree_structure(loaded))


def test_merge_loads_backbone_keeps_head_and_reports():
  model = Classifier(num_classes=3, depth=18, width=WIDTH, front_door=True, ib_dim=8, source_classes=10)
  init = _init_zeros(model)
  init['params']['head']['kernel'] = np.full_like(init['params']['head']['kernel'], 0.5)
  loaded = pretrained.convert('x', torchvision_state_dict(18))
  merged, report = pretrained.merge_with_report(init, loaded)
  np.testing.assert_array_equal(merged['params']['head']['kernel'], 0.5)
  np.testing.assert_array_equal(merged['params']['backbone']['conv1']['kernel'],
                                loaded['params']['backbone']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['batch_stats']['backbone']['bn1']['var'],
                                loaded['batch_stats']['backbone']['bn1']['var'])
  np.testing.assert_array_equal(merged['params']['source_head']['bias'], loaded['params']['source_head']['bias'])
  assert 'params/head/kernel' in report.reinitialised
  assert 'params/front_door/pam/gamma' in report.reinitialised
  assert not report.dropped
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(init)

  # A model without a source head drops the checkpoint's fc and says so.
  no_source = _init_zeros(Classifier(num_classes=3, depth=18, width=WIDTH))
  _, report = pretrained.merge_with_report(no_source, loaded)
  assert sorted(report.dropped) == ['params/source_head/bias', 'params/source_head/kernel']


def test_strict_merge_lists_every_problem():
  loaded = pretrained.convert('x', torchvision_state_dict(18))
  # Wrong depth: every extra block of ResNet-18 is listed as unexpected.
  with pytest.raises(ValueError) as e:
    pretrained.merge(_init_zeros(Classifier(num_classes=3, depth=0, width=WIDTH)), loaded)
  message = str(e.value)
  assert 'Unexpected in the checkpoint' in message and 'params/backbone/layer1_1/conv1/kernel' in message
  assert 'batch_stats/backbone/layer4_1/bn2/var' in message and 'Hint' in message
  # Wrong width: shape mismatches with both shapes.
  with pytest.raises(ValueError) as e:
    pretrained.merge(_init_zeros(Classifier(num_classes=3, depth=18, width=16)), loaded)
  assert 'params/backbone/conv1/kernel: checkpoint (7, 7, 3, 8) vs model (7, 7, 3, 16)' in str(e.value)
  # Missing names.
  del loaded['params']['backbone']['layer3_1']['bn1']
  with pytest.raises(ValueError) as e:
    pretrained.merge(_init_zeros(Classifier(num_classes=3, depth=18, width=WIDTH)), loaded)
  assert 'Missing from the checkpoint (2)' in str(e.value)
  assert 'params/backbone/layer3_1/bn1/scale' in str(e.value)


def _moco_state(depth=18, mlp=True):
  state = torchvision_state_dict(depth)
  del state['fc.weight'], state['fc.bias']
  rng = np.random.default_rng(3)
  if mlp:  # MoCo v2 projection: Linear, ReLU, Linear
    fc = {'fc.0.weight': rng.normal(size=(64, 64)), 'fc.0.bias': np.zeros(64),
          'fc.2.weight': rng.normal(size=(16, 64)), 'fc.2.bias': np.zeros(16)}
  else:
    fc = {'fc.weight': rng.normal(size=(16, 64)), 'fc.bias': np.zeros(16)}
  state.update({k: v.astype(np.float32) for k, v in fc.items()})
  moco = {f'module.encoder_q.{k}': v for k, v in state.items()}
  moco.update({f'module.encoder_k.{k}': v for k, v in state.items()})
  moco['module.queue'] = np.zeros((16, 32), np.float32)
  moco['module.queue_ptr'] = np.zeros(1, np.int64)
  return moco


@pytest.mark.parametrize('mlp', [True, False])
def test_moco_checkpoint(tmp_path, caplog, mlp):
  save_file(_moco_state(mlp=mlp), str(tmp_path / 'moco.safetensors'))
  with caplog.at_level(logging.INFO):
    loaded = pretrained.load(str(tmp_path / 'moco.safetensors'))
  assert 'source_head' not in loaded['params']
  assert 'MLP (v2)' in caplog.text if mlp else 'linear projection (v1)' in caplog.text
  plain = pretrained.convert('x', torchvision_state_dict(18))
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded['params']['backbone'],
                         plain['params']['backbone'])
  pretrained.merge(_init_zeros(Classifier(num_classes=3, depth=18, width=WIDTH)), loaded)
  with pytest.raises(ValueError, match='(?s)params/source_head/kernel.*LwF, Co-Tuning.*source_classes=0'):
    pretrained.merge(_init_zeros(Classifier(num_classes=3, depth=18, width=WIDTH, source_classes=1000)),
                     loaded)


def test_moco_pth_tar(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; .pth files need it')
  checkpoint = {'epoch': 200, 'arch': 'resnet50',
                'state_dict': {k: torch.from_numpy(v) for k, v in _moco_state().items()},
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.03}]}}
  torch.save(checkpoint, tmp_path / 'moco_v2_200ep_pretrain.pth.tar')
  loaded = pretrained.load(str(tmp_path / 'moco_v2_200ep_pretrain.pth.tar'))
  assert set(loaded['params']) == {'backbone'}
  assert loaded['params']['backbone']['layer4_1']['conv2']['kernel'].shape == (3, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------
# Wrong files.

def test_not_a_resnet(tmp_path):
  path = str(tmp_path / 'vit.safetensors')
  save_file({'patch_embed.proj.weight': np.zeros((4, 3, 2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match=r'(?s)vit\.safetensors is not a ResNet state dict.*conv1\.weight'):
    pretrained.load(path)
  state = torchvision_state_dict(18)
  state['transformer.weight'] = np.zeros(3, np.float32)
  save_file(state, path)
  with pytest.raises(ValueError, match=r"not part of a torchvision ResNet: \['transformer.weight'\]"):
    pretrained.load(path)


def test_corrupt_files(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(os.urandom(256))
  with pytest.raises(ValueError, match='model.safetensors is not a readable .safetensors file'):
    pretrained.load(str(path))
  with pytest.raises(FileNotFoundError, match='No pretrained weights'):
    pretrained.load(str(tmp_path / 'absent.pth'))


def test_corrupt_pth(tmp_path):
  pytest.importorskip('torch', reason='torch is optional; .pth files need it')
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'not a zip file' + os.urandom(256))
  with pytest.raises(ValueError, match=r'weights\.pth could not be read by torch\.load'):
    pretrained.load(str(path))


def test_sha256_check(tmp_path):
  path = tmp_path / 'resnet50-0676ba61.pth'  # an official name, wrong content
  path.write_bytes(b'truncated download')
  with pytest.raises(ValueError, match=r'(?s)resnet50-0676ba61\.pth: SHA-256 .* does not start with 0676ba61'):
    pretrained.load(str(path))
  assert pretrained.expected_sha256_prefix('resnet18-f37072fd.pth') == 'f37072fd'
  assert pretrained.expected_sha256_prefix('resnet50-19c8e357.pth') == '19c8e357'  # pre-2021 name
  assert pretrained.expected_sha256_prefix('my_resnet.pth') is None


def test_sha256_match_loads(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; .pth files need it')
  tmp = tmp_path / 'tmp.pth'
  torch.save({k: torch.from_numpy(v) for k, v in torchvision_state_dict(18).items()}, tmp)
  prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
  os.rename(tmp, tmp_path / f'resnet18-{prefix}.pth')
  loaded = pretrained.load(str(tmp_path / f'resnet18-{prefix}.pth'))
  assert 'source_head' in loaded['params']


def test_pth_without_torch_suggests_safetensors(tmp_path, monkeypatch):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'anything')
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match='(?s)needs PyTorch.*safetensors'):
    pretrained.load(str(path))


def test_directory_reads_project_checkpoint_with_its_head_as_source_head(tmp_path, monkeypatch):
  from concept_jax import checkpoint  # pylint: disable=g-import-not-at-top
  head, old_source, stats = {'kernel': np.ones((4, 5))}, {'kernel': np.zeros((4, 1000))}, {'bn': 1}
  saved = {'params': {'backbone': {}, 'head': head, 'source_head': old_source}, 'batch_stats': stats}
  monkeypatch.setattr(checkpoint, 'load_variables', lambda path: saved if path == str(tmp_path) else None)
  loaded = pretrained.load(str(tmp_path))
  assert loaded['params'] == {'backbone': {}, 'head': head, 'source_head': head}
  assert loaded['batch_stats'] is stats and saved['params']['source_head'] is old_source
