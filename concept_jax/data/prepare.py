"""Prepares a data set once, before training:

  python -m concept_jax.data.prepare --data=cub200 --data_dir=~/tensorflow_datasets
  python -m concept_jax.data.prepare --data=aircraft --data_dir=DIR --manual_dir=ARCHIVE_FOLDER
  python -m concept_jax.data.prepare --data=image_folder --data_dir=DIR --manual_dir=FOLDER_ROOT
      [--skip_empty_classes]   # leave out class folders without images instead of stopping

--data takes the short names of `concept_jax.data.builders.registry.REGISTRY` (a '/config' suffix
selects a builder config, e.g. aircraft/cropped) or any tfds name. Registered tfds data sets are
downloaded by tfds; --manual_dir is where manually downloaded files live.
"""
import argparse
import sys

from concept_jax.data.builders import common, registry


def prepare(name, data_dir=None, manual_dir=None, force=False, skip_empty_classes=False):
  """Downloads (if needed) and writes the data set under data_dir; returns the tfds builder.

  skip_empty_classes: image_folder only; leave out class folders without images (else an error).
  """
  import tensorflow_datasets as tfds
  common.import_tf()
  if registry.get_spec(name).builder == 'synthetic':
    print('The synthetic data set needs no preparation (images are generated on the fly).')
    return None
  builder = registry.make_builder(name, data_dir, manual_dir,
                                  skip_empty_classes=skip_empty_classes)
  if force and builder.is_prepared():
    # Rewrite the prepared files (e.g. after replacing broken images); downloads are reused. A fresh
    # builder, because one read from disk keeps the old class names.
    import shutil
    shutil.rmtree(builder.data_dir)
    builder = registry.make_builder(name, data_dir, manual_dir,
                                    skip_empty_classes=skip_empty_classes)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  except (FileNotFoundError, ValueError):  # CorruptImageError included: they say the fix already
    raise
  except Exception as e:
    spec = registry.get_spec(name)
    if spec.builder is not None:
      raise
    if spec.manual:
      fix = (f'--manual_dir must be {spec.manual}; a file there that fails the checksum is not the '
             f'original one: download it again. Command: '
             f'{registry.prepare_command(name, data_dir, manual_dir)}')
    else:
      fix = (f'tfds downloads its files itself: check network access, or see the tfds catalogue '
             f'page of {builder.name!r} for manual downloads (put them in a folder and pass '
             f'--manual_dir; downloads are kept in {builder.data_dir_root}/downloads).')
    raise RuntimeError(f'tfds could not prepare {builder.name!r} ({type(e).__name__}: {e}).\n'
                       f'{fix}') from e
  registry.clear_cache()
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help='data set name, e.g. cub200')
  parser.add_argument('--data_dir', default=None, help='tfds data_dir (default ~/tensorflow_datasets)')
  parser.add_argument('--manual_dir', default=None, help='manually downloaded files / folder root')
  parser.add_argument('--force', action='store_true', help='prepare again even if prepared')
  parser.add_argument('--skip_empty_classes', action='store_true',
                      help='image_folder: leave out class folders without images (else an error)')
  args = parser.parse_args(argv)
  try:
    builder = prepare(args.data, args.data_dir, args.manual_dir, args.force, args.skip_empty_classes)
  except (OSError, ValueError, RuntimeError) as e:  # messages that say the fix, or the file system's
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  if builder is not None:
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f'Prepared {args.data!r} in {builder.data_dir}: {splits}; {class_summary(builder)}')
  return 0


def class_summary(builder, limit=20):
  """'3 classes: ant, bee, cat' from a prepared builder's label feature (the first `limit` names)."""
  try:
    names = list(builder.info.features['label'].names)
  except (KeyError, AttributeError):  # not a classification data set
    names = []
  if not names:
    return 'no class names recorded'
  more = f', ... ({len(names) - limit} more)' if len(names) > limit else ''
  return f'{len(names)} classes: {", ".join(names[:limit])}{more}'


if __name__ == '__main__':
  sys.exit(main())
