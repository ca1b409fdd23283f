"""Every check of a run's input, in one place, before any work: the config's types, ranges and
cross-field rules, the workdir and the files the config names, and the data set it selects. All
problems are reported at once, each naming its field and the valid range, before anything is created.

    info = validate.check(config, workdir)          # one run; returns the data set's DatasetInfo
    validate.check_stages(config, workdir)          # a config with stages: every stage first

A method's own rules live with the method (`Method.config_problems`, methods/base.py); the helpers
below (`number`, `choice`, `scale`) are what such rules are written with.
"""
import math
import os
import re
import tempfile

import jax

from concept_jax import methods, recipes
from concept_jax.data import pipeline
from concept_jax.models import resnet


class ConfigError(ValueError):
  """Raised with every problem found, one per line."""


_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


# ---------------------------------------------------------------- helpers for rules

def value(config, field: str):
  """config's value at a dotted field ('optim.lr')."""
  for key in field.split('.'):
    config = config[key]
  return config


def _interval(text: str):
  """'[1, inf)' -> a predicate on numbers."""
  lo_closed, hi_closed = text[0] == '[', text[-1] == ']'
  lo, hi = (float(x) for x in text[1:-1].split(','))
  return lambda x: (lo <= x if lo_closed else lo < x) and (x <= hi if hi_closed else x < hi)


def _is_number(x, kind) -> bool:
  if isinstance(x, bool):
    return False
  return isinstance(x, int) if kind is int else isinstance(x, (int, float)) and math.isfinite(x)


def number(config, field: str, kind, interval: str, why: str = '') -> list[str]:
  """[] when config's `field` is a `kind` (int or float) in `interval` ('(0, 1]', '[1, inf)'), else
  the problem; `why` explains a bound that depends on something else ('10 classes')."""
  x = value(config, field)
  if _is_number(x, kind) and _interval(interval)(x):
    return []
  what = 'an integer' if kind is int else 'a number'
  return [f'{field}={x!r}: must be {what} in {interval}{f" ({why})" if why else ""}.']


def choice(config, field: str, options) -> list[str]:
  x = value(config, field)
  return [] if x in tuple(options) else [f'{field}={x!r}: must be one of {list(options)}.']


def scale(config, field: str) -> list[str]:
  """A RandomResizedCrop scale (lo, hi) with 0 < lo <= hi <= 1."""
  x = value(config, field)
  if (isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_number(v, float) for v in x)
      and 0 < x[0] <= x[1] <= 1):
    return []
  return [f'{field}={x!r}: must be a pair (lo, hi) with 0 < lo <= hi <= 1.']


def _regexes(config, field: str, patterns) -> list[str]:
  problems = []
  for p in patterns:
    try:
      re.compile(p)
    except (re.error, TypeError) as e:
      problems.append(f'{field}: {p!r} is not a regular expression ({e}).')
  return problems


# ---------------------------------------------------------------- the config

_RANGES = (
    ('seed', int, '[0, inf)'), ('image_size', int, '[1, inf)'), ('batch_size', int, '[1, inf)'),
    ('eval_batch_size', int, '[1, inf)'), ('epochs', int, '[1, inf)'),
    ('iters_per_epoch', int, '[1, inf)'), ('log_every', int, '[1, inf)'),
    ('checkpoint_every', int, '[1, inf)'), ('keep_checkpoints', int, '[1, inf)'),
    ('eval_every_epochs', int, '[1, inf)'), ('label_smoothing', float, '[0, 1)'),
    ('model.width', int, '[1, inf)'), ('model.ib_dim', int, '[1, inf)'),
    ('model.source_classes', int, '[0, inf)'), ('model.stoch_norm_p', float, '[0, 1]'),
    ('optim.lr', float, '(0, inf)'), ('optim.momentum', float, '[0, 1)'),
    ('optim.weight_decay', float, '[0, inf)'), ('optim.gamma', float, '(0, inf)'),
    ('data.sampling_rate', float, '(0, 100]'), ('data.split_seed', int, '[0, inf)'),
    ('data.val_fraction', float, '[0, 1)'),
)
_SYNTHETIC = (('num_classes', int, '[2, inf)'), ('train_per_class', int, '[1, inf)'),
              ('test_per_class', int, '[1, inf)'), ('image_size', int, '[1, inf)'),
              ('noise', float, '[0, inf)'))


