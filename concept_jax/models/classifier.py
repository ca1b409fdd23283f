"""The classifier used for both encoders: ResNet backbone + linear head (+ front-door branch).

Parameter tree: {'backbone': torchvision names (see resnet.py), 'head': {'kernel', 'bias'},
'front_door': {'pam', 'cam', 'ib'} (front_door=True), 'source_head': {'kernel', 'bias'}
(source_classes > 0; torchvision's 'fc', e.g. for methods that keep the ImageNet classifier), and one
entry per head a method composes through `feature_heads` (e.g. Bi-Tuning's 'projector')}.
batch_stats: {'backbone': ...}.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from concept_jax.models import front_door as front_door_lib
from concept_jax.models import resnet


class Classifier(nn.Module):
  """images (B, H, W, 3), already normalised -> dict of float32 arrays.

  Always: 'feature_map' (B, H/s, W/s, D) layer4 output (s = self.stride: 32, or 8 with stem='small'); 'features' (B, D) its global average;
  'stages' {'stem', 'layer1', ..., 'layer4'}. With heads=True also 'logits' (B, num_classes); with
  front_door 'ib_logits' (B, num_classes), 'mu' and 'std' (B, ib_dim) (needs rngs={'sample': key});
  with source_classes > 0 'source_logits' (B, source_classes); for each (name, head) of
  feature_heads, out[name] = head(features).
  heads=False runs the backbone only (the patch passes of Concept-Tuning); initialise with heads=True.
  """
  num_classes: int
  depth: int = 50
  width: int = 64
  dtype: Any = jnp.float32
  front_door: bool = False
  ib_dim: int = 512
  source_classes: int = 0
  stem: str = 'imagenet'
  # Heads a method composes onto the pooled features: ((name, module), ...); params[name] is theirs.
  feature_heads: tuple = ()
  norm: str = 'batch'          # 'batch' | 'stoch' (StochNorm, models/stoch_norm.py)
  stoch_norm_p: float = 0.5    # StochNorm: probability that a channel uses the batch statistics

  @property
  def stride(self) -> int:
    """Input pixels per cell of the layer4 map."""
    return resnet.stride(self.stem)

  @property
  def feature_dim(self) -> int:
    return resnet.feature_dim(self.depth, self.width)

  @nn.compact
  def __call__(self, images, train: bool = False, heads: bool = True):
    feature_map, stages = resnet.ResNet(self.depth, self.width, self.dtype, self.stem,
                                        resnet.norm_layer(self.norm, self.stoch_norm_p),
                                        name='backbone')(images, train)
    # GAP in float32: the head and the concept search read these; casting here is free under jit.
    features = jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))
    out = {'feature_map': feature_map.astype(jnp.float32), 'features': features,
           'stages': {k: v.astype(jnp.float32) for k, v in stages.items()}}
    if not heads:
      return out
    # Heads are tiny (D x C); float32 keeps logits exact for the concept search and the losses.
    out['logits'] = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                             bias_init=nn.initializers.zeros, name='head')(features)
    if self.front_door:
      out.update(front_door_lib.FrontDoor(self.num_classes, self.ib_dim, self.dtype,
                                          name='front_door')(feature_map))
    if self.source_classes:
      # torchvision's fc keeps torch's default init when not loaded from a checkpoint.
      out['source_logits'] = front_door_lib.torch_dense(self.source_classes, features.shape[-1],
                                                        'source_head')(features)
    for name, head in self.feature_heads:
      out[name] = head.clone(parent=self, name=name)(features)
    return out
