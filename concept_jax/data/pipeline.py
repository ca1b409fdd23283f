"""Training and evaluation batches: data set -> subsets -> tf.data -> per-process numpy batches.

Training stream. The training set T (the sampled subset minus the validation hold-out, see
`splits`) is read into memory once. Example position g = 0, 1, 2, ... of the stream is
  T[perm_e[g mod |T|]],  e = g div |T|,  perm_e = np.random.default_rng([seed, e]).permutation(|T|)
(one fresh permutation per epoch, epochs concatenated with no remainder dropped), and its views are
augmented with stateless seeds from (seed, g, view). Global batch s holds positions
[s * G, (s + 1) * G); process p takes rows [p * b, (p + 1) * b), b = G / process_count. A batch is
therefore a pure function of (data, seed, s): resuming at `start_step` yields bit-identical batches
without decoding the skipped ones, and any process layout sees the same global batches.

Evaluation. The split is padded to a whole number of global batches; padding rows are zero images
with mask False, so every example counts exactly once whatever the batch size and process count.

TensorFlow is imported lazily and never sees the GPUs.
"""
import atexit
import dataclasses
import itertools
import weakref

import ml_collections
import numpy as np

from concept_jax import runtime
from concept_jax.data import augment, splits
from concept_jax.data.builders import common, registry, synthetic

# Batches made ahead of the consumer: a fixed buffer, as the autotuner that would size one is off
# (`_mapped`). Batch contents do not depend on it.
PREFETCH = 2


