"""torchvision-layout ResNets (10/18/34/50/101/152) in Flax Linen, NHWC.

The layout matches torchvision exactly so that its ImageNet weights load by a name table
(`concept_jax.pretrained`): stride on the 3x3 conv of a Bottleneck (ResNet "v1.5"), a 1x1 strided
conv + BN as the shortcut where shape changes, explicit symmetric paddings (Flax 'SAME' pads
(0, 1) at stride 2 where torch pads (1, 1), which shifts every feature map by one pixel), a 3x3/2
max pool padded with -inf, BatchNorm eps 1e-5 and running-average momentum 0.9 (torch's 0.1;
the running variance takes the biased batch variance, torch's the unbiased one: README's quirks table).

Parameter names mirror torchvision's state dict with '.' -> '_' for blocks:
  conv1, bn1, layer{1..4}_{i}/{conv1, bn1, conv2, bn2[, conv3, bn3][, downsample_conv, downsample_bn]}.
The classifier head ('fc' in torchvision) lives in `classifier.Classifier`, not here.
The normalisation layer is injectable (`norm_layer`: BatchNorm, or StochNorm with the same names).
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from concept_jax.models import conv
from concept_jax.models.stoch_norm import StochNorm

# depth -> (block kind, blocks per stage). ResNet-10 (one BasicBlock per stage) is the small network of
# the negative-transfer benchmark; depth 0 is the same layout under the name the tests use.
_LAYOUTS = {
    0: ('basic', (1, 1, 1, 1)),
    10: ('basic', (1, 1, 1, 1)),
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}
# Input pixels per layer4 cell. 'imagenet': torchvision's 7x7/2 conv + 3x3/2 max pool;
# 'small': the CIFAR ResNets' 3x3/1 conv and no pool, for 32 px images (a 4x4 layer4 map, not 1x1).
STEMS = {'imagenet': 32, 'small': 8}

# torchvision's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def stride(stem: str) -> int:
  """Input pixels per layer4 cell for a stem ('imagenet' | 'small')."""
  if stem not in STEMS:
    raise ValueError(f'model.stem={stem!r} is unknown; choose one of {sorted(STEMS)}.')
  return STEMS[stem]


def layout(depth: int) -> tuple[str, tuple[int, ...]]:
  """('basic' | 'bottleneck', blocks per stage) for a supported depth."""
  if depth not in _LAYOUTS:
    raise ValueError(f'Unsupported ResNet depth {depth}: choose one of {sorted(_LAYOUTS)} '
                     '(0 is ResNet-10 under the name the tests use).')
  return _LAYOUTS[depth]


def feature_dim(depth: int, width: int = 64) -> int:
  """Channels of the layer4 map: 8 * width * expansion (2048 for ResNet-50, 512 for ResNet-18)."""
  kind, _ = layout(depth)
  return 8 * width * _EXPANSION[kind]


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
  pad = kernel // 2  # torch's symmetric padding; see the module docstring
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=conv.conv_general_dilated)


def norm_layer(kind: str = 'batch', stoch_norm_p: float = 0.5) -> Callable[..., nn.Module]:
  """The backbone's normalisation: 'batch' (BatchNorm) or 'stoch' (StochNorm; stoch_norm_p = the
  probability that a channel uses the batch statistics in a train step)."""
  if kind == 'batch':
    return nn.BatchNorm
  if kind == 'stoch':
    return functools.partial(StochNorm, p=stoch_norm_p)
  raise ValueError(f"model.norm={kind!r} is unknown; choose 'batch' or 'stoch'.")


def _bn(norm, train: bool, name: str, *, dtype) -> nn.Module:
  # Statistics are reduced in float32 by Flax even when dtype is bfloat16.
  return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
              param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs; (B, H, W, Cin) -> (B, H/s, W/s, features)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(_bn, self.norm, train, dtype=self.dtype)
    y = nn.relu(bn('bn1')(_conv(self.features, 3, self.stride, 'conv1', self.dtype)(x)))
    y = bn('bn2')(_conv(self.features, 3, 1, 'conv2', self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, 'downsample_conv', self.dtype)(x)
      x = bn('downsample_bn')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, as torchvision), 1x1 expand; (B, H, W, Cin) -> (B, H/s, W/s, 4*features)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    out = 4 * self.features
    bn = functools.partial(_bn, self.norm, train, dtype=self.dtype)
    y = nn.relu(bn('bn1')(_conv(self.features, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(bn('bn2')(_conv(self.features, 3, self.stride, 'conv2', self.dtype)(y)))
    y = bn('bn3')(_conv(out, 1, 1, 'conv3', self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.stride, 'downsample_conv', self.dtype)(x)
      x = bn('downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Backbone up to layer4 (no pooling, no fc).

  Attributes:
    depth: 10, 18, 34, 50, 101, 152, or 0 (the tests' name for ResNet-10: one BasicBlock per stage).
    width: channels of the stem and of the first stage's 3x3 convs (torchvision: 64).
    dtype: compute dtype (bfloat16 or float32); parameters are always float32.
    stem: 'imagenet' (torchvision's, total stride 32) or 'small' (3x3 stride-1 conv1, no max pool,
      total stride 8; conv1 then has a 3x3 kernel, so ImageNet weights do not load into it).
    norm: the normalisation layer, a BatchNorm-like module class (see `norm_layer`).
  """
  depth: int = 50
  width: int = 64
  dtype: Any = jnp.float32
  stem: str = 'imagenet'
  norm: Callable[..., nn.Module] = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (B, H, W, 3) normalised images -> (layer4 map (B, H/s, W/s, D), stages dict), s = stride(stem).

    stages: 'stem' (B, H/4, W/4, width) after the max pool ('small' stem: (B, H, W, width)),
    'layer1'..'layer4' (strides 4, 8, 16, 32; 'small' stem: 1, 2, 4, 8), all in the compute dtype.
    """
    kind, blocks = layout(self.depth)
    block = BasicBlock if kind == 'basic' else Bottleneck
    stride(self.stem)  # validates the name
    bn = functools.partial(_bn, self.norm, train, dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = _conv(self.width, 7, 2, 'conv1', self.dtype)(x)
      x = nn.relu(bn('bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    else:
      x = nn.relu(bn('bn1')(_conv(self.width, 3, 1, 'conv1', self.dtype)(x)))
    stages = {'stem': x}
    for stage, count in enumerate(blocks):
      for i in range(count):
        block_stride = 2 if stage > 0 and i == 0 else 1
        x = block(self.width * 2**stage, block_stride, self.dtype, self.norm,
                  name=f'layer{stage + 1}_{i}')(x, train)
      stages[f'layer{stage + 1}'] = x
    return x, stages