def _leaves(tree, prefix=''):
  for key, child in tree.items():
    if hasattr(child, 'keys') and child:
      yield from _leaves(child, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def missing_fields(config) -> list[str]:
  """Fields of the base recipe (and of the method's defaults) that config lacks; the other rules
  assume there are none."""
  try:
    expected = recipes.base_config()
    expected.method = recipes.method_config(config.method.name)
  except (AttributeError, KeyError, ValueError):
    expected.method = {}
  missing = []
  for field in _leaves(expected):
    try:
      value(config, field)
    except (AttributeError, KeyError, TypeError):
      missing.append(field)
  return ([f'{", ".join(missing)}: missing; start configs from concept_jax.recipes.base_config() '
           'and method_config(name).'] if missing else [])


def config_problems(config) -> list[str]:
  """Types, ranges and the rules between fields that need no data."""
  problems = [p for field, kind, interval in _RANGES for p in number(config, field, kind, interval)]
  problems += choice(config, 'model.dtype', ('float32', 'bfloat16', 'float16'))
  problems += choice(config, 'optim.schedule', ('multistep', 'cosine', 'constant'))
  for field, check in (('model.depth', resnet.layout), ('model.stem', resnet.stride),
                       ('model.norm', resnet.norm_layer), ('method.name', methods.get)):
    try:
      check(value(config, field))
    except (ValueError, TypeError) as e:
      problems.append(str(e) if str(e).startswith(field) else f'{field}: {e}')
  if value(config, 'optim.schedule') == 'multistep' and not number(config, 'epochs', int, '[1, inf)'):
    milestones = tuple(value(config, 'optim.milestones'))
    if (not all(_is_number(m, int) and 1 <= m <= config.epochs for m in milestones)
        or list(milestones) != sorted(set(milestones))):
      problems.append(f'optim.milestones={milestones}: must be increasing epochs in [1, '
                      f'{config.epochs}] (epochs={config.epochs}; milestones count epochs, not steps).')
  for rule in value(config, 'optim.lr_mults'):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and _is_number(rule[1], float)
            and rule[1] >= 0):
      problems.append(f'optim.lr_mults: {rule!r} must be (regex, multiplier >= 0).')
    else:
      problems += _regexes(config, 'optim.lr_mults', [rule[0]])
  problems += _regexes(config, 'optim.no_weight_decay', value(config, 'optim.no_weight_decay'))
  problems += _regexes(config, 'pretrained.reinit', value(config, 'pretrained.reinit'))
  if value(config, 'data.name') == 'synthetic':
    problems += [p for field, kind, interval in _SYNTHETIC
                 for p in number(config, f'data.synthetic.{field}', kind, interval)]
  return problems


def data_problems(config, info: pipeline.DatasetInfo) -> list[str]:
  """Rules between the config and the data set it selects (and the devices it runs on)."""
  problems = []
  if info.num_classes < 2:
    problems.append(f'data: {info.num_classes} class selected; a classifier needs at least 2 '
                    '(see data.classes).')
  if info.num_train == 0 or info.num_test == 0:
    problems.append(f'data: the selection has {info.num_train} training and {info.num_test} test '
                    'examples; both need at least 1 (see data.classes, data.sampling_rate).')
  elif (not number(config, 'batch_size', int, '[1, inf)') and config.batch_size > info.num_train
        and not config.repeats_in_batch):
    problems.append(f'batch_size={config.batch_size}: larger than the training set ({info.num_train} '
                    'examples); lower it, or set repeats_in_batch=True to accept batches that repeat '
                    'examples.')
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if not number(config, field, int, '[1, inf)') and config[field] % devices:
      problems.append(f'{field}={config[field]}: must be a multiple of the number of devices '
                      f'({devices}), e.g. {devices * max(1, config[field] // devices)}.')
  for name, data in config.extra_eval.items():  # evaluated on their test split with the same head
    try:
      extra = pipeline.dataset_info(data)
    except (ValueError, FileNotFoundError) as e:
      problems.append(f'extra_eval.{name}: {e}')
      continue
    if extra.num_classes != info.num_classes:
      problems.append(f'extra_eval.{name}: {extra.num_classes} classes where the training data has '
                      f'{info.num_classes}; an extra evaluation set needs the same classes.')
  if config.method.name in methods.names() and not number(config, 'image_size', int, '[1, inf)'):
    problems += methods.get(config.method.name).config_problems(config, info.num_classes)
  return problems


