"""Short data set names -> tfds builders, the "not prepared" error, and reading a split into memory.

A split is read once per process into an `Examples` record (encoded image bytes, labels, file
names) and kept in a small cache: training streams, evaluations and `dataset_info` share it, and
random access by index lets the training stream seek without decoding skipped examples.

Examples are put in a canonical order, sorted by (label, file name), so that index-based choices
(sampling-rate subsets, validation hold-out) depend only on the data, not on tfds shard order.
"""
import contextlib
import dataclasses
import fcntl
import functools
import io
import logging
import os
import sys

import numpy as np

from concept_jax.data.builders import common, synthetic
from concept_jax.data.builders.common import DataNotPreparedError  # noqa: F401 re-export


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one data set. `builder`: our own builder ('aircraft', 'image_folder', 'digits'),
  'synthetic', or None for a data set registered in tfds under `tfds_name`."""
  tfds_name: str | None
  train_split: str = 'train'
  test_split: str = 'test'
  num_classes: int | None = None  # informational; the prepared data's ClassLabel is authoritative
  image_key: str = 'image'
  label_key: str = 'label'
  name_key: str | None = None  # a per-example file name or id (image lists, canonical order)
  builder: str | None = None
  manual: str = ''  # what to put in --manual_dir, for data sets that need it


REGISTRY = {
    'cub200': DatasetSpec('caltech_birds2011', num_classes=200, name_key='image/filename'),
    # tfds's cars196 URLs (ai.stanford.edu) no longer serve the files; tfds takes them from
    # --manual_dir by their original names and checks them against its recorded SHA-256.
    'stanford_cars': DatasetSpec('cars196', num_classes=196, name_key='id',
                                 manual='a folder holding the original Stanford Cars release files '
                                 'cars_train.tgz, cars_test.tgz, car_devkit.tgz and '
                                 'cars_test_annos_withlabels.mat (kept by name, unextracted)'),
    # Flowers and DTD: train on train+validation (2,040 / 3,760 images), as is usual for transfer.
    'flowers102': DatasetSpec('oxford_flowers102', train_split='train+validation',
                              num_classes=102, name_key='file_name'),
    'pets': DatasetSpec('oxford_iiit_pet', num_classes=37, name_key='file_name'),
    'dtd': DatasetSpec('dtd', train_split='train+validation', num_classes=47, name_key='file_name'),
    'caltech101': DatasetSpec('caltech101', num_classes=102, name_key='image/file_name'),
    'cifar10': DatasetSpec('cifar10', num_classes=10, name_key='id'),
    'cifar100': DatasetSpec('cifar100', num_classes=100, name_key='id'),
    'aircraft': DatasetSpec('fgvc_aircraft', num_classes=100, name_key='file_name',
                            builder='aircraft',
                            manual='a folder holding fgvc-aircraft-2013b.tar.gz (or its extracted '
                            'fgvc-aircraft-2013b/) from https://www.robots.ox.ac.uk/~vgg/data/'
                            'fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz (without '
                            '--manual_dir, prepare tries that download itself)'),
    'image_folder': DatasetSpec('user_image_folder', name_key='file_name', builder='image_folder',
                                manual='your folder root, holding train/<class>/*.jpg and '
                                'test/<class>/*.jpg'),
    'digits': DatasetSpec('sklearn_digits', num_classes=10, name_key='file_name', builder='digits'),
    # Real MNIST digits with a planted feature (the negative-transfer benchmark); data.planted.
    'coloured_mnist': DatasetSpec('coloured_mnist', num_classes=5, name_key='file_name',
                                  builder='coloured_mnist'),
    'synthetic': DatasetSpec(None, builder='synthetic'),
}
_OFFLINE = ('digits', 'coloured_mnist')  # builders that prepare themselves on first use
_NAME_KEYS = ('file_name', 'image/filename', 'image/file_name', 'filename', 'id')


def split_name(name):
  """'aircraft/cropped' -> ('aircraft', 'cropped'); 'cub200' -> ('cub200', None)."""
  base, _, config = name.partition('/')
  return base, (config or None)


def get_spec(name):
  """The spec of a short name; any other name is taken as a tfds name with default keys."""
  base, _ = split_name(name)
  return REGISTRY.get(base) or DatasetSpec(base)


def resolve_data_dir(data_dir):
  """The tfds data_dir actually used: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  d = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(os.fspath(d)))


