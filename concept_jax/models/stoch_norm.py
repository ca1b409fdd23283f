"""StochNorm ("Stochastic Normalization", Kou, You, Long, Wang; NeurIPS 2020): a drop-in BatchNorm.

In train mode every channel normalises, at random, with the batch statistics (probability p) or with
the running statistics (1 - p), one draw per channel per call, shared by the whole batch and every
position (tllib's `StochNorm2d`: z = s * z_batch + (1 - s) * z_running, s ~ Bernoulli(p)). The
running statistics are updated from the batch every train step whatever was drawn, and read before
that update. Eval mode normalises with the running statistics, as BatchNorm does.
p = 1 is BatchNorm in train mode, p = 0 is BatchNorm's eval-mode normalisation (still updating the
running statistics).

The parameters and statistics are BatchNorm's own, under the same names ('scale', 'bias'; 'mean',
'var'), so torchvision weights load unchanged and a checkpoint moves between 'batch' and 'stoch'.
The draws take the 'sample' rng stream (the classifier's noise stream), folded per layer by Flax.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class StochNorm(nn.Module):
  """(..., C) -> (..., C); the constructor takes BatchNorm's arguments plus p."""
  use_running_average: bool = False
  p: float = 0.5             # probability that a channel uses the batch statistics
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    # share_scope: BatchNorm's variables sit at this module's path, not one level below.
    self.norm = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    nn.share_scope(self, self.norm)

  def __call__(self, x):
    running = self.norm(x, use_running_average=True)   # before this step's update, as in tllib
    if self.use_running_average:
      return running
    batch = self.norm(x, use_running_average=False)
    if self.is_initializing():
      return batch
    uses_batch = jax.random.bernoulli(self.make_rng('sample'), self.p, (x.shape[-1],))
    return jnp.where(uses_batch, batch, running)
