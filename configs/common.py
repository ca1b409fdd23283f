"""What every config shares: argument parsing and the base recipe (tllib / official Concept-Tuning)."""
import ml_collections

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
    else:
      parsed[key] = type(default)(value)
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """The official CUB recipe; data-set configs change what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = default_data_config()
  c.image_size = 224
  # source_classes > 0 keeps the pre-trained classifier ('source_head', torchvision's 1000-way fc).
  c.model = dict(depth=50, width=64, dtype='bfloat16', ib_dim=512, source_classes=0)
  # Weights only; '' trains from scratch. reinit: parameters deliberately not loaded.
  c.pretrained = dict(path='', reinit=(r'^head/', r'^front_door/'))
  c.resume = ''  # another run's workdir to continue from (whole state)
  c.method = method_config('erm')
  c.batch_size = 48
  c.epochs = 40
  c.iters_per_epoch = 500
  c.label_smoothing = 0.0
  c.optim = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 # Official quirk kept: weight decay on every parameter, BatchNorm scales included.
                 no_weight_decay=(),
                 schedule='multistep', milestones=(12, 24), gamma=0.1,
                 lr_mults=((r'^backbone/', 0.1),))
  c.eval_batch_size = 100
  c.eval_every_epochs = 1
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  return c


def method_config(name: str) -> ml_collections.ConfigDict:
  """Every hyper-parameter of a method, with the official defaults."""
  if name == 'erm':
    # tllib's default training transform: RandomResizedCrop(224) with torchvision's default scale.
    return ml_collections.ConfigDict(dict(name='erm', image_scale=(0.08, 1.0)))
  if name == 'concept_tuning':
    return ml_collections.ConfigDict(dict(
        name='concept_tuning',
        queue_size=40,            # K, keys per class
        temperature=0.07,
        momentum=0.999,           # key encoder EMA
        confusing=100,            # confusing classes per sample (CUB recipe: 199)
        trade_off=1.0,            # image-level contrast weight
        beta=1.0,                 # concept-level contrast weight
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
    ))
  raise ValueError(f"No method config for {name!r}; known: 'erm', 'concept_tuning'.")


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
  if c.method.name == 'concept_tuning':
    c.method.update(queue_size=4, confusing=min(c.method.confusing, 20), patch_size=32)
  return c


DEFAULT_WEIGHTS = 'weights/resnet50-0676ba61.pth'  # torchvision ResNet-50 ImageNet V1


def recipe(arg, *, data: str, num_classes: int, edit=None) -> ml_collections.ConfigDict:
  """A fine-grained transfer recipe from the base, `edit(config, args)` applying the data set's changes.

  Arguments every recipe takes: sr (sampling rate 15/30/50/100), method (concept_tuning | erm), seed,
  tiny (CPU smoke run: synthetic data with the same number of classes, tiny ResNet, no weights).
  """
  a = parse_arg(arg, sr=100, method='concept_tuning', seed=0, tiny=False)
  c = base_config()
  c.seed = a.seed
  c.data.name = data
  c.data.sampling_rate = a.sr
  c.method = method_config(a.method)
  c.pretrained.path = DEFAULT_WEIGHTS
  if edit is not None:
    edit(c, a)
  if a.tiny:
    c = tiny(c)
    c.data.synthetic.num_classes = num_classes
    c.pretrained.path = ''
  return c
