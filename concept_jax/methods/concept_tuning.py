"""Concept-Tuning (Yang, Huang, Wei; ICCV 2023): concept-level contrast + front-door adjustment.

One step, as the official code orders it (../shared/docs/method.md section 3):
  1. q on view 0 -> logits, IB logits, mu, std; z_q = l2normalise(logits).
  2. pre-EMA key encoder k on view 2 -> concept boxes and confusing classes.
  3. q's backbone on the 9 patches of view 2, one pass per patch slot (BatchNorm batch statistics per
     slot, running statistics untouched), q's head under stop_gradient -> zq_p (B, 9, C).
  4. EMA of k towards q (q's parameters from before this step's update).
  5. k on view 1 -> z_k; k on view 3 -> boxes -> zk_p.
  6. losses against the queues as they were, then enqueue z_k, zk_p.
Extra state: {'key_params', 'queues': {'z', 'h', 'ptr'}}, and 'step' with method.contrast_warmup. The
key encoder's BatchNorm running statistics are never read (k always runs in train mode), so they are
not kept.
"""
import jax
import jax.numpy as jnp

from concept_jax import validate
from concept_jax.concepts import crop, losses, momentum, queues, search
from concept_jax.concepts.queues import l2_normalise
from concept_jax.data.views import ViewSpec
from concept_jax.methods.base import Method, accuracy, cross_entropy
from concept_jax.models import resnet


