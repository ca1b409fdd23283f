"""L2-SP ("Explicit Inductive Bias for Transfer Learning with Convolutional Networks", Li, Grandvalet,
Davoine; ICML 2018): fine-tuning pulled towards the starting point instead of towards zero.

  loss = CE + trade_off_backbone * 1/2 ||w_backbone - w0||^2 + trade_off_head * 1/2 ||w_head||^2

w0 is the backbone as training started (the pre-trained weights), a frozen copy in the method state;
every backbone parameter counts, BatchNorm scales and biases included (running statistics are not
parameters), as in tllib's `SPRegularization` over `backbone.named_parameters()`. The two penalties
replace weight decay on the backbone and the head. Defaults are tllib's
(examples/task_adaptation/image_classification/delta.py --regularization-type l2_sp): both trade-offs
0.01, weight decay 0.
Extra state: {'start': the backbone's starting parameters}.
"""
import jax
import jax.numpy as jnp
import optax

from concept_jax.methods.base import Method, accuracy, cross_entropy

# The parameters whose weight decay the penalties replace (tllib runs these methods at weight decay 0).
NO_WEIGHT_DECAY = (r'^backbone/', r'^head/')


def half_squared_norm(tree):
  """1/2 sum of every leaf's squared entries -> scalar (tllib's L2Regularization)."""
  return 0.5 * optax.tree.norm(tree, squared=True)


def starting_point_distance(params, start):
  """1/2 ||params - start||^2 over two pytrees of one structure -> scalar."""
  return half_squared_norm(jax.tree.map(jnp.subtract, params, start))


class L2SP(Method):
  name = 'l2_sp'

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(trade_off_backbone=0.01, trade_off_head=0.01)
    return c

  def optimizer_rules(self):
    return {'no_weight_decay': NO_WEIGHT_DECAY}

  def init_state(self, rng, variables, prepared=None):
    del rng, prepared
    # A copy: the train step donates the parameters' buffers.
    return {'start': jax.tree.map(jnp.copy, variables['params']['backbone'])}

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    out, batch_stats = self.apply(params, batch_stats, images[:, 0], rng, train=True)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    sp = starting_point_distance(params['backbone'], jax.lax.stop_gradient(state['start']))
    head = half_squared_norm(params['head'])
    metrics = {'ce': ce, 'sp': sp, 'head_l2': head, 'accuracy': accuracy(out['logits'], labels)}
    total = ce + m.trade_off_backbone * sp + m.trade_off_head * head
    return total, (metrics, batch_stats, state)
