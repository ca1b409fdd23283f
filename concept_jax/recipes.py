"""What every config shares: argument parsing, the base recipe (tllib / official Concept-Tuning), the
CPU-sized `tiny` preset. The files in the repository's configs/ directory are thin users of these.

Each method owns its hyper-parameters and their official defaults (`Method.default_config` in
concept_jax/methods/), so adding a method touches only methods/.
"""
import ml_collections

from concept_jax import methods, pretrained
from concept_jax.data.pipeline import default_data_config


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """'sr=15,method=erm,tiny' -> ConfigDict typed like `defaults`; a bare name sets a bool to True.

  An unknown key fails and lists the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; valid arguments: {sorted(defaults)}.')
    default = defaults[key]
    if isinstance(default, bool):
      parsed[key] = value.lower() in ('', '1', 'true', 'yes')
      continue
    try:
      parsed[key] = type(default)(value)
    except ValueError:
      raise ValueError(f'Config argument {key}={value!r}: must be {type(default).__name__}, e.g. '
                       f'{key}={default}.') from None
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """The official CUB recipe; data-set configs change what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()
  c.image_size = 224
  # source_classes > 0 keeps the pre-trained classifier ('source_head', torchvision's 1000-way fc).
  # stem: 'imagenet' (torchvision's) or 'small' (3x3 stride-1, no max pool: 32 px images).
  # norm: 'batch' or 'stoch' (StochNorm: each channel uses the batch statistics with probability
  # stoch_norm_p, else the running ones; combines with any method, method=stoch_norm is ERM with it).
  c.model = dict(depth=50, width=64, dtype='bfloat16', ib_dim=512, source_classes=0, stem='imagenet',
                 norm='batch', stoch_norm_p=0.5)
  # Weights only; '' trains from scratch. reinit: parameters deliberately not loaded.
  c.pretrained = dict(path='', reinit=pretrained.DEFAULT_REINIT)
  c.resume = ''  # another run's workdir to continue from (whole state)
  c.method = method_config('erm')
  c.batch_size = 48
  c.repeats_in_batch = False  # True accepts batch_size > training examples (batches then repeat some)
  c.epochs = 40
  c.iters_per_epoch = 500
  c.label_smoothing = 0.0
  c.optim = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 # Official quirk kept: weight decay on every parameter, BatchNorm scales included.
                 no_weight_decay=(),
                 schedule='multistep', milestones=(12, 24), gamma=0.1,
                 lr_mults=((r'^backbone/', 0.1),))
  c.eval_batch_size = 100
  # {name: data config}: other data sets with the same classes, whose test split is evaluated each
  # epoch as '<name>_main' etc. (the negative-transfer benchmark's source test with shuffled colours).
  c.extra_eval = {}
  c.eval_every_epochs = 1
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  return c


def method_config(name: str) -> ml_collections.ConfigDict:
  """Every hyper-parameter of a method, with its paper's / tllib's defaults."""
  return methods.get(name).default_config()


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a recipe to run on a laptop CPU in a minute: synthetic data, tiny ResNet, a few steps."""
  c.data.name = 'synthetic'
  c.image_size = 64
  c.model.update(depth=18, width=8, dtype='float32', ib_dim=16)
  c.batch_size = 8
  c.epochs = 2
  c.iters_per_epoch = 3
  c.eval_batch_size = 16
  c.log_every = 1
  c.checkpoint_every = 3
  c.optim.milestones = (1,)
  methods.get(c.method.name).shrink(c.method)
  return c


DEFAULT_WEIGHTS = 'weights/resnet50-0676ba61.pth'  # torchvision ResNet-50 ImageNet V1
IMAGENET_CLASSES = 1000  # its classifier's outputs


def recipe(arg, *, data: str, num_classes: int, edit=None) -> ml_collections.ConfigDict:
  """A fine-grained transfer recipe from the base, `edit(config, args)` applying the data set's changes.

  Arguments every recipe takes: sr (sampling rate 15/30/50/100), method (any of `methods.names()`), seed,
  tiny (CPU smoke run: synthetic data with the same number of classes, tiny ResNet, no weights).
  """
  a = parse_arg(arg, sr=100, method='concept_tuning', seed=0, tiny=False)
  c = base_config()
  c.seed = a.seed
  c.data.name = data
  c.data.sampling_rate = a.sr
  c.method = method_config(a.method)
  c.pretrained.path = DEFAULT_WEIGHTS
  if methods.get(a.method).uses_source_head:
    c.model.source_classes = IMAGENET_CLASSES  # torchvision's fc becomes the source head
  if edit is not None:
    edit(c, a)
  if a.tiny:
    c = tiny(c)
    c.data.synthetic.num_classes = num_classes
    c.pretrained.path = ''
  return c
