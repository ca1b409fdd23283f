"""ERM: plain fine-tuning with cross-entropy on one augmented view."""
from concept_jax.methods.base import Method, accuracy, cross_entropy


class ERM(Method):
  name = 'erm'

  def loss(self, params, batch_stats, state, images, labels, rng):
    out, batch_stats = self.apply(params, batch_stats, images[:, 0], rng, train=True)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    return ce, ({'ce': ce, 'accuracy': accuracy(out['logits'], labels)}, batch_stats, state)
