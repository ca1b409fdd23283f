"""Training views (torchvision RandomResizedCrop + horizontal flip) and the eval transform, in TF.

All randomness is stateless: a view's seed is derived from (run seed, global example position,
view index), so a batch is a pure function of its position in the stream (exact resume, and any
process layout sees the same pixels). Outputs are uint8; ImageNet normalisation runs on device
(`concept_jax.data.normalize`, re-exported here).

TensorFlow is imported lazily, inside the functions that need it: `ViewSpec` (defined in the
TF-free `views` module, re-exported here) and the normalisation constants import without it.
"""
from concept_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: F401 re-export
from concept_jax.data.views import ViewSpec  # noqa: F401 re-export

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before its fallback


EVAL_CROP_FRACTION = 224 / 256  # the ImageNet eval transform: Resize(256) + CenterCrop(224)


def eval_resize_size(size, crop_fraction=EVAL_CROP_FRACTION):
  """Shorter side before the eval centre crop: 256 for 224 at the default fraction, scaled alike
  for other sizes; crop_fraction 1 resizes the shorter side to `size` (no zoom, no border lost)."""
  return int(round(size / crop_fraction))


def view_seed(seed, position, view):
  """Stateless seed (int64 (2,)) of view `view` of the example at global stream `position`."""
  import tensorflow as tf
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(view, tf.int64))


def random_resized_crop_box(height, width, uniforms, scale, ratio):
  """torchvision's RandomResizedCrop.get_params, vectorised over its 10 attempts.

  Args:
    height, width: int32 scalars, the image size.
    uniforms: float32 (4, 10) in [0, 1): per attempt, area scale, log aspect ratio, top, left.
    scale, ratio: (min, max) of the area fraction and of the aspect ratio w / h.
  Returns:
    (top, left, h, w) int32 scalars: the first attempt that fits inside the image, else the
    central crop clamped to the ratio range (torchvision's fallback).
  """
  import math
  import tensorflow as tf
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = hf * wf
  target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * uniforms[1])
  # tf.round rounds half to even, like Python's round() that torchvision uses.
  w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  # torch.randint(0, H - h + 1): uniform integer in [0, H - h].
  top = tf.minimum(tf.cast(uniforms[2] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
  left = tf.minimum(tf.cast(uniforms[3] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)

  # Fallback: whole image, clamped to the allowed aspect ratios, centred.
  in_ratio = wf / hf
  fw = tf.where(in_ratio < ratio[0], width,
                tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width))
  fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
  ftop, fleft = (height - fh) // 2, (width - fw) // 2

  found = tf.reduce_any(ok)
  pick = lambda xs, fallback: tf.where(found, tf.gather(xs, first), fallback)
  return pick(top, ftop), pick(left, fleft), pick(h, fh), pick(w, fw)


def _to_uint8(x):
  import tensorflow as tf
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def train_view(image, spec, seed):
  """uint8 image (H, W, 3) -> uint8 (spec.size, spec.size, 3): random resized crop + flip.

  `seed` is an int (2,) stateless seed (see `view_seed`). The crop is resized with antialiased
  bilinear interpolation (what torchvision does for PIL images and for tensors since 0.17).
  """
  import tensorflow as tf
  u = tf.random.stateless_uniform([4 * _ATTEMPTS + 1], seed=seed)
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(shape[0], shape[1],
                                            tf.reshape(u[:4 * _ATTEMPTS], [4, _ATTEMPTS]),
                                            spec.scale, spec.ratio)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, 3]))
  out = tf.image.resize(crop, [spec.size, spec.size], method='bilinear', antialias=True)
  if spec.flip:
    out = tf.cond(u[-1] < 0.5, lambda: tf.reverse(out, axis=[1]), lambda: out)
  return _to_uint8(out)


def eval_view(image, size, crop_fraction=EVAL_CROP_FRACTION):
  """uint8 image (H, W, 3) -> uint8 (size, size, 3): resize the shorter side to
  `eval_resize_size(size, crop_fraction)` (torchvision Resize(int) arithmetic), then centre crop."""
  import tensorflow as tf
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short = eval_resize_size(size, crop_fraction)
  # torchvision: the long side becomes int(short * long / short_side) (truncation).
  new_h = tf.where(height <= width, short, (short * height) // width)
  new_w = tf.where(height <= width, (short * width) // height, short)
  out = tf.image.resize(image, tf.stack([new_h, new_w]), method='bilinear', antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  out = tf.slice(out, tf.stack([top, left, 0]), [size, size, 3])
  return _to_uint8(out)
