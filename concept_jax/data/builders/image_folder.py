"""A user's folder of images as a tfds builder.

Layout:  root/train/<class name>/*.jpg   and   root/test/<class name>/*.jpg
(any of common.IMAGE_EXTENSIONS). Class ids are the class folder names of train/ in sorted order;
test/ may omit classes but may not add any. Every image is decoded once at prepare time: broken
files are all listed in one error before anything is written. A class folder without images is an
error (the model would silently get one class fewer), or with skip_empty_classes a warning; other
files are skipped with a warning that lists them.

Each root gets its own tfds config (folder name + hash of the absolute path), so several folders can
share one data_dir; the root must therefore be given (as manual_dir) when reading, too.
"""
import dataclasses
import hashlib
import os
import re
import sys

import tensorflow_datasets as tfds

from concept_jax.data.builders import common

SPLITS = ('train', 'test')


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  root: str = ''
  skip_empty_classes: bool = False  # leave out class folders without images (with a warning)


def image_folder_config(root, skip_empty_classes=False):
  """The builder config of one folder root."""
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  slug = re.sub(r'[^a-zA-Z0-9_]+', '_', os.path.basename(root.rstrip('/'))).strip('_') or 'root'
  digest = hashlib.sha1(root.encode()).hexdigest()[:8]
  return ImageFolderConfig(name=f'{slug}_{digest}', description=f'Images under {root}', root=root,
                           skip_empty_classes=skip_empty_classes)


def _warn(message):
  print(f'prepare: warning: {message}', file=sys.stderr, flush=True)


def _some(paths, limit=20):
  return ''.join(f'\n  {p}' for p in paths[:limit]) + (
      f'\n  ... and {len(paths) - limit} more' if len(paths) > limit else '')


def scan(root, skip_empty_classes=False):
  """{split: [(path, class name)]} and the sorted class names, with layout errors explained.

  Raises ValueError naming every class folder without images, unless skip_empty_classes (then they
  are left out with a warning); warns about every other file it skips.
  """
  layout = ('Expected root/train/<class>/<image> and root/test/<class>/<image> '
            f'(extensions {", ".join(common.IMAGE_EXTENSIONS)}).')
  for split in SPLITS:
    if not os.path.isdir(os.path.join(root, split)):
      raise FileNotFoundError(f'No {split}/ folder in {root}. {layout}')
  listing, empty, skipped = {}, [], []
  for split in SPLITS:
    folder = os.path.join(root, split)
    entries = sorted(d for d in os.listdir(folder) if not d.startswith('.'))
    classes = [d for d in entries if os.path.isdir(os.path.join(folder, d))]
    skipped += [os.path.join(folder, d) for d in entries if d not in classes]
    listing[split] = []
    for c in classes:
      images = common.list_images(os.path.join(folder, c))
      listing[split] += [(p, c) for p in images]
      skipped += sorted(set(os.path.join(folder, c, f) for f in os.listdir(os.path.join(folder, c))
                            if not f.startswith('.')) - set(images))
      if not images:
        empty.append(os.path.join(folder, c))
    if not listing[split]:
      raise FileNotFoundError(f'No images in {folder}/<class>/. {layout}')
  if empty and not skip_empty_classes:
    raise ValueError(f'{len(empty)} class folder(s) hold no images:{_some(empty)}\nAdd images, '
                     'delete the folders, or prepare with --skip_empty_classes to leave them out.')
  if empty:
    _warn(f'left out {len(empty)} class folder(s) without images:{_some(empty)}')
  if skipped:
    _warn(f'skipped {len(skipped)} file(s) that are not images '
          f'({", ".join(common.IMAGE_EXTENSIONS)}):{_some(skipped)}')
  class_names = sorted({c for _, c in listing['train']})
  extra = sorted({c for _, c in listing['test']} - set(class_names))
  if extra:
    raise ValueError(f'Classes {extra} have test images in {root}/test but no training images in '
                     f'{root}/train. Add training images or remove those test folders.')
  return listing, class_names


class UserImageFolder(tfds.core.GeneratorBasedBuilder):
  """root/{train,test}/<class>/<image> -> tfds splits 'train' and 'test'."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    # Class names are set from the folder at prepare time; file names are '<split>/<class>/<file>'.
    return common.classification_info(self, 'Images from a user folder, one sub-folder per class.')

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = self.builder_config.root
    listing, class_names = scan(root, self.builder_config.skip_empty_classes)
    self.info.features['label'].names = class_names
    common.check_images([p for rows in listing.values() for p, _ in rows],
                        fix='Delete or replace these files, then run the prepare command again.')
    return {split: self._generate_examples(root, rows) for split, rows in listing.items()}

  def _generate_examples(self, root, rows):
    for path, class_name in rows:
      rel = os.path.relpath(path, root).replace(os.sep, '/')
      yield rel, {'image': common.image_bytes(path), 'label': class_name, 'file_name': rel}
