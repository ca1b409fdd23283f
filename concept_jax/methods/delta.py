"""DELTA ("DELTA: Deep Learning Transfer using Feature Map with Attention for Convolutional Networks",
Li, Xiong, Wang, Rao, Liu, Chen, Huan; ICLR 2019): fine-tuning that keeps the feature maps of the
channels that matter for the target task close to the pre-trained network's.

  loss = CE + trade_off_backbone * Omega + trade_off_head * 1/2 ||w_head||^2
  Omega = sum over stages of 1/2 sum_{b, c} C a_c ||FM_c(w, x_b) - FM_c(w0, x_b)||^2 / (H W)

FM (B, H, W, C): the output of the last convolution of each stage's last block (conv3 of
layer{1..4}_{last} in a ResNet-50, tllib's return_layers; conv2 in basic-block ResNets), of the network
being trained (train mode) and of the frozen starting network w0 (eval mode, its running statistics)
on the same images; summed over the batch, as tllib does. a (C,), summing to 1 per stage: the channel
attention, computed once before training (`prepare`):
  1. a linear head is trained on the starting network's features of the training set (SGD-Nesterov
     lr 0.01, batch 32, 10 epochs, lr x0.1 per 6 epochs decayed every epoch, no weight decay);
  2. on 10 batches of 32 random training images, each channel of each stage is zeroed in turn (its
     kernel's output column) and the rise of the cross-entropy over the intact network is averaged;
  3. a = softmax(standardise(rise) / 5) per stage (uniform where every channel rose alike).
The trainer caches it in WORKDIR/prepared.npz and reads it back on resume. Defaults are tllib's
(examples/task_adaptation/image_classification/delta.py): both trade-offs 0.01, weight decay 0.
Extra state: {'source': the starting backbone's {'params', 'batch_stats'}, 'attention': {stage: (C,)}}.

Deviations from tllib, all in the preparation:
- tllib means to train the head alone (`classifier.backbone.requires_grad = False`), but that line sets
  a plain attribute, so its backbone is fine-tuned too (0.1x lr, train-mode BatchNorm, augmented
  images). Here the head is trained, as intended, on frozen eval-mode features of the eval transform,
  and the channels are ablated in the starting network with that head.
- tllib's attention network always starts from torchvision's ImageNet weights (even with
  --pretrained); here it is the run's starting network.
- It computes in float32 whatever model.dtype is: one channel's loss change is small.
"""
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from concept_jax.methods.base import Method, accuracy, cross_entropy
from concept_jax.methods.l2_sp import NO_WEIGHT_DECAY, half_squared_norm
from concept_jax.models import resnet


def delta_layers(depth: int) -> dict[str, tuple[str, ...]]:
  """stage -> parameter path of the last convolution in the stage's last block."""
  kind, blocks = resnet.layout(depth)
  conv = 'conv3' if kind == 'bottleneck' else 'conv2'
  return {f'layer{s + 1}': ('backbone', f'layer{s + 1}_{n - 1}', conv) for s, n in enumerate(blocks)}


def attention_feature_distance(maps, source_maps, attention):
  """Omega. maps, source_maps: {stage: (B, H, W, C)}; attention: {stage: (C,)} -> scalar."""
  total = 0.0
  for stage, fm in maps.items():
    _, h, w, c = fm.shape
    squared = jnp.sum((fm - source_maps[stage]) ** 2, axis=(1, 2))          # (B, C)
    total += 0.5 * jnp.sum(c * attention[stage] * squared) / (h * w)
  return total


def channel_attention(rise, temperature: float = 5.0):
  """softmax(standardise(rise) / temperature): (C,) loss rises -> (C,) weights summing to 1."""
  rise = np.asarray(rise, np.float64)
  spread = rise.std()
  z = (rise - rise.mean()) / spread if spread > 0 else np.zeros_like(rise)
  e = np.exp((z - z.max()) / temperature)
  return (e / e.sum()).astype(np.float32)


def _replace(tree, path, value):
  """A copy of a nested dict with tree[path[0]][path[1]]... = value."""
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def loss_rise(loss_fn, params, path, *args):
  """(C,): loss_fn(params', *args) - loss_fn(params, *args), params' having output channel j of the
  kernel at `path` (..., C) zeroed, for every j in turn (one lax.map over the channels)."""
  base = loss_fn(params, *args)
  kernel = functools.reduce(operator.getitem, path, params)
  channels = kernel.shape[-1]

  def ablated(j):
    return loss_fn(_replace(params, path, kernel * (jnp.arange(channels) != j)), *args) - base

  return jax.lax.map(ablated, jnp.arange(channels))


def train_head(features, labels, head, rng, *, lr: float, epochs: int, batch_size: int,
               lr_decay_epochs: float, momentum: float = 0.9):
  """A linear head {'kernel' (D, K), 'bias' (K,)} trained on fixed features (N, D), labels (N,):
  SGD-Nesterov, no weight decay, `epochs` passes in a fresh random order (rng: numpy Generator),
  batches of batch_size (the last one smaller), lr x0.1 per lr_decay_epochs (torch ExponentialLR)."""
  tx = optax.trace(decay=momentum, nesterov=True)   # torch's SGD momentum buffer

  @jax.jit
  def step(head, opt, x, y, step_lr):
    grads = jax.grad(lambda h: cross_entropy(x @ h['kernel'] + h['bias'], y))(head)
    direction, opt = tx.update(grads, opt)
    return jax.tree.map(lambda p, d: p - step_lr * d, head, direction), opt

  opt = tx.init(head)
  for epoch in range(epochs):
    order = rng.permutation(len(labels))
    for i in range(0, len(labels), batch_size):
      batch = order[i:i + batch_size]
      head, opt = step(head, opt, features[batch], labels[batch], lr * 0.1 ** (epoch / lr_decay_epochs))
  return head


