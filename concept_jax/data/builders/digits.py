"""The embedded demo data set: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
classes), upscaled to 32x32 RGB uint8. Works offline: the data ships inside the scikit-learn wheel.

Upscaling: pixel values 0..16 -> 0..255, bilinear resize 8 -> 32 (PIL), grey copied to 3 channels.
Split: per class, a fixed shuffle (numpy Generator seeded with [0, class]) sends the first
round(30%) of the class to 'test' and the rest to 'train' (1,258 train / 539 test).
"""
import numpy as np
import tensorflow_datasets as tfds

from concept_jax.data.builders import common

IMAGE_SIZE = 32
TEST_FRACTION = 0.3


def digits_arrays():
  """(images uint8 (1797, 32, 32, 3), labels int64 (1797,), is_test bool (1797,))."""
  from PIL import Image
  from sklearn.datasets import load_digits
  data = load_digits()
  small = np.clip(np.round(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  big = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
                  for im in small])
  images = np.repeat(big[..., None], 3, axis=-1)
  labels = data.target.astype(np.int64)
  is_test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    idx = idx[np.random.default_rng([0, c]).permutation(len(idx))]
    is_test[idx[:int(round(TEST_FRACTION * len(idx)))]] = True
  return images, labels, is_test


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits at 32x32 RGB; 'train' and 'test' splits."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return common.classification_info(
        self, 'scikit-learn 8x8 digits, upscaled to 32x32 RGB.',
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), class_names=[str(d) for d in range(10)],
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html')

  def _split_generators(self, dl_manager):
    del dl_manager  # offline
    images, labels, is_test = digits_arrays()
    return {'train': self._generate_examples(images, labels, np.flatnonzero(~is_test)),
            'test': self._generate_examples(images, labels, np.flatnonzero(is_test))}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      name = f'digit_{i:04d}'
      yield name, {'image': images[i], 'label': int(labels[i]), 'file_name': name}
