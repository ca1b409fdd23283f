"""FGVC-Aircraft 2013b (100 variants) as a tfds builder.

Reads the official archive layout:
  fgvc-aircraft-2013b/data/images/<id>.jpg
  fgvc-aircraft-2013b/data/variants.txt                    one variant name per line (label order)
  fgvc-aircraft-2013b/data/images_variant_{trainval,test}.txt   '<id> <variant name>' per line
from, in this order: the extracted folder `fgvc-aircraft-2013b/` in the manual dir, the archive
`fgvc-aircraft-2013b.tar.gz` in the manual dir, or a download of ARCHIVE_URL.

Splits: 'train' = trainval (6,667 images, what tllib trains on), 'test' (3,333).

Copyright banner: every image carries a 20-pixel banner at the bottom. Config 'full' (the default)
keeps it, byte-identical to the archive, as tllib (whose numbers we compare against) does; config
'cropped' removes the bottom 20 rows (re-encoded as JPEG quality 95), as many other papers do.
Select it with data name 'aircraft/cropped'.
"""
import dataclasses
import os

import tensorflow_datasets as tfds

from concept_jax.data.builders import common

ARCHIVE = 'fgvc-aircraft-2013b.tar.gz'
ARCHIVE_URL = 'https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/' + ARCHIVE
FOLDER = 'fgvc-aircraft-2013b'
BANNER_ROWS = 20


@dataclasses.dataclass(eq=False)
class AircraftConfig(tfds.core.BuilderConfig):
  crop_bottom: int = 0


class FgvcAircraft(tfds.core.GeneratorBasedBuilder):
  """FGVC-Aircraft 2013b, variant level (100 classes)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      AircraftConfig(name='full', description='Images as in the archive (with the banner).'),
      AircraftConfig(name='cropped', description='Bottom 20-pixel copyright banner removed.',
                     crop_bottom=BANNER_ROWS),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {ARCHIVE} from {ARCHIVE_URL} and put it (or its extracted folder {FOLDER}/) in '
      'the manual dir.')

  def _info(self):
    # Class names come from variants.txt at prepare time.
    return common.classification_info(self, 'FGVC-Aircraft 2013b, 100 aircraft variants.',
                                      homepage='https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/')

  def _find_root(self, dl_manager):
    try:
      manual = dl_manager.manual_dir
    except (AssertionError, ValueError):  # no manual dir, or an empty one
      manual = None
    if manual is not None:
      for cand in (os.path.join(manual, FOLDER), os.fspath(manual)):
        if os.path.exists(os.path.join(cand, 'data', 'variants.txt')):
          return cand
      if os.path.exists(os.path.join(manual, ARCHIVE)):
        return os.path.join(dl_manager.extract(os.path.join(manual, ARCHIVE)), FOLDER)
    try:
      return os.path.join(dl_manager.download_and_extract(ARCHIVE_URL), FOLDER)
    except Exception as e:
      raise RuntimeError(
          f'Could not download {ARCHIVE_URL} ({type(e).__name__}: {e}). Download it yourself, put '
          f'{ARCHIVE} (or the extracted {FOLDER}/) in a folder and pass that folder as '
          '--manual_dir to `python -m concept_jax.data.prepare --data=aircraft ...`.') from e

  def _split_generators(self, dl_manager):
    data = os.path.join(self._find_root(dl_manager), 'data')
    with open(os.path.join(data, 'variants.txt')) as f:
      variants = [line.strip() for line in f if line.strip()]
    self.info.features['label'].names = variants
    splits = {}
    for split, list_name in (('train', 'trainval'), ('test', 'test')):
      with open(os.path.join(data, f'images_variant_{list_name}.txt')) as f:
        rows = [line.strip().split(' ', 1) for line in f if line.strip()]
      splits[split] = [(os.path.join(data, 'images', f'{img}.jpg'), variant) for img, variant in rows]
    common.check_images(
        [p for rows in splits.values() for p, _ in rows],
        fix=f'Re-extract {ARCHIVE} (or download it again) and rerun the prepare command.')
    return {split: self._generate_examples(rows) for split, rows in splits.items()}

  def _generate_examples(self, rows):
    crop = self.builder_config.crop_bottom
    for path, variant in rows:
      name = os.path.basename(path)
      yield name, {'image': common.image_bytes(path, crop_bottom=crop), 'label': variant,
                   'file_name': name}
