"""Co-Tuning (You, Kou, Jiang, Wang, Long; NeurIPS 2020, "Co-Tuning for Transfer Learning"),
as tllib's task-adaptation benchmark runs it.

    loss = CE(target head, y) + trade_off * CE(source head, relationship[y])

relationship (C, N_s) is p(source class | target class), computed once before step 0 by the
pre-trained network (eval mode, eval transform) over the training set: tllib's "direct" approach, the
mean of softmax(source logits) over each target class's examples (the paper's calibrated variant is
not what tllib runs). The trainer caches it in WORKDIR/prepared.npz and reuses it on resume.
trade_off = 2.3; the source head (torchvision's fc, model.source_classes) is trained at the backbone's
0.1x learning rate (tllib with --finetune).
Extra state: {'relationship': (C, N_s) float32}.
"""
import jax
import jax.numpy as jnp
import numpy as np

from concept_jax.methods.base import Method, accuracy, cross_entropy


def category_relationship(batches, num_classes: int) -> np.ndarray:
  """Mean source-class probabilities per target class.

  batches: iterable of (source probabilities (b, N_s), labels (b,) int), together the training set.
  Returns (num_classes, N_s) float32, row c = mean probability over the examples of class c; uniform
  for a class without examples (tllib's would be NaN): no training batch can read that row.
  """
  sums, counts = 0.0, np.zeros(num_classes, np.int64)
  for probabilities, labels in batches:
    probabilities = np.asarray(probabilities, np.float64)
    per_class = np.zeros((num_classes, probabilities.shape[1]))
    np.add.at(per_class, np.asarray(labels), probabilities)
    sums = sums + per_class
    counts += np.bincount(np.asarray(labels), minlength=num_classes)
  means = sums / np.maximum(counts, 1)[:, None]
  return np.where(counts[:, None] > 0, means, 1.0 / means.shape[1]).astype(np.float32)


def relationship_loss(source_logits, target_probabilities):
  """Batch mean of -sum_s p(s) log softmax(source_logits)_s. (B, N_s) each -> scalar."""
  return jnp.mean(-jnp.sum(target_probabilities * jax.nn.log_softmax(source_logits, axis=-1), axis=-1))


class CoTuning(Method):
  name = 'co_tuning'
  uses_source_head = True

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.trade_off = 2.3
    return c

  def prepare(self, variables, batches) -> dict:
    variables = jax.device_put(variables)  # once, not with every batch
    probabilities = jax.jit(lambda v, x: jax.nn.softmax(
        self.apply(v['params'], v['batch_stats'], x, jax.random.key(0), train=False)[0]['source_logits']))
    return {'relationship': category_relationship(
        ((probabilities(variables, images), labels) for images, labels in batches), self.num_classes)}

  def init_state(self, rng, variables, prepared=None) -> dict:
    del rng, variables
    if not prepared or 'relationship' not in prepared:
      raise ValueError('Co-Tuning starts from the category relationship that its prepare() computes '
                       'from the training set; train.run does this (prepared_dir).')
    return {'relationship': jnp.asarray(prepared['relationship'], jnp.float32)}

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    out, batch_stats = self.apply(params, batch_stats, images[:, 0], rng, train=True)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    source = relationship_loss(out['source_logits'], state['relationship'][labels])
    metrics = {'ce': ce, 'source_ce': source, 'accuracy': accuracy(out['logits'], labels)}
    return ce + m.trade_off * source, (metrics, batch_stats, state)
