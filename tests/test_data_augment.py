"""RandomResizedCrop (against a plain-Python torchvision reference), views, eval transform."""
import math
import subprocess
import sys

import numpy as np
import pytest

from concept_jax.data import augment
from concept_jax.data.builders import common

tf = common.import_tf()


def _torchvision_box(height, width, u, scale, ratio):
  """torchvision RandomResizedCrop.get_params, with its random draws taken from u (4, 10)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for k in range(10):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * float(np.float32(u[0, k])))
    aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(np.float32(u[1, k])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u[2, k] * (height - h + 1)), int(u[3, k] * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@tf.function
def _boxes(height, width, uniforms, scale, ratio):
  return tf.map_fn(lambda u: tf.stack(augment.random_resized_crop_box(height, width, u, scale, ratio)),
                   uniforms, fn_output_signature=tf.int32)


@pytest.mark.parametrize('hw,scale,ratio', [((100, 100), (0.08, 1.0), (3 / 4, 4 / 3)),
                                            ((60, 90), (0.2, 1.0), (3 / 4, 4 / 3)),
                                            ((12, 200), (0.5, 1.0), (3 / 4, 4 / 3)),  # fallback
                                            ((200, 12), (0.9, 1.0), (3 / 4, 4 / 3))])
def test_crop_box_matches_torchvision(hw, scale, ratio):
  u = np.random.default_rng(0).random((300, 4, 10)).astype(np.float32)
  got = _boxes(hw[0], hw[1], tf.constant(u), scale, ratio).numpy()
  # float32 (TF) vs float64 (reference) arithmetic may round a box side differently in rare ties.
  ref = np.array([_torchvision_box(*hw, ui, scale, ratio) for ui in u])
  assert np.mean(np.all(got == ref, axis=1)) > 0.98
  assert np.all(got[:, 0] >= 0) and np.all(got[:, 1] >= 0)
  assert np.all(got[:, 0] + got[:, 2] <= hw[0]) and np.all(got[:, 1] + got[:, 3] <= hw[1])


def test_scale_and_ratio_respected_statistically():
  u = np.random.default_rng(1).random((2000, 4, 10)).astype(np.float32)
  scale, ratio = (0.2, 0.6), (3 / 4, 4 / 3)
  top, left, h, w = _boxes(200, 200, tf.constant(u), scale, ratio).numpy().T
  frac = h * w / 200 ** 2
  assert frac.min() > 0.19 and frac.max() < 0.61
  assert abs(frac.mean() - 0.4) < 0.01  # the first attempt always fits here: uniform area
  aspect = w / h
  assert aspect.min() > 0.73 and aspect.max() < 1.37
  assert abs(np.mean(np.log(aspect))) < 0.02
  assert abs(np.mean(top / (200 - h + 1)) - 0.5) < 0.03


def test_train_view_shape_dtype_determinism():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (37, 53, 3)), tf.uint8)
  spec = augment.ViewSpec(size=24, scale=(0.2, 1.0))
  one = augment.train_view(image, spec, augment.view_seed(7, 11, 0))
  assert one.shape == (24, 24, 3) and one.dtype == tf.uint8
  np.testing.assert_array_equal(one, augment.train_view(image, spec, augment.view_seed(7, 11, 0)))
  assert not np.array_equal(one, augment.train_view(image, spec, augment.view_seed(7, 11, 1)))
  assert not np.array_equal(one, augment.train_view(image, spec, augment.view_seed(8, 11, 0)))
  # A full-image crop of a constant image stays constant (resize keeps values, flip is harmless).
  flat = tf.fill([20, 30, 3], tf.constant(77, tf.uint8))
  full = augment.train_view(flat, augment.ViewSpec(16, scale=(1.0, 1.0), ratio=(1.5, 1.5)),
                            augment.view_seed(0, 0, 0))
  assert np.all(full.numpy() == 77)


def test_flip_happens_about_half_the_time():
  image = tf.constant(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3)))
  spec = augment.ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  flips = [augment.train_view(image, spec, augment.view_seed(0, g, 0)).numpy()[0, 0, 0] > 100
           for g in range(200)]
  assert 70 < sum(flips) < 130


def test_eval_view_resizes_shorter_side_and_centre_crops():
  assert augment.eval_resize_size(224) == 256
  assert augment.eval_resize_size(32) == 37
  # 37 x 50 at size 32: the resize is the identity (shorter side already 37), crop offsets
  # round(2.5) = 2 (half to even, as torchvision's Python round) and round(9) = 9.
  image = np.random.default_rng(0).integers(0, 256, (37, 50, 3)).astype(np.uint8)
  out = augment.eval_view(tf.constant(image), 32).numpy()
  np.testing.assert_array_equal(out, image[2:34, 9:41])
  tall = augment.eval_view(tf.zeros([300, 100, 3], tf.uint8), 224)
  assert tall.shape == (224, 224, 3) and tall.dtype == tf.uint8


def _pil_bilinear(image, width, height):
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR)).astype(int)


@pytest.mark.parametrize('hw, size', [((90, 120), 48), ((150, 200), 37), ((20, 30), 48)])
def test_train_view_resize_matches_pil_bilinear(hw, size):
  # torchvision resizes PIL crops with PIL's antialiased bilinear filter; PIL works in 8-bit fixed
  # point, so one level of rounding difference is expected, no more. A full-image crop isolates the
  # resize (down by up to 4x, and up).
  image = np.random.default_rng(0).integers(0, 256, hw + (3,)).astype(np.uint8)
  ratio = (hw[1] / hw[0],) * 2
  spec = augment.ViewSpec(size=size, scale=(1.0, 1.0), ratio=ratio, flip=False)
  got = augment.train_view(tf.constant(image), spec, augment.view_seed(0, 0, 0)).numpy().astype(int)
  want = _pil_bilinear(image, size, size)
  assert np.abs(got - want).max() <= 1
  assert np.mean(got != want) < 0.2


def test_eval_view_matches_pil_resize_and_centre_crop():
  image = np.random.default_rng(1).integers(0, 256, (300, 400, 3)).astype(np.uint8)
  got = augment.eval_view(tf.constant(image), 224).numpy().astype(int)
  resized = _pil_bilinear(image, 341, 256)   # torchvision Resize(256): long side int(256 * 4 / 3)
  want = resized[16:240, 58:282]             # CenterCrop(224): round(16.0), round(58.5) = 58
  assert np.abs(got - want).max() <= 1


def test_normalize():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  got = np.asarray(augment.normalize(images))
  want = (images / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.dtype == np.float32


def test_importable_without_tensorflow():
  code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
          "from concept_jax.data import augment, normalize, pipeline, splits\n"
          "augment.ViewSpec(224); pipeline.default_data_config()\n"
          "import numpy as np; normalize.normalize(np.zeros((1, 2, 2, 3), np.uint8))\n")
  subprocess.run([sys.executable, '-c', code], check=True, env={'JAX_PLATFORMS': 'cpu',
                                                                'PATH': '/usr/bin:/bin'})
