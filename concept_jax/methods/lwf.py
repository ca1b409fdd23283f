"""LwF: Learning without Forgetting (Li and Hoiem, ECCV 2016; https://arxiv.org/abs/1606.09282),
as tllib's task-adaptation benchmark runs it.

    loss = CE(target head, y) + trade_off * KD(source head of q, source head of the pre-trained network)
    KD(s, t) = batch mean of KL(softmax(t / T) || softmax(s / T))

tllib's KnowledgeDistillationLoss: no T^2 factor; T = 3, trade_off = 4. The source head is torchvision's
fc (model.source_classes, loaded into 'source_head'); tllib leaves it out of the optimizer, so it keeps
its pre-trained values (source_head_lr_mult = 0) while the backbone moves away underneath it.

The teacher is the pre-trained network in eval mode (BatchNorm running statistics). tllib records its
source outputs once before training, for one random crop of each training image, and pairs them with
the other crops the student sees later; the Method interface has no per-example identity, so here a
frozen copy of the starting variables (method state, checkpointed) scores the student's own view each
step: one forward pass more per step, and a target that matches its input.
Extra state: {'teacher': {'params', 'batch_stats'}}.
"""
import jax
import jax.numpy as jnp

from concept_jax.methods.base import Method, accuracy, cross_entropy


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """KL(softmax(teacher / T) || softmax(student / T)) summed over classes, batch mean.

  student_logits, teacher_logits: (B, N) -> scalar; no gradient into the teacher.
  """
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


class LwF(Method):
  name = 'lwf'
  uses_source_head = True

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(temperature=3.0, trade_off=4.0,
             source_head_lr_mult=0.0)  # tllib: the source head is not in the optimizer
    return c

  def init_state(self, rng, variables, prepared=None) -> dict:
    del rng, prepared
    return {'teacher': jax.tree.map(jnp.copy, {'params': variables['params'],
                                               'batch_stats': variables['batch_stats']})}

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    out, new_batch_stats = self.apply(params, batch_stats, images[:, 0], rng, train=True)
    teacher, _ = self.apply(state['teacher']['params'], state['teacher']['batch_stats'], images[:, 0],
                            rng, train=False)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    kd = distillation_loss(out['source_logits'], teacher['source_logits'], m.temperature)
    metrics = {'ce': ce, 'distillation': kd, 'accuracy': accuracy(out['logits'], labels)}
    return ce + m.trade_off * kd, (metrics, new_batch_stats, state)
