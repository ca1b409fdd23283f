"""Bi-Tuning (Zhong, Wang, Jiang, Long et al., 2020, "Bi-tuning of Pre-trained Representations",
https://arxiv.org/abs/2011.06182), as tllib's task-adaptation benchmark runs it.

q sees view 0, the momentum key encoder k (a copy of q, EMA 0.999, run in train mode without gradient)
view 1. Per class, two queues of K keys: z = l2normalise(projector(h)) (B, projection_dim) and
hn = l2normalise([h, 1]) (B, D + 1), h the pooled features.
    loss = CE + trade_off * (projector contrast + classifier contrast)
Projector contrast: q's z against k's z and the z queues, positives its own class's K keys (the
categorical contrast of concepts/losses.py, shared with Concept-Tuning). Classifier contrast: the
same row layout with scores w_y . hn, w_y = l2normalise([W_y, b_y]) the label's row of the head (no
gradient into the head), for q's own hn and every hn in the queues.
tllib quirk kept: the classifier contrast reads the hn queues *after* this step's keys are written
(the projector contrast reads them before). K = 40, projection 128, T = 0.07, trade_off 1; the
projector is trained at the backbone's 0.1x learning rate (tllib with --finetune).
Extra state: {'key_params', 'queues': {'z': (C, K, projection_dim), 'h': (C, K, D + 1), 'ptr'}}.
"""
import jax
import jax.numpy as jnp

from concept_jax.concepts import losses, momentum, queues
from concept_jax.concepts.queues import l2_normalise
from concept_jax.data.views import ViewSpec
from concept_jax.methods.base import Method, accuracy, cross_entropy
from concept_jax.models.projector import Projector


def augmented_features(features):
  """hn = l2normalise([h, 1]): (B, D) -> (B, D + 1), the features the classifier contrast scores."""
  ones = jnp.ones(features.shape[:-1] + (1,), features.dtype)
  return l2_normalise(jnp.concatenate([features, ones], axis=-1))


def classifier_contrastive_loss(hn_q, queue_h, head, labels, temperature: float = 0.07,
                                precision=losses.HIGHEST):
  """Bi-Tuning's classifier-level contrast.

  Row of sample i (class c), w_c = l2normalise([kernel[:, c], bias[c]]):
    [w_c . hn_q[i], w_c . queue_h[c] (K), w_c . queue_h[other classes]] / T,  target 1/(K+1) on the
    first K+1.
  Args:
    hn_q: (B, D + 1) from `augmented_features` (gradient flows here only).
    queue_h: (C, K, D + 1); head: {'kernel': (D, C), 'bias': (C,)} (no gradient).
    labels: (B,) int.
  Returns:
    scalar, batch mean.
  """
  head = jax.lax.stop_gradient(head)
  w = l2_normalise(jnp.concatenate([head['kernel'].T, head['bias'][:, None]], axis=1))[labels]  # (B, D+1)
  l_pair = jnp.sum(hn_q * w, axis=-1) / temperature
  l_queue = jnp.einsum('bf,ckf->bck', w, jax.lax.stop_gradient(queue_h), precision=precision) / temperature
  return losses.class_queue_contrast(l_pair, l_queue, labels)


class BiTuning(Method):
  name = 'bi_tuning'

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(queue_size=40,         # K, keys per class
             projection_dim=128,
             temperature=0.07,
             momentum=0.999,        # key encoder EMA
             trade_off=1.0,         # weight of the two contrasts together
             projector_lr_mult=0.1)
    return c

  @classmethod
  def shrink(cls, m):
    m.update(queue_size=4, projection_dim=16)

  @property
  def model_options(self) -> dict:
    return {'feature_heads': (('projector', Projector(self.config.method.projection_dim)),)}

  @property
  def views(self) -> tuple[ViewSpec, ...]:
    return super().views * 2  # q's and k's, both with the training augmentation

  def optimizer_rules(self) -> dict:
    return {'lr_mults': ((r'^projector/', self.config.method.projector_lr_mult),)}

  def init_state(self, rng, variables, prepared=None) -> dict:
    del prepared
    m = self.config.method
    shapes = {'z': (m.projection_dim,), 'h': (self.model.feature_dim + 1,)}
    return {'key_params': momentum.init_key_params(variables['params']),
            'queues': queues.init_queues(rng, self.num_classes, m.queue_size, shapes)}

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    r_q, r_k = jax.random.split(rng)
    out, new_batch_stats = self.apply(params, batch_stats, images[:, 0], r_q, train=True)
    key_params = momentum.ema_update(jax.lax.stop_gradient(state['key_params']), params, m.momentum)
    key_out = momentum.encode(self.apply, key_params, batch_stats, images[:, 1], r_k)

    z_k = l2_normalise(key_out['projector'])
    q = state['queues']
    new_queues = queues.enqueue(q, {'z': z_k, 'h': augmented_features(key_out['features'])}, labels)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    projector = losses.image_contrastive_loss(l2_normalise(out['projector']), z_k, q['z'], labels,
                                              m.temperature)
    classifier = classifier_contrastive_loss(augmented_features(out['features']), new_queues['h'],
                                             params['head'], labels, m.temperature)
    total = ce + m.trade_off * (projector + classifier)
    metrics = {'ce': ce, 'projector_contrast': projector, 'classifier_contrast': classifier,
               'accuracy': accuracy(out['logits'], labels)}
    return total, (metrics, new_batch_stats, {'key_params': key_params, 'queues': new_queues})
