"""Bi-Tuning's projector head: pooled features (B, D) -> (B, projection_dim).

One linear layer with torch's default initialisation (tllib's nn.Linear, not re-initialised); the
method l2-normalises its output. Composed onto a Classifier through `feature_heads`, so its
parameters sit at params['projector'].
"""
import flax.linen as nn

from concept_jax.models.front_door import torch_dense


class Projector(nn.Module):
  projection_dim: int = 128

  @nn.compact
  def __call__(self, features):
    return torch_dense(self.projection_dim, features.shape[-1], 'dense')(features)