def _keep_smallest(kept, new, n: int):
  """Of two (keys, *arrays) tuples (or kept=None), the n entries of smallest key, in key order."""
  if kept is not None:
    new = tuple(np.concatenate(pair) for pair in zip(kept, new))
  order = np.argsort(new[0], kind='stable')[:n]
  return tuple(a[order] for a in new)


class DELTA(Method):
  name = 'delta'

  @classmethod
  def default_config(cls):
    c = super().default_config()
    c.update(
        trade_off_backbone=0.01,
        trade_off_head=0.01,
        # The channel attention (tllib: --attention-*; lr is tllib's --lr).
        attention_lr=0.01,
        attention_epochs=10,
        attention_lr_decay_epochs=6,
        attention_batch_size=32,
        attention_iterations=10,      # batches the channel ablation averages over
        attention_temperature=5.0,
    )
    return c

  @classmethod
  def shrink(cls, m):
    m.update(attention_epochs=2, attention_iterations=2)

  def __init__(self, config, num_classes: int):
    super().__init__(config, num_classes)
    self.layers = delta_layers(config.model.depth)

  def optimizer_rules(self):
    return {'no_weight_decay': NO_WEIGHT_DECAY}

  def prepare(self, variables, batches):
    """{stage: (C,) channel attention} from the starting network and one pass over the training set."""
    m = self.config.method
    model = self.model.clone(dtype=jnp.float32)   # one channel's loss change is small
    variables = jax.device_put(variables)   # once, not with every batch
    features_of = jax.jit(lambda v, x: model.apply(v, x, train=False, heads=False)['features'])
    rng = np.random.default_rng(self.config.seed)
    size = m.attention_batch_size
    features, labels, sample = [], [], None
    for images, y in batches:
      features.append(np.asarray(features_of(variables, images)))
      labels.append(y)
      sample = _keep_smallest(sample, (rng.random(len(y)), images, y), size * m.attention_iterations)
    head = train_head(np.concatenate(features), np.concatenate(labels), variables['params']['head'], rng,
                      lr=m.attention_lr, epochs=m.attention_epochs, batch_size=size,
                      lr_decay_epochs=m.attention_lr_decay_epochs)
    params = dict(variables['params'], head=head)

    def loss_fn(params, x, y):
      out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=False)
      return cross_entropy(out['logits'], y)

    rise = jax.jit(loss_rise, static_argnums=(0, 2))
    _, images, y = sample
    attention = {}
    for stage, path in self.layers.items():
      per_batch = [rise(loss_fn, params, path + ('kernel',), images[i:i + size], y[i:i + size])
                   for i in range(0, len(y), size)]
      attention[stage] = channel_attention(np.mean(per_batch, axis=0), m.attention_temperature)
    return attention

  def init_state(self, rng, variables, prepared=None):
    del rng
    prepared = prepared or {}
    for stage, path in self.layers.items():
      channels = functools.reduce(operator.getitem, path, variables['params'])['kernel'].shape[-1]
      if stage not in prepared or prepared[stage].shape != (channels,):
        raise ValueError(
            f"DELTA's channel attention for {stage} ({channels} channels) is missing or misshapen in "
            f'{ {k: v.shape for k, v in prepared.items()} }: pass the result of method.prepare (train.run '
            'computes it and caches it in WORKDIR/prepared.npz; delete a file left by another model).')
    copy = lambda tree: jax.tree.map(jnp.copy, tree)   # the train step donates the parameters
    return {'source': {'params': {'backbone': copy(variables['params']['backbone'])},
                       'batch_stats': {'backbone': copy(variables['batch_stats']['backbone'])}},
            'attention': {stage: jnp.asarray(prepared[stage]) for stage in self.layers}}

  def feature_maps(self, variables, images, rng, *, train: bool, heads: bool = True):
    """The classifier on (B, H, W, 3), capturing the DELTA layers' outputs ->
    (outputs, {stage: (B, h, w, C) float32}, batch_stats, updated in train mode)."""
    stages = {path: stage for stage, path in self.layers.items()}
    out, mutated = self.model.apply(
        variables, images, train=train, heads=heads, rngs={'sample': rng},
        mutable=['intermediates', 'batch_stats'] if train else ['intermediates'],
        capture_intermediates=lambda module, method: method == '__call__' and module.path in stages)
    captured = mutated['intermediates']
    maps = {stage: functools.reduce(operator.getitem, path, captured)['__call__'][0].astype(jnp.float32)
            for path, stage in stages.items()}
    return out, maps, mutated.get('batch_stats', variables['batch_stats'])

  def loss(self, params, batch_stats, state, images, labels, rng):
    m = self.config.method
    x = images[:, 0]
    out, maps, batch_stats = self.feature_maps({'params': params, 'batch_stats': batch_stats}, x, rng,
                                               train=True)
    _, source_maps, _ = self.feature_maps(state['source'], x, rng, train=False, heads=False)
    ce = cross_entropy(out['logits'], labels, self.config.label_smoothing)
    behaviour = attention_feature_distance(maps, jax.lax.stop_gradient(source_maps), state['attention'])
    head = half_squared_norm(params['head'])
    metrics = {'ce': ce, 'feature_map_distance': behaviour, 'head_l2': head,
               'accuracy': accuracy(out['logits'], labels)}
    total = ce + m.trade_off_backbone * behaviour + m.trade_off_head * head
    return total, (metrics, batch_stats, state)