# ---------------------------------------------------------------- paths

def local_path_problems(path: str, field: str) -> list[str]:
  """A URL (gs://, s3://, ...) would be taken by the local file API for the relative directory
  'gs:/b/run', silently keeping everything on this machine's disk."""
  if not _URL.match(os.fspath(path)):
    return []
  return [f'{field}={path!r}: URL paths are not supported yet (checkpoints and metrics are written '
          'with local file operations). Use a directory every process sees at the same path: a '
          'gcsfuse mount of the bucket, Filestore or NFS.']


def directory_problems(path: str, field: str) -> list[str]:
  """[] when `path` is, or can be created as, a writable directory; checked without creating it."""
  problems = local_path_problems(path, field)
  if problems:
    return problems
  path = os.path.abspath(os.path.expanduser(path))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = 'is a file' if existing == path else f'cannot be created: {existing} is a file'
    return [f'{field}={path}: {what}, not a directory; choose another path.']
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    where = '' if existing == path else f' (its parent {existing} is not writable)'
    return [f'{field}={path}: cannot write there{where}: {e.strerror}; choose another directory.']
  return []


def _has_checkpoints(directory: str) -> bool:
  directory = os.path.join(directory, 'checkpoints')
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def _file_problems(config, workdir: str, stage_names=()) -> list[str]:
  """The files and directories a config names (pretrained '@NAME' must name an earlier stage).
  pretrained.path is only read, so only checked, when the run resumes from nothing."""
  problems = []
  resume = value(config, 'resume')
  if resume:
    url = local_path_problems(resume, 'resume')
    problems += url
    if not url and not _has_checkpoints(resume):
      problems.append(f'resume={resume!r}: no checkpoint there (checkpoints/<step>/); give the workdir '
                      'of an earlier run.')
  path = '' if resume or _has_checkpoints(workdir) else value(config, 'pretrained.path')
  if path.startswith('@'):
    if path[1:] not in stage_names:
      problems.append(f'pretrained.path={path!r}: names no earlier stage (earlier: '
                      f'{list(stage_names)}).')
  elif path and not os.path.exists(os.path.expanduser(path)):
    problems.append(f'pretrained.path={path!r}: no such file or directory.')
  image_list = value(config, 'data.image_list')
  if image_list and not os.path.isfile(image_list):
    problems.append(f'data.image_list={image_list!r}: no such file.')
  return problems


# ---------------------------------------------------------------- entry points

def _problems(config, workdir: str, stage_names=()):
  """(problems, DatasetInfo or None when the data could not be read)."""
  problems = missing_fields(config)
  if problems:
    return problems, None
  problems = config_problems(config) + _file_problems(config, workdir, stage_names)
  if any(p.startswith('data.') for p in problems):
    return problems, None  # reading the data would only repeat these
  try:
    info = pipeline.dataset_info(config.data)
  except (ValueError, FileNotFoundError) as e:  # not prepared, bad classes or image list: say the fix
    return problems + [str(e)], None
  return problems + data_problems(config, info), info


def _raise(problems: list[str]) -> None:
  if problems:
    lines = '\n'.join(f'  {p}' for p in problems)
    raise ConfigError(f'{len(problems)} problem(s) in the config (nothing was run or created):\n{lines}')


def check(config, workdir: str) -> pipeline.DatasetInfo:
  """Raises ConfigError listing every problem of a one-run config; returns its data set's info."""
  problems, info = _problems(config, workdir)
  _raise(directory_problems(workdir, '--workdir') + problems)
  return info


def check_stages(config, workdir: str) -> None:
  """Raises ConfigError listing every problem of every stage of a staged config."""
  problems = directory_problems(workdir, '--workdir')
  order = list(config.stage_order)
  for i, name in enumerate(order):
    if name in config.stages:
      stage_problems, _ = _problems(config.stages[name], os.path.join(workdir, name), order[:i])
      problems += [f'stages.{name}.{p}' for p in stage_problems]
  _raise(problems)
