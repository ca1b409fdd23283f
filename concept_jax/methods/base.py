"""The interface every fine-tuning method implements, and what methods share.

A method owns mathematics only: given parameters and state as pytrees it returns a loss, metrics and
new state. The trainer owns devices, data, checkpoints and logging. Shapes: images (B, V, H, W, 3)
float32 normalised, V = len(method.views); labels (B,) int32.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from concept_jax import validate
from concept_jax.data.views import ViewSpec
from concept_jax.models.classifier import Classifier


class Method:
  """Plain fine-tuning scaffolding; subclasses override what they change."""

  name = 'base'
  # Classifier options the method needs (e.g. the front-door branch); they override config.model's.
  model_options: dict = {}
  # The method reads the pre-trained classifier ('source_head', config.model.source_classes > 0):
  # recipes keep torchvision's 1000-way fc for it, trained at config.method.source_head_lr_mult.
  uses_source_head: bool = False

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """config.method: every hyper-parameter with its paper's default. Subclasses extend it."""
    # tllib's default training transform: RandomResizedCrop(224) with torchvision's default scale.
    c = ml_collections.ConfigDict(dict(name=cls.name, image_scale=(0.08, 1.0)))
    if cls.uses_source_head:
      c.source_head_lr_mult = 0.1  # tllib (--finetune): the backbone's rate
    return c

  @classmethod
  def shrink(cls, method_config) -> None:
    """Adjusts config.method in place for the CPU-sized `tiny` preset (few classes, small images)."""
    del method_config

  @classmethod
  def config_problems(cls, config, num_classes: int) -> list[str]:
    """What is wrong with config.method (and the fields it depends on) for a data set of
    num_classes classes: one line per problem naming the field and its valid range, written with
    validate.number / choice / scale. The trainer reports them with the rest of the config's
    before any work (concept_jax/validate.py). Subclasses extend it."""
    del num_classes
    problems = validate.scale(config, 'method.image_scale')
    if cls.uses_source_head:
      problems += validate.number(config, 'method.source_head_lr_mult', float, '[0, inf)')
      if not config.model.source_classes:
        problems.append(cls._no_source_head())
    return problems

  @classmethod
  def _no_source_head(cls) -> str:
    return (f'model.source_classes=0: method {cls.name!r} uses the pre-trained classifier; set it to '
            "the number of classes of the pretrained weights' classifier (1000 for torchvision "
            "ImageNet weights, as configs/<dataset>.py does; a concept_jax workdir's own classes when "
            'pretrained.path is one).')

  def __init__(self, config, num_classes: int):
    self.config = config
    self.num_classes = num_classes
    m = config.model
    if self.uses_source_head and not m.source_classes:
      raise ValueError(self._no_source_head())
    options = dict(depth=m.depth, width=m.width, dtype=jnp.dtype(m.dtype), ib_dim=m.ib_dim,
                   source_classes=m.source_classes, stem=m.stem, norm=m.norm,
                   stoch_norm_p=m.stoch_norm_p)
    self.model = Classifier(num_classes=num_classes, **{**options, **self.model_options})

  @property
  def views(self) -> tuple[ViewSpec, ...]:
    return (ViewSpec(size=self.config.image_size, scale=tuple(self.config.method.image_scale)),)

  def prepare(self, variables, batches) -> dict:
    """One-time statistics computed before step 0 from the starting network and the training data
    (Co-Tuning's category relationship, DELTA's channel attention); {} when none.

    Args:
      variables: {'params', 'batch_stats'} of the starting (pre-trained) network, host numpy.
      batches: one pass over the training set with the eval transform, an iterable of
        (images (b, H, W, 3) float32 normalised, labels (b,) int32), padding rows removed.
    Returns a dict of numpy arrays. The trainer caches it in WORKDIR/prepared.npz, reads that back on
    resume instead of computing it again, and passes it to init_state.
    """
    del variables, batches
    return {}

  def init_state(self, rng, variables, prepared=None) -> dict:
    """Extra state carried between steps (queues, a key encoder, frozen weights, ...); {} when none.

    variables: the starting {'params', 'batch_stats'}; prepared: what `prepare` returned.
    """
    del rng, variables, prepared
    return {}

  def optimizer_rules(self) -> dict:
    """Parameter-path rules the method adds in front of config.optim's own (first match wins):
    {'lr_mults': ((regex, multiplier), ...), 'no_weight_decay': (regex, ...)}. E.g. L2-SP replaces
    weight decay by its own penalty: {'no_weight_decay': ('.',)}."""
    if self.uses_source_head:
      return {'lr_mults': ((r'^source_head/', self.config.method.source_head_lr_mult),)}
    return {}

  def apply(self, params, batch_stats, images, rng, *, train: bool, **kwargs):
    """The classifier on (B, H, W, 3); in train mode also returns the updated batch statistics."""
    variables = {'params': params, 'batch_stats': batch_stats}
    if not train:
      return self.model.apply(variables, images, train=False, rngs={'sample': rng}, **kwargs), batch_stats
    out, mutated = self.model.apply(variables, images, train=True, rngs={'sample': rng},
                                    mutable=['batch_stats'], **kwargs)
    return out, mutated['batch_stats']

  def loss(self, params, batch_stats, state, images, labels, rng):
    """-> (scalar loss, (metrics dict of scalars, new batch_stats, new state))."""
    raise NotImplementedError

  def eval_logits(self, variables, images, rng) -> dict:
    """Logits of every head evaluated, by head name: {'main': (B, C), ...}."""
    out, _ = self.apply(variables['params'], variables['batch_stats'], images, rng, train=False)
    heads = {'main': out['logits']}
    if 'ib_logits' in out:
      heads['ib'] = out['ib_logits']
    return heads


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Batch-mean softmax cross-entropy. logits (B, C), labels (B,) int."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)