class ConceptTuning(Method):
  name = 'concept_tuning'
  model_options = {'front_door': True}

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(
        queue_size=40,            # K, keys per class
        temperature=0.07,
        momentum=0.999,           # key encoder EMA
        confusing=100,            # confusing classes per sample (CUB recipe: 199)
        trade_off=1.0,            # image-level contrast weight
        beta=1.0,                 # concept-level contrast weight
        # Not in the official code (0: off): steps over which trade_off and beta ramp up linearly from
        # 0, for short runs whose first steps' image-level contrast, against a random key head and
        # random queues, throws the main head off (README "Why the main head falls on some seeds").
        contrast_warmup=0,
        ib_weight=1.0,            # CE of the information-bottleneck head
        infow=5e-3,               # KL weight
        kl_scale='exp',           # official quirk: KL with exp(std) as the scale; 'std' is the textbook one
        num_concepts=9,
        concept_step=0,           # 0: 250 * D / 2048 channels between concept slices
        channels_per_concept=0,   # 0: 30 * D / 2048
        patch_size=64,
        box_anchor='corner',      # official quirk: box centred on the peak cell's top-left corner
        top_pos=3, top_neg=10,
        sinkhorn_eps=0.01, sinkhorn_iters=200, sinkhorn_thresh=1e-3,
        image_scale=(0.2, 1.0),   # views 0, 1
        patch_scale=(0.5, 1.0),   # views 2, 3
    )
    return c

  @classmethod
  def shrink(cls, m):
    m.update(queue_size=4, confusing=min(m.confusing, 20), patch_size=32)

  @classmethod
  def config_problems(cls, config, num_classes):
    m, n = config.method, num_classes
    if n < 4:
      return [f'method.name=concept_tuning: needs at least 4 classes (the concept search scores '
              f'channels against 3 confusing ones); the data has {n}.']
    number = lambda field, kind, interval, why='': validate.number(config, f'method.{field}', kind,
                                                                   interval, why)
    problems = super().config_problems(config, num_classes) + validate.scale(config, 'method.patch_scale')
    problems += number('confusing', int, f'[1, {n - 1}]', f"{n} classes: at most every other one; "
                       "CUB's recipe uses 199")
    problems += number('patch_size', int, f'[1, {config.image_size}]', f'image_size={config.image_size}')
    problems += number('queue_size', int, '[1, inf)') + number('num_concepts', int, '[1, inf)')
    problems += number('contrast_warmup', int, '[0, inf)', '0: the official full weights from the first step')
    problems += number('temperature', float, '(0, inf)') + number('momentum', float, '[0, 1]')
    for weight in ('trade_off', 'beta', 'ib_weight', 'infow'):
      problems += number(weight, float, '[0, inf)')
    problems += number('concept_step', int, '[0, inf)', '0: scaled from the width')
    problems += number('channels_per_concept', int, '[0, inf)', '0: scaled from the width')
    problems += number('sinkhorn_eps', float, '(0, inf)') + number('sinkhorn_iters', int, '[1, inf)')
    problems += number('sinkhorn_thresh', float, '[0, inf)')
    problems += validate.choice(config, 'method.kl_scale', ('exp', 'std'))
    problems += validate.choice(config, 'method.box_anchor', ('corner', 'center'))
    if problems:
      return problems
    plan = m.num_concepts ** 2  # entries of one OT plan
    problems += number('top_pos', int, f'[1, {plan}]', f'num_concepts ** 2 = {plan} plan entries')
    problems += number('top_neg', int, f'[1, {plan}]', f'num_concepts ** 2 = {plan} plan entries')
    try:
      search.concept_slices(resnet.feature_dim(config.model.depth, config.model.width), m.num_concepts,
                            m.concept_step or None, m.channels_per_concept or None)
    except ValueError as e:
      problems.append(f'method.concept_step / channels_per_concept: {e}')
    return problems

  def __init__(self, config, num_classes: int):
    super().__init__(config, num_classes)
    self.num_confusing = config.method.confusing  # in [1, C - 1]: see config_problems

  @property
  def views(self) -> tuple[ViewSpec, ...]:
    size, m = self.config.image_size, self.config.method
    image = ViewSpec(size=size, scale=tuple(m.image_scale))
    patch = ViewSpec(size=size, scale=tuple(m.patch_scale))
    return (image, image, patch, patch)

  def init_state(self, rng, variables, prepared=None) -> dict:
    del prepared
    m = self.config.method
    state = {'key_params': momentum.init_key_params(variables['params']),
             'queues': queues.init_queues(rng, self.num_classes, m.queue_size,
                                          {'z': (self.num_classes,),
                                           'h': (m.num_concepts, self.num_classes)})}
    if m.contrast_warmup:  # the warm-up's clock; the official state has none
      state['step'] = jnp.zeros((), jnp.int32)
    return state

  def concepts(self, key_params, batch_stats, images, labels, rng):
    """k (train mode, no gradient) on one view -> (z (B, C) normalised logits, boxes (B, 9, 4), confusing)."""
    m = self.config.method
    out = momentum.encode(self.apply, key_params, batch_stats, images, rng)
    boxes, confusing = search.concept_boxes(
        out['feature_map'], out['logits'], labels, key_params['head']['kernel'],
        num_confusing=self.num_confusing, num_concepts=m.num_concepts,
        concept_step=m.concept_step or None, channels_per_concept=m.channels_per_concept or None,
        stride=self.model.stride, image_size=images.shape[1], box_anchor=m.box_anchor)
    return l2_normalise(out['logits']), boxes, confusing

  def patch_embeddings(self, params, batch_stats, images, boxes, rng):
    """(B, 9, C) normalised logits of the boxed patches; the head is applied under stop_gradient.

    vmap over the patch slot gives each slot its own BatchNorm batch statistics, as the official
    code's nine separate passes do; the updated running statistics are discarded.
    """
    size = self.config.method.patch_size
    patches = jnp.swapaxes(crop.crop_patches(images, boxes, size), 0, 1)   # (9, B, s, s, 3)
    features = jax.vmap(lambda p: self.apply(params, batch_stats, p, rng, train=True,
                                             heads=False)[0]['features'])(patches)
    head = jax.lax.stop_gradient(params['head'])
    logits = features @ head['kernel'] + head['bias']                      # (9, B, C)
    return l2_normalise(jnp.swapaxes(logits, 0, 1))

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    r_q, r_k2, r_qp, r_k1, r_k3, r_kp, r_pos = jax.random.split(rng, 7)
    key_params = jax.lax.stop_gradient(state['key_params'])

    out, new_batch_stats = self.apply(params, batch_stats, images[:, 0], r_q, train=True)
    z_q = l2_normalise(out['logits'])
    _, boxes_q, confusing = self.concepts(key_params, batch_stats, images[:, 2], labels, r_k2)
    zq_p = self.patch_embeddings(params, batch_stats, images[:, 2], boxes_q, r_qp)

    key_params = momentum.ema_update(key_params, params, m.momentum)
    z_k, _, _ = self.concepts(key_params, batch_stats, images[:, 1], labels, r_k1)
    _, boxes_k, _ = self.concepts(key_params, batch_stats, images[:, 3], labels, r_k3)
    zk_p = jax.lax.stop_gradient(self.patch_embeddings(key_params, batch_stats, images[:, 3], boxes_k, r_kp))

    q = state['queues']
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    image = losses.image_contrastive_loss(z_q, z_k, q['z'], labels, m.temperature)
    concept, concept_aux = losses.concept_contrastive_loss(
        zq_p, zk_p, q['h'], labels, confusing, r_pos, temperature=m.temperature,
        top_pos=m.top_pos, top_neg=m.top_neg, eps=m.sinkhorn_eps, max_iter=m.sinkhorn_iters,
        thresh=m.sinkhorn_thresh, with_aux=True)
    ib_ce = cross_entropy(out['ib_logits'], labels, self.config.label_smoothing)
    kl = losses.ib_kl(out['mu'], out['std'], scale=m.kl_scale)
    trade_off, beta = m.trade_off, m.beta
    new_state = {'key_params': key_params, 'queues': queues.enqueue(q, {'z': z_k, 'h': zk_p}, labels)}
    if m.contrast_warmup:
      ramp = jnp.minimum(1.0, state['step'] / m.contrast_warmup)  # 0 at the first step
      trade_off, beta = trade_off * ramp, beta * ramp
      new_state['step'] = state['step'] + 1
    total = ce + trade_off * image + beta * concept + m.ib_weight * ib_ce + m.infow * kl

    metrics = {'ce': ce, 'image_contrast': image, 'concept_contrast': concept, 'ib_ce': ib_ce,
               'kl': kl, 'accuracy': accuracy(out['logits'], labels),
               'ib_accuracy': accuracy(out['ib_logits'], labels),
               # The Sinkhorn loop's trip count (its slowest group): what the OT part costs.
               'sinkhorn_iters': concept_aux['sinkhorn_iters_max'].astype(jnp.float32)}
    return total, (metrics, new_batch_stats, new_state)