def prepare_command(name, data_dir, manual_dir=None):
  """The shell command that prepares a data set."""
  spec = get_spec(name)
  cmd = f'python -m concept_jax.data.prepare --data={name} --data_dir={resolve_data_dir(data_dir)}'
  if spec.manual:
    cmd += f' --manual_dir={manual_dir or "MANUAL_DIR"}'
  return cmd


def make_builder(name, data_dir, manual_dir=None, planted=None, skip_empty_classes=False):
  """A tfds builder for a data name (short name, optionally '/config', or any tfds name).
  planted: coloured_mnist's options (data.planted; None: its defaults).
  skip_empty_classes: image_folder only; leave out class folders without images (else an error).
  """
  import tensorflow_datasets as tfds
  spec = get_spec(name)
  _, config = split_name(name)
  data_dir = resolve_data_dir(data_dir)
  if spec.builder == 'synthetic':
    raise ValueError('The synthetic data set has no builder: its images are generated on the fly.')
  if spec.builder == 'aircraft':
    from concept_jax.data.builders import aircraft
    return aircraft.FgvcAircraft(data_dir=data_dir, config=config)
  if spec.builder == 'digits':
    from concept_jax.data.builders import digits
    return digits.SklearnDigits(data_dir=data_dir)
  if spec.builder == 'coloured_mnist':
    from concept_jax.data.builders import coloured_mnist
    config = coloured_mnist.builder_config(coloured_mnist.options(planted))
    return coloured_mnist.ColouredMnist(data_dir=data_dir, config=config)
  if spec.builder == 'image_folder':
    from concept_jax.data.builders import image_folder
    if not manual_dir:
      raise ValueError('image_folder needs data_config.manual_dir (prepare: --manual_dir) = '
                       'the folder root holding train/<class>/ and test/<class>/.')
    return image_folder.UserImageFolder(
        data_dir=data_dir, config=image_folder.image_folder_config(manual_dir, skip_empty_classes))
  tfds_name = spec.tfds_name + (f'/{config}' if config else '')
  try:
    return tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown data set {name!r}. Use one of {sorted(REGISTRY)} or a tfds '
                     'data set name.') from e


@contextlib.contextmanager
def _tfds_output_held():
  """Holds back what tfds prints while it finds and prepares an offline set on first use (a warning
  about the folder it is about to fill, its notices, a progress bar per split: a screen of `make
  demo` on a fresh machine per data set) and shows it only if that fails. Yields the real stdout."""
  stdout, held, absl_logger = sys.stdout, io.StringIO(), logging.getLogger('absl')
  handler, propagate = logging.StreamHandler(held), absl_logger.propagate
  absl_logger.addHandler(handler)
  absl_logger.propagate = False
  try:
    with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
      yield stdout
  except BaseException:
    sys.stderr.write(held.getvalue())
    raise
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.propagate = propagate