def default_data_config():
  """Every data field, with defaults (a demo-sized synthetic set)."""
  return ml_collections.ConfigDict({
      # Short name (cub200, stanford_cars, aircraft[/cropped], flowers102, pets, dtd, caltech101,
      # cifar10, cifar100, image_folder, digits, coloured_mnist, synthetic) or any tfds name.
      'name': 'synthetic',
      # Empty strings and tuples mean "not set" (ml_collections cannot override None-typed fields
      # from the command line).
      'data_dir': '',  # tfds data_dir; '': $TFDS_DATA_DIR or ~/tensorflow_datasets
      'manual_dir': '',  # aircraft archive folder / image_folder root
      'sampling_rate': 100,  # percent of each class's training examples kept: 15, 30, 50, 100
      'split_seed': 0,  # seeds the per-class subsets and the validation hold-out
      'val_fraction': 0.0,  # per-class share of the kept examples held out as 'val'
      'image_list': '',  # a tllib "path label" list fixing the training set (sampling_rate=100)
      'classes': (),  # optional list of class ids kept, relabelled 0..n-1 in list order
      # Eval transform: resize the shorter side to image_size / this, centre-crop image_size.
      # 224/256 is the ImageNet recipe; 1.0 keeps small images whole (32 px data at image_size 32).
      'eval_crop_fraction': augment.EVAL_CROP_FRACTION,
      'synthetic': {'num_classes': 200, 'train_per_class': 30, 'test_per_class': 29,
                    'image_size': 64, 'noise': 20.0, 'seed': 0},
      # coloured_mnist: real MNIST digits with a planted feature (builders/coloured_mnist.py). Each
      # option set is its own tfds config, prepared on first use in about a second.
      'planted': {
          # 'source': digits 0-4, 400 train / 100 test per class; 'target': digits 5-9 relabelled
          # 0-4, a 300-per-class training pool (sampling_rate subsamples it) / 200 test per class.
          'task': 'source',
          # Source only: 'spurious' (feature = the class's value with probability p, else one of
          # the others) or 'clean' (independent of the label). The target is always independent.
          'variant': 'spurious',
          # 'stroke' colour, 'background' colour, or 'marker' (a 4x4 square in one of 5 slots).
          'feature': 'stroke',
          'p': 0.95,
          # Class c's colour is palette[c] (names or '#rrggbb'); unused by 'marker'.
          'palette': ('red', 'green', 'blue', 'yellow', 'magenta'),
          # Draws the training split's features; test splits are the same for every seed. Set it
          # to the run seed so that paired runs share colours.
          'seed': 0,
      },
  })


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a config selects: class count and names after `classes`, split sizes after sampling."""
  num_classes: int
  num_train: int
  num_val: int
  num_test: int
  class_names: tuple


@dataclasses.dataclass(frozen=True)
class _Subset:
  """Examples of one split selected for one use; labels relabelled (int32)."""
  examples: registry.Examples
  indices: np.ndarray  # into examples
  labels: np.ndarray  # int32, relabelled
  num_classes: int
  class_names: tuple


def _get(cfg, key, default=None):
  value = cfg.get(key, default)
  return default if value is None else value


def _class_map(cfg, num_classes):
  """(num_classes,) original id -> new id (-1 = dropped), and the kept class ids."""
  classes = cfg.get('classes', None)
  if not classes:
    return np.arange(num_classes), list(range(num_classes))
  classes = [int(c) for c in classes]
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or len(set(classes)) != len(classes):
    raise ValueError(f'data_config.classes must list distinct class ids in [0, {num_classes}), '
                     f'got {classes}.')
  mapping = np.full(num_classes, -1)
  mapping[classes] = np.arange(len(classes))
  return mapping, classes


def _select(cfg, split):
  """The examples of split 'train', 'val' or 'test' under the data config."""
  source = 'test' if split == 'test' else 'train'
  ex = registry.load_examples(cfg, source)
  num_classes = len(ex.class_names)
  mapping, kept = _class_map(cfg, num_classes)
  idx = np.arange(len(ex.labels))
  rate = float(_get(cfg, 'sampling_rate', 100))
  if source == 'train' and _get(cfg, 'image_list', None):
    if rate != 100:
      raise ValueError('data_config.image_list already fixes the training subset; set '
                       f'sampling_rate=100 (got {rate:g}).')
    entries = splits.read_image_list(cfg.image_list)
    idx = splits.select_by_image_list(ex.names, ex.labels, entries, source=cfg.image_list)
  idx = idx[mapping[ex.labels[idx]] >= 0]
  if source == 'train':
    train, val = splits.train_val_split(ex.labels[idx], rate=rate,
                                        split_seed=int(_get(cfg, 'split_seed', 0)),
                                        val_fraction=float(_get(cfg, 'val_fraction', 0.0)))
    idx = idx[train if split == 'train' else val]
  labels = mapping[ex.labels[idx]].astype(np.int32)
  return _Subset(ex, idx, labels, len(kept), tuple(ex.class_names[c] for c in kept))


def dataset_info(data_config):
  """Sizes and class names of the splits the config selects (reads the data set once)."""
  train, val, test = (_select(data_config, s) for s in ('train', 'val', 'test'))
  return DatasetInfo(train.num_classes, len(train.indices), len(val.indices), len(test.indices),
                     train.class_names)


def _loader(subset, cfg, tf):
  """TF function (encoded bytes, index into the examples) -> uint8 image (H, W, 3)."""
  ex = subset.examples
  if ex.images is None:
    image_fn = synthetic.make_image_fn(ex.split, cfg.get('synthetic', None))
    # Class ids of the full synthetic set (labels are relabelled only for the output).
    full_labels = tf.constant(ex.labels)
    return lambda data, index: image_fn(index, tf.gather(full_labels, index))
  return lambda data, index: tf.io.decode_image(data, channels=3, expand_animations=False)


def _payload(subset, i):
  """Encoded bytes of subset example i (b'' for synthetic data)."""
  ex = subset.examples
  return b'' if ex.images is None else ex.images[subset.indices[i]]


def _local_rows(batch_size, process_index, process_count, what):
  if batch_size % process_count:
    raise ValueError(f'{what} ({batch_size}) must be divisible by process_count ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return batch_size // process_count


class _EpochPermutation:
  """Stream position -> subset index, one fresh permutation per epoch (keeps the last one)."""

  def __init__(self, n, seed):
    self.n, self.seed, self._epoch, self._perm = n, int(seed), None, None

  def __call__(self, position):
    epoch, offset = divmod(int(position), self.n)
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return int(self._perm[offset])


def _corrupt_error(subset, cfg, candidates):
  """A CorruptImageError naming the first undecodable example, looking at `candidates` (subset
  indices, the failing batch) first, then everywhere; None if every image decodes."""
  tf = common.import_tf()
  ex = subset.examples
  if ex.images is None:
    return None
  for i in list(candidates) + list(range(len(subset.indices))):
    try:
      tf.io.decode_image(_payload(subset, i), channels=3, expand_animations=False)
    except tf.errors.OpError as e:
      fix = ('Replace or delete the file and prepare again: ' + registry.prepare_command(
          ex.name, cfg.get('data_dir', None), cfg.get('manual_dir', None)) + ' --force')
      return common.CorruptImageError(
          f'Image {ex.names[subset.indices[i]]!r} (example {int(subset.indices[i])} of the '
          f'{ex.split!r} split of {ex.name!r}) cannot be decoded: {e.message.strip()}\n{fix}')
  return None


def train_batches(data_config, views, *, global_batch_size, seed, start_step=0, process_index=0,
                  process_count=1):
  """Endless iterator of this process's rows of each global training batch, from `start_step`.

  Args:
    data_config: see `default_data_config`.
    views: sequence of augment.ViewSpec, all of the same size.
    global_batch_size: G, examples per step over all processes.
    seed: seeds the epoch permutations and the augmentations (non-negative int).
    start_step: first step to yield (resume).
  Yields:
    {'images': uint8 (G / process_count, V, size, size, 3), 'label': int32 (G / process_count,)}
  """
  tf = common.import_tf()
  views = tuple(views)
  if not views or len({v.size for v in views}) != 1:
    raise ValueError(f'views must be non-empty and share one size, got {views}.')
  b = _local_rows(global_batch_size, process_index, process_count, 'global_batch_size')
  subset = _select(data_config, 'train')
  n = len(subset.indices)
  if n == 0:
    raise ValueError(f'The training set of {data_config.name!r} is empty under this config.')
  perm = _EpochPermutation(n, seed)

  indices, labels = np.asarray(subset.indices, np.int64), np.asarray(subset.labels, np.int32)

  def generate():  # a step's rows per call: tf.data's cost per generated element is paid per step
    for step in itertools.count(start_step):
      first = step * global_batch_size + process_index * b
      g = np.arange(first, first + b, dtype=np.int64)
      rows = [perm(p) for p in g]
      yield [_payload(subset, i) for i in rows], indices[rows], labels[rows], g

  load = _loader(subset, data_config, tf)
  seed_t = tf.constant(int(seed), tf.int64)

  def make_views(data, index, label, g):
    image = load(data, index)
    out = [augment.train_view(image, v, augment.view_seed(seed_t, g, k)) for k, v in enumerate(views)]
    return {'images': tf.stack(out), 'label': label}

  ds = tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec((b,), tf.string), tf.TensorSpec((b,), tf.int64), tf.TensorSpec((b,), tf.int32),
      tf.TensorSpec((b,), tf.int64))).unbatch()
  ds = _mapped(tf, ds, make_views, b)

  def rows_of(step):  # subset indices of this process's rows of a step (to name a broken image)
    first = step * global_batch_size + process_index * b
    return [_EpochPermutation(n, seed)(g) for g in range(first, first + b)]

  return _track(_iterate(ds, itertools.count(start_step), rows_of, subset, data_config))


def _mapped(tf, ds, fn, b):
  """ds.map(fn), one call per core at a time, in order, batched by b, PREFETCH batches ahead.

  tf.data's autotuner is off: its thread sleeps between rounds for periods that double up to a
  minute, and (TF 2.21) closing an iterator waits for the sleep to end, so a run waited up to 35 s
  after its last step (`make demo` lost 20-35 s after each source model, 2026-12-02). The batches do
  not depend on the number of parallel calls (deterministic order, per-example seeds).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.map(_plain(tf, fn), num_parallel_calls=runtime.cpu_count(), deterministic=True)
  return ds.batch(b).prefetch(PREFETCH).with_options(options)


