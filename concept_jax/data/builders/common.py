"""Helpers shared by our tfds builders: TF without GPUs, image validation with readable errors."""
import io
import logging
import os

# Formats stored as they are; anything else (or an unusual colour mode) is re-encoded as PNG so that
# tf.io.decode_image can read every stored image.
_PASS_THROUGH = {'JPEG': ('L', 'RGB'), 'PNG': ('L', 'LA', 'RGB', 'RGBA', 'P')}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


class CorruptImageError(ValueError):
  """Raised when images cannot be decoded; the message lists them and says how to fix it."""


class DataNotPreparedError(FileNotFoundError):
  """Raised when a data set has not been prepared; the message gives the prepare command."""


# tfds warnings that our own builders cause by design, on every run: builder configs made from options
# (coloured_mnist, image_folder) and tfds's own use of a deprecated field. They would bury the progress.
_TFDS_NOISE = ('Using custom data configuration', '`FeatureConnector.dtype` is deprecated')


class _DropTfdsNoise(logging.Filter):

  def filter(self, record):
    return not any(n in str(record.msg) for n in _TFDS_NOISE)


def import_tf():
  """Imports TensorFlow and hides every GPU from it (the accelerators belong to JAX); hides TF's C++
  INFO lines and the tfds warnings in _TFDS_NOISE.

  TF runs only the input pipeline here (decoding, crops, resizing), which oneDNN's kernels (convolutions,
  matrix products) do not touch: with its optimisations off (unless the user set TF_ENABLE_ONEDNN_OPTS)
  the batches are the same bytes (tests/test_data_pipeline.py), the pipeline takes 11-17% less CPU, and
  TF no longer prints its oneDNN notice, which TF_CPP_MIN_LOG_LEVEL does not hide since TF 2.21.
  Each op runs on one thread (unless the user set TF_NUM_INTRAOP_THREADS): tf.data's parallel map
  already keeps the cores busy with whole examples, and splitting one small image's ops over TF's
  intra-op pool cost more in hand-offs than it saved (2 cores: 20.6 -> 14.6 ms of CPU per four-view
  batch of 32 digits, the same bytes: every output pixel is computed alike on any thread).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  os.environ.setdefault('TF_NUM_INTRAOP_THREADS', '1')
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _DropTfdsNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_DropTfdsNoise())
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: too late to hide them, and harmless.
    pass
  return tf


def check_image(path):
  """Fully decodes one image file with PIL. Returns None if it is fine, else the reason (str)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
  except Exception as e:  # PIL raises many exception types for broken files.
    return f'{type(e).__name__}: {e}'
  return None


def check_images(paths, *, fix):
  """Decodes every file; raises CorruptImageError listing all the bad ones and `fix`."""
  bad = [(p, reason) for p in paths if (reason := check_image(p)) is not None]
  if bad:
    lines = '\n'.join(f'  {p}  ({reason})' for p, reason in bad[:50])
    more = f'\n  ... and {len(bad) - 50} more' if len(bad) > 50 else ''
    raise CorruptImageError(f'{len(bad)} image file(s) cannot be decoded:\n{lines}{more}\n{fix}')


def image_bytes(path, crop_bottom=0):
  """Encoded bytes of an image file, ready for tfds.features.Image.

  JPEG/PNG files in common colour modes pass through unchanged (no re-encoding loss); other formats
  are re-encoded as PNG. `crop_bottom` > 0 removes that many pixel rows at the bottom (re-encoded
  as JPEG, quality 95).
  """
  from PIL import Image
  with Image.open(path) as im:
    if crop_bottom:
      im = im.convert('RGB')
      im = im.crop((0, 0, im.width, im.height - crop_bottom))
      buf = io.BytesIO()
      im.save(buf, format='JPEG', quality=95)
      return buf.getvalue()
    if im.format in _PASS_THROUGH and im.mode in _PASS_THROUGH[im.format]:
      with open(path, 'rb') as f:
        return f.read()
    buf = io.BytesIO()
    im.convert('RGB').save(buf, format='PNG')
    return buf.getvalue()


def list_images(folder):
  """Sorted image files (by extension) directly inside `folder`."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


def classification_info(builder, description: str, *, image_shape=None, class_names=None,
                        homepage=None):
  """The tfds DatasetInfo every builder of ours shares: image, label and the source file name.

  class_names None: set later (from the folder or the archive) at prepare time.
  """
  import tensorflow_datasets as tfds
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=image_shape),
          'label': tfds.features.ClassLabel(names=class_names),
          'file_name': tfds.features.Text(),  # where the example came from, for error messages
      }),
      supervised_keys=('image', 'label'),
      homepage=homepage,
  )
