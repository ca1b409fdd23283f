"""BSS ("Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer
Learning", Chen, Wang, Fu, Long, Wang; NeurIPS 2019): cross-entropy plus a penalty on the k smallest
singular values of the batch's feature matrix, whose directions carry the untransferable
components.

  loss = CE + trade_off * sum_{i=1..k} sigma_{-i}^2,   sigma: singular values of the (B, D) features

The features are the pooled backbone output (the head's input), as in tllib's `BatchSpectralShrinkage`
applied to the classifier's `f`. Defaults are tllib's (examples/.../bss.py): k = 1, trade-off 0.001,
weight decay 5e-4 kept. The SVD runs inside the jitted step, on the device, over the global batch.
"""
import jax.numpy as jnp

from concept_jax.methods.base import Method, accuracy, cross_entropy


def spectral_shrinkage(features, k: int):
  """Sum of the squared k smallest singular values of features (B, D) -> scalar."""
  rank = min(features.shape)
  if not 1 <= k <= rank:
    raise ValueError(f'method.k={k} must be between 1 and min(batch, feature dim) = {rank} '
                     f'(features {features.shape}).')
  sigma = jnp.linalg.svd(features, compute_uv=False)   # (min(B, D),) descending
  return jnp.sum(sigma[rank - k:] ** 2)


class BSS(Method):
  name = 'bss'

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(k=1, trade_off=0.001)
    return c

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    out, batch_stats = self.apply(params, batch_stats, images[:, 0], rng, train=True)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    bss = spectral_shrinkage(out['features'], m.k)
    metrics = {'ce': ce, 'bss': bss, 'accuracy': accuracy(out['logits'], labels)}
    return ce + m.trade_off * bss, (metrics, batch_stats, state)