def _plain(tf, fn):
  """fn for Dataset.map without AutoGraph's rewrite: the transforms use tf.cond where they branch on
  a tensor, and the rewrite was a fifth of a short run's set-up (every pipeline traces its map anew)."""
  return tf.autograph.experimental.do_not_convert(fn)


def eval_batches(data_config, split, *, batch_size, image_size, process_index=0, process_count=1):
  """One pass over split 'test', 'val' or 'train' (the sampled training set), padded, with the eval
  transform; this process's rows of each global batch.

  Args:
    batch_size: global batch size (over all processes).
    image_size: output size; images get the resize-shorter-side + centre-crop eval transform
      (data_config.eval_crop_fraction).
  Yields (every process the same number of batches, ceil(N / batch_size)):
    {'image': uint8 (b, size, size, 3), 'label': int32 (b,), 'mask': bool (b,)},
    b = batch_size / process_count; padding rows have mask False, a zero image and label 0.
  """
  tf = common.import_tf()
  if split not in ('test', 'val', 'train'):
    raise ValueError(f"split must be 'test', 'val' or 'train', got {split!r}.")
  b = _local_rows(batch_size, process_index, process_count, 'batch_size')
  subset = _select(data_config, split)
  n = len(subset.indices)
  if n == 0:
    hint = ' (set data_config.val_fraction > 0)' if split == 'val' else ''
    raise ValueError(f'The {split!r} split of {data_config.name!r} is empty{hint}.')
  steps = -(-n // batch_size)

  indices, labels = np.asarray(subset.indices, np.int64), np.asarray(subset.labels, np.int32)

  def generate():  # a batch per call, as in train_batches
    for s in range(steps):
      g = np.arange(s * batch_size + process_index * b, s * batch_size + (process_index + 1) * b)
      valid, rows = g < n, np.minimum(g, n - 1)
      yield ([_payload(subset, i) if v else b'' for i, v in zip(rows, valid)],
             np.where(valid, indices[rows], 0), np.where(valid, labels[rows], 0), valid)

  load = _loader(subset, data_config, tf)
  blank = tf.zeros([image_size, image_size, 3], tf.uint8)
  crop_fraction = float(_get(data_config, 'eval_crop_fraction', augment.EVAL_CROP_FRACTION))
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'data_config.eval_crop_fraction must be in (0, 1], got {crop_fraction}.')

  def transform(data, index, label, valid):
    image = tf.cond(valid, lambda: augment.eval_view(load(data, index), image_size, crop_fraction),
                    lambda: blank)
    return {'image': image, 'label': label, 'mask': valid}

  ds = tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec((b,), tf.string), tf.TensorSpec((b,), tf.int64), tf.TensorSpec((b,), tf.int32),
      tf.TensorSpec((b,), tf.bool))).unbatch()
  ds = _mapped(tf, ds, transform, b)
  rows_of = lambda s: [g for g in range(s * batch_size, (s + 1) * batch_size) if g < n]
  return _track(_iterate(ds, range(steps), rows_of, subset, data_config))


# Iterators still open at exit are closed first: a tf.data generator finalised during interpreter
# shutdown prints a spurious error.
_LIVE = weakref.WeakSet()


@atexit.register
def _close_live():
  for gen in list(_LIVE):
    gen.close()


def _track(gen):
  _LIVE.add(gen)
  return gen


def _iterate(ds, steps, rows_of, subset, cfg):
  """Yields ds's numpy batches, one per step; a decode failure names the broken image."""
  import tensorflow as tf
  it = ds.as_numpy_iterator()
  try:
    for step in steps:
      try:
        batch = next(it)
      except tf.errors.InvalidArgumentError as e:  # what a failed image decode raises
        error = _corrupt_error(subset, cfg, rows_of(step))
        if error is None:
          raise
        raise error from e
      yield batch
  finally:
    del it