def prepared_builder(name, data_dir, manual_dir=None, planted=None):
  """make_builder, checked to be prepared. The offline sets (digits, coloured_mnist) are prepared on
  first use; any other unprepared data set raises DataNotPreparedError with the command that
  prepares it."""
  spec = get_spec(name)
  offline = spec.builder in _OFFLINE
  with _tfds_output_held() if offline else contextlib.nullcontext():
    builder = make_builder(name, data_dir, manual_dir, planted)
    prepared = builder.is_prepared()
  if prepared:
    # tfds reads a data set's info when its builder is made: one made while another process (main's
    # --workers, a `prepare` command) was finishing the data holds no splits and fails to read them.
    return builder if builder.info.splits else make_builder(name, data_dir, manual_dir, planted)
  if offline:
    # One process prepares, others (main's --workers) wait and then read what it wrote.
    os.makedirs(resolve_data_dir(data_dir), exist_ok=True)
    with open(os.path.join(resolve_data_dir(data_dir), '.concept_jax_prepare.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      with _tfds_output_held() as stdout:
        builder = make_builder(name, data_dir, manual_dir, planted)
        if not builder.is_prepared():
          print(f'Preparing {builder.info.full_name} in {resolve_data_dir(data_dir)} (once, a few '
                'seconds)', file=stdout, flush=True)
          builder.download_and_prepare()
    return builder
  msg = (f'Data set {name!r} (tfds {builder.name!r}) is not prepared in '
         f'{resolve_data_dir(data_dir)}. Prepare it once with:\n  '
         f'{prepare_command(name, data_dir, manual_dir)}')
  if spec.manual:
    msg += f'\nwhere --manual_dir is {spec.manual}.'
  raise DataNotPreparedError(msg)


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split in memory, canonical order. images: encoded bytes per example, or None for
  synthetic data (images made from the index). labels: int64 (N,) ids of the full data set."""
  labels: np.ndarray
  names: np.ndarray
  images: tuple | None
  class_names: tuple
  name: str
  split: str


def _read_tfds(name, data_dir, manual_dir, split, planted):
  import tensorflow_datasets as tfds
  common.import_tf()
  spec = get_spec(name)
  builder = prepared_builder(name, data_dir, manual_dir, planted)
  features = builder.info.features
  name_key = spec.name_key or next((k for k in _NAME_KEYS if k in features), None)
  keep = {spec.image_key: True, spec.label_key: True}
  if name_key:
    keep[name_key] = True
  ds = builder.as_dataset(
      split=spec.train_split if split == 'train' else spec.test_split, shuffle_files=False,
      decoders=tfds.decode.PartialDecoding(keep, decoders={spec.image_key: tfds.decode.SkipDecoding()}))
  images, labels, names = [], [], []
  for i, ex in enumerate(ds.as_numpy_iterator()):
    images.append(ex[spec.image_key])
    labels.append(int(ex[spec.label_key]))
    n = ex[name_key] if name_key else str(i)
    names.append(n.decode() if isinstance(n, bytes) else str(n))
  labels, names = np.asarray(labels, np.int64), np.asarray(names, dtype=str)
  order = np.lexsort((names, labels))  # canonical order: by label, then file name
  return Examples(labels[order], names[order], tuple(images[i] for i in order),
                  tuple(features[spec.label_key].names), name, split)


_SYN_KEYS = ('num_classes', 'train_per_class', 'test_per_class', 'image_size', 'noise', 'seed')


@functools.lru_cache(maxsize=8)
def _cached_examples(name, data_dir, manual_dir, split, synthetic_options, planted):
  if get_spec(name).builder == 'synthetic':
    labels = synthetic.labels(split, dict(zip(_SYN_KEYS, synthetic_options)))
    names = np.asarray([f'synthetic/{split}/{i:06d}' for i in range(len(labels))], dtype=str)
    class_names = tuple(f'class_{c:03d}' for c in range(synthetic_options[0]))
    return Examples(labels, names, None, class_names, name, split)
  return _read_tfds(name, data_dir, manual_dir, split, planted)


def load_examples(data_config, split):
  """The 'train' or 'test' split of `data_config.name`, all examples, canonical order (cached)."""
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  get = lambda k: data_config.get(k, None)
  data_dir = resolve_data_dir(get('data_dir'))
  manual_dir = os.path.abspath(os.path.expanduser(get('manual_dir'))) if get('manual_dir') else None
  planted = None
  if get_spec(data_config.name).builder == 'coloured_mnist':
    from concept_jax.data.builders import coloured_mnist
    planted = coloured_mnist.options(get('planted'))  # validated and hashable: part of the cache key
  return _cached_examples(data_config.name, data_dir, manual_dir, split,
                          synthetic.options_tuple(get('synthetic')), planted)


def clear_cache():
  """Forgets splits read so far (e.g. after preparing a data set again)."""
  _cached_examples.cache_clear()
