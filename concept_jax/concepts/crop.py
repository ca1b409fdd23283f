"""Patch crops with torchvision `roi_align` semantics (spec section 5).

Defaults are the official call: output 64x64, spatial_scale 1, aligned=True, sampling_ratio 1
(one bilinear sample per output bin). For output index j of a box (x1, y1, x2, y2) the sample
point is

    x = x1 * spatial_scale - 0.5 + (j + (i + 0.5) / g) * (x2 - x1) * spatial_scale / size

(i < g = sampling_ratio; with g = 1 this is x1 + (j + 0.5) (x2 - x1) / size - 0.5), the same
for y, and the g * g samples of a bin are averaged.

Border rules, copied from torchvision's `bilinear_interpolate`:
  - a sample with y < -1 or y > H (or x < -1 or x > W) contributes 0;
  - a coordinate in [-1, 0] is clamped to 0 (edge replicate, not zero padding);
  - a coordinate whose floor is >= size - 1 reads the last pixel only.
With boxes inside the image (as `search.concept_boxes` returns) the zero rule never fires; it is
kept so that arbitrary boxes match torchvision. A full 64-px box is an exact pixel crop, a
32-px box (clipped at the border) a bilinear upsample along that axis.

Implemented as separable gathers (rows, then columns) with exact float32 arithmetic; no
gradient with respect to the boxes (they come from an argmax anyway).
"""
from typing import Tuple

import jax
import jax.numpy as jnp


def _axis_samples(start: jax.Array, end: jax.Array, size: int, length: int,
                  sampling_ratio: int, aligned: bool
                  ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Bilinear taps along one axis for N boxes.

  Args:
    start, end: (N,) box edges in input pixels (already scaled).
    size: output bins along the axis.
    length: input pixels along the axis.
  Returns:
    low, high: (N, size * g) int32 pixel indices; w_low, w_high: (N, size * g) float32 weights
    (both 0 for samples outside [-1, length]).
  """
  offset = 0.5 if aligned else 0.0
  start = start - offset
  extent = end - offset - start
  if not aligned:  # torchvision forces at least one pixel for the legacy (non-aligned) mode
    extent = jnp.maximum(extent, 1.0)
  bin_size = extent / size
  g = sampling_ratio
  # Sub-sample positions in bin units: j + (i + 0.5) / g, for j < size, i < g.
  pos = (jnp.arange(size)[:, None] + (jnp.arange(g)[None, :] + 0.5) / g).reshape(-1)
  coord = start[:, None] + pos[None, :] * bin_size[:, None]                  # (N, size * g)
  valid = (coord >= -1.0) & (coord <= length)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_end = low >= length - 1
  low = jnp.where(at_end, length - 1, low)
  high = jnp.where(at_end, length - 1, low + 1)
  coord = jnp.where(at_end, low.astype(coord.dtype), coord)
  frac = coord - low
  w_low = jnp.where(valid, 1.0 - frac, 0.0)
  w_high = jnp.where(valid, frac, 0.0)
  return low, high, w_low, w_high


def roi_align(image: jax.Array, boxes: jax.Array, output_size: int = 64, *,
              spatial_scale: float = 1.0, sampling_ratio: int = 1,
              aligned: bool = True) -> jax.Array:
  """torchvision.ops.roi_align for one NHWC image.

  Args:
    image: (H, W, Cin) float image (or feature map).
    boxes: (N, 4) float (x1, y1, x2, y2) in input coordinates before `spatial_scale`.
    output_size: square output side.
    spatial_scale: multiplies the box coordinates.
    sampling_ratio: samples per bin along each axis (>= 1; torchvision's adaptive 0 would need
      data-dependent shapes and is not supported).
    aligned: subtract half a pixel (the official call uses True).
  Returns:
    (N, output_size, output_size, Cin), float32 (or the image's floating dtype).
  """
  if sampling_ratio < 1:
    raise ValueError(f'sampling_ratio must be >= 1 (adaptive 0 is not supported), got '
                     f'{sampling_ratio}.')
  height, width, channels = image.shape
  dtype = image.dtype if jnp.issubdtype(image.dtype, jnp.floating) else jnp.float32
  image = jax.lax.stop_gradient(image).astype(jnp.float32)
  boxes = jax.lax.stop_gradient(boxes).astype(jnp.float32) * spatial_scale
  n = boxes.shape[0]
  g = sampling_ratio
  y_lo, y_hi, wy_lo, wy_hi = _axis_samples(boxes[:, 1], boxes[:, 3], output_size, height, g,
                                           aligned)
  x_lo, x_hi, wx_lo, wx_hi = _axis_samples(boxes[:, 0], boxes[:, 2], output_size, width, g,
                                           aligned)
  # Rows first: (N, s, W, Cin); then columns: (N, s, s, Cin), s = output_size * g.
  rows = (image[y_lo] * wy_lo[..., None, None] + image[y_hi] * wy_hi[..., None, None])
  take = jax.vmap(lambda r, idx: jnp.take(r, idx, axis=1))                   # over boxes
  out = (take(rows, x_lo) * wx_lo[:, None, :, None] + take(rows, x_hi) * wx_hi[:, None, :, None])
  if g > 1:  # average the g x g samples of each bin (torchvision divides by the full count)
    out = out.reshape(n, output_size, g, output_size, g, channels).mean(axis=(2, 4))
  return out.astype(dtype)


def crop_patches(images: jax.Array, boxes: jax.Array, size: int = 64, **roi_align_kwargs
                 ) -> jax.Array:
  """Crops every box of every image to a size x size patch (roi_align, official settings).

  Args:
    images: (B, H, W, Cin) normalised images.
    boxes: (B, N, 4) float (x1, y1, x2, y2) pixels, e.g. from `search.concept_boxes`.
    size: output side (64).
    **roi_align_kwargs: spatial_scale, sampling_ratio, aligned (see `roi_align`).
  Returns:
    (B, N, size, size, Cin).
  Memory: the row pass holds (B, N, size * g, W, Cin) floats, 18.6 M (74 MB float32) for the
  CUB recipe (48 x 9 x 64 x 224 x 3).
  """
  if images.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f'expected images (B, H, W, C) and boxes (B, N, 4), got {images.shape} '
                     f'and {boxes.shape}.')
  return jax.vmap(lambda im, bx: roi_align(im, bx, size, **roi_align_kwargs))(images, boxes)
