"""roi_align crops against a per-pixel numpy port of torchvision's CPU kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.concepts import crop


def np_bilinear(img, y, x):
  """torchvision bilinear_interpolate, one point, (H, W, C) image."""
  h, w, _ = img.shape
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(img.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  return (hy * hx * img[y_low, x_low] + hy * lx * img[y_low, x_high] +
          ly * hx * img[y_high, x_low] + ly * lx * img[y_high, x_high])


def np_roi_align(img, boxes, size, spatial_scale=1.0, sampling_ratio=1, aligned=True):
  img = img.astype(np.float64)
  out = np.zeros((len(boxes), size, size, img.shape[-1]))
  offset = 0.5 if aligned else 0.0
  for n, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
    sx, sy = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    rw, rh = x2 * spatial_scale - offset - sx, y2 * spatial_scale - offset - sy
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / size, rh / size
    g = sampling_ratio
    for ph in range(size):
      for pw in range(size):
        acc = 0.0
        for iy in range(g):
          y = sy + ph * bh + (iy + 0.5) * bh / g
          for ix in range(g):
            x = sx + pw * bw + (ix + 0.5) * bw / g
            acc = acc + np_bilinear(img, y, x)
        out[n, ph, pw] = acc / (g * g)
  return out


def _image(h=96, w=80, c=3, seed=0):
  return np.random.default_rng(seed).standard_normal((h, w, c)).astype(np.float32)


def test_full_box_is_exact_pixel_crop():
  img = _image(224, 224)
  boxes = np.array([[0, 0, 64, 64], [96, 32, 160, 96], [160, 160, 224, 224]], np.float32)
  out = np.asarray(crop.roi_align(jnp.asarray(img), jnp.asarray(boxes), 64))
  for n, (x1, y1, _, _) in enumerate(boxes.astype(int)):
    np.testing.assert_array_equal(out[n], img[y1:y1 + 64, x1:x1 + 64])


def test_clipped_and_search_boxes_match_reference():
  img = _image(224, 224, seed=1)
  # Border-clipped 32-px sides (search boxes at row/col 0 and at the far edge) and full boxes.
  boxes = np.array([[0, 0, 32, 32], [0, 64, 32, 128], [160, 0, 224, 32], [192, 192, 224, 224],
                    [32, 160, 96, 224]], np.float32)
  out = crop.roi_align(jnp.asarray(img), jnp.asarray(boxes), 64)
  np.testing.assert_allclose(out, np_roi_align(img, boxes, 64), rtol=1e-5, atol=1e-5)


def test_arbitrary_boxes_border_rules():
  img = _image(20, 16, c=2, seed=2)
  # Fractional boxes; partly outside (zero rule); coordinates in [-1, 0); beyond the last pixel.
  boxes = np.array([[1.3, 2.7, 9.9, 15.2], [-3.0, -2.0, 5.0, 4.0], [-0.9, -0.4, 3.1, 2.2],
                    [10.0, 15.0, 17.5, 21.0], [14.2, 18.3, 30.0, 40.0], [4.0, 4.0, 4.0, 4.0]],
                   np.float32)
  for kwargs in [{}, {'sampling_ratio': 2}, {'aligned': False}, {'spatial_scale': 0.5}]:
    out = crop.roi_align(jnp.asarray(img), jnp.asarray(boxes), 7, **kwargs)
    np.testing.assert_allclose(out, np_roi_align(img, boxes, 7, **kwargs), rtol=1e-5, atol=1e-5,
                               err_msg=str(kwargs))


def test_crop_patches_batched_and_jitted():
  rng = np.random.default_rng(3)
  images = rng.standard_normal((3, 40, 48, 3)).astype(np.float32)
  x1 = rng.uniform(0, 30, (3, 4, 1))
  y1 = rng.uniform(0, 25, (3, 4, 1))
  boxes = np.concatenate([x1, y1, x1 + rng.uniform(4, 18, (3, 4, 1)),
                          y1 + rng.uniform(4, 15, (3, 4, 1))], -1).astype(np.float32)
  out = jax.jit(lambda i, b: crop.crop_patches(i, b, size=8))(images, boxes)
  assert out.shape == (3, 4, 8, 8, 3) and out.dtype == jnp.float32
  for i in range(3):
    np.testing.assert_allclose(out[i], np_roi_align(images[i], boxes[i], 8), rtol=1e-5,
                               atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match='sampling_ratio'):
    crop.roi_align(jnp.zeros((8, 8, 3)), jnp.zeros((1, 4)), 4, sampling_ratio=0)
  with pytest.raises(ValueError, match='expected images'):
    crop.crop_patches(jnp.zeros((8, 8, 3)), jnp.zeros((1, 4)))
