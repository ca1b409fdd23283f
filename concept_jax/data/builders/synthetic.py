"""Synthetic images generated on the fly (no builder, nothing on disk).

Deterministic and learnable: class c has two colours A_c, B_c and a stripe pattern (frequency f_c,
angle a_c), drawn once from a numpy Generator seeded with [options.seed, 1234]. Example i shows
  A_c + (B_c - A_c) * (1 + sin(2 pi f_c (x cos a_c + y sin a_c) + phase_i)) / 2 + noise_i
with a random phase and Gaussian pixel noise (std options.noise, in 0..255 units) drawn statelessly
from (options.seed, split, i): the same example always has the same pixels. Examples are sorted by
class: example i of a split belongs to class i // per_class. Defaults are shaped like CUB-200-2011
(200 classes, 30 training / 29 test images per class).
"""
import math

import numpy as np

SPLIT_IDS = {'train': 0, 'test': 1}


def options_tuple(opts):
  """Hashable (num_classes, train_per_class, test_per_class, image_size, noise, seed)."""
  get = lambda k, d: opts.get(k, d) if opts is not None else d
  return (int(get('num_classes', 200)), int(get('train_per_class', 30)),
          int(get('test_per_class', 29)), int(get('image_size', 64)), float(get('noise', 20.0)),
          int(get('seed', 0)))


def labels(split, opts):
  """(N,) int64 class ids of a split: per_class examples of each class, in class order."""
  num_classes, n_train, n_test = options_tuple(opts)[:3]
  return np.repeat(np.arange(num_classes, dtype=np.int64), n_train if split == 'train' else n_test)


def class_table(opts):
  """Per-class appearance: colours A, B (C, 3) in 0..255, frequency (C,), angle (C,)."""
  num_classes, *_, seed = options_tuple(opts)
  rng = np.random.default_rng([seed, 1234])
  a = rng.uniform(30, 225, (num_classes, 3))
  b = rng.uniform(30, 225, (num_classes, 3))
  freq = rng.uniform(1.0, 4.0, num_classes)
  angle = rng.uniform(0.0, math.pi, num_classes)
  return (a.astype(np.float32), b.astype(np.float32), freq.astype(np.float32),
          angle.astype(np.float32))


def make_image_fn(split, opts):
  """Returns a TF function (index int64 scalar, label int scalar) -> uint8 (S, S, 3) image."""
  import tensorflow as tf
  _, _, _, size, noise, seed = options_tuple(opts)
  a, b, freq, angle = (tf.constant(t) for t in class_table(opts))
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size
  yy, xx = (tf.constant(t) for t in np.meshgrid(coords, coords, indexing='ij'))
  split_id = SPLIT_IDS[split]

  def image(index, label):
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, split_id], tf.int64), tf.cast(index, tf.int64))
    phase = tf.random.stateless_uniform([], key, maxval=2 * math.pi)
    eps = tf.random.stateless_normal([size, size, 3], tf.stack([key[0], key[1] + 1]))
    ang = tf.gather(angle, label)
    t = xx * tf.cos(ang) + yy * tf.sin(ang)
    stripes = 0.5 * (1.0 + tf.sin(2 * math.pi * tf.gather(freq, label) * t + phase))
    ca, cb = tf.gather(a, label), tf.gather(b, label)
    img = ca + (cb - ca) * stripes[..., None] + noise * eps
    return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)

  return image
