"""Prepares a data set once, before training:

  python -m concept_jax.data.prepare --data=cub200 --data_dir=~/tensorflow_datasets
  python -m concept_jax.data.prepare --data=aircraft --data_dir=DIR --manual_dir=ARCHIVE_FOLDER
  python -m concept_jax.data.prepare --data=image_folder --data_dir=DIR --manual_dir=FOLDER_ROOT

--data takes the short names of `concept_jax.data.builders.registry.REGISTRY` (a '/config' suffix
selects a builder config, e.g. aircraft/cropped) or any tfds name. Registered tfds data sets are
downloaded by tfds; --manual_dir is where manually downloaded files live.
"""
import argparse
import sys

from concept_jax.data.builders import common, registry


def prepare(name, data_dir=None, manual_dir=None, force=False):
  """Downloads (if needed) and writes the data set under data_dir; returns the tfds builder."""
  import tensorflow_datasets as tfds
  common.import_tf()
  if registry.get_spec(name).builder == 'synthetic':
    print('The synthetic data set needs no preparation (images are generated on the fly).')
    return None
  builder = registry.make_builder(name, data_dir, manual_dir)
  if force and builder.is_prepared():
    # Rewrite the prepared files (e.g. after replacing broken images); downloads are reused. A fresh
    # builder, because one read from disk keeps the old class names.
    import shutil
    shutil.rmtree(builder.data_dir)
    builder = registry.make_builder(name, data_dir, manual_dir)
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
  args = parser.parse_args(argv)
  try:
    builder = prepare(args.data, args.data_dir, args.manual_dir, args.force)
  except (FileNotFoundError, ValueError, RuntimeError) as e:  # messages that say the fix
    print(f'prepare: error: {e}', file=sys.stderr)
    return 2
  if builder is not None:
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f'Prepared {args.data!r} in {builder.data_dir}: {splits}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
