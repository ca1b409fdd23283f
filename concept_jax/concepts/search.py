"""Concept search: channel scores -> concept maps -> peak cells -> boxes (spec section 4).

For each sample the key encoder's head kernel W (D, C) says which feature channels separate
the true class c from its three most confusing classes:

    s = 3 W[:, c] - W[:, conf0] - W[:, conf1] - W[:, conf2]            (D,)

Channels are ranked by decreasing s. Concept k (k = 0..8) sums the layer4 map over the
channels ranked [k * step, k * step + width); the peak cell of that (h, w) map is the concept's
location and becomes a box in image pixels. Nothing here is differentiated (stop_gradient).

Default slice sizes: the official code hard-wires step 250 and width 30 for D = 2048 channels.
`concept_slices(D)` scales both by D / 2048 (floor), so ResNet-18/34 (D = 512) get step 62 and
width 7; pass `concept_step` / `channels_per_concept` to override.
"""
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

_REFERENCE_DIM = 2048      # ResNet-50 layer4 channels, for which the official sizes were chosen
_REFERENCE_STEP = 250
_REFERENCE_WIDTH = 30
_SCORE_CONFUSING = 3       # the channel score always uses the three most confusing classes


def concept_slices(feature_dim: int, num_concepts: int = 9,
                   concept_step: Optional[int] = None,
                   channels_per_concept: Optional[int] = None) -> Tuple[int, int]:
  """Returns (concept_step, channels_per_concept) for a layer4 map with `feature_dim` channels.

  Unset values are the official 250 / 30 scaled by feature_dim / 2048 (floor, at least 1):
  2048 -> (250, 30), 512 -> (62, 7). Raises ValueError if the slices do not fit in the channels.
  """
  step = concept_step if concept_step is not None else max(
      1, _REFERENCE_STEP * feature_dim // _REFERENCE_DIM)
  width = channels_per_concept if channels_per_concept is not None else max(
      1, _REFERENCE_WIDTH * feature_dim // _REFERENCE_DIM)
  if step < 1 or width < 1:
    raise ValueError(f'concept_step ({step}) and channels_per_concept ({width}) must be >= 1.')
  last = (num_concepts - 1) * step + width
  if last > feature_dim:
    raise ValueError(
        f'{num_concepts} concepts with step {step} and {width} channels each need {last} channels, '
        f'but the feature map has {feature_dim}: lower concept_step or channels_per_concept.')
  return step, width


def confusing_classes(logits: jax.Array, labels: jax.Array, num_confusing: int) -> jax.Array:
  """Classes sorted by decreasing logit with the true class removed, first `num_confusing`.

  Args:
    logits: (B, C) key-encoder logits.
    labels: (B,) int true classes.
    num_confusing: how many to keep (at most C - 1).
  Returns:
    (B, num_confusing) int32. Ties are broken by the lower class index first (lax.top_k);
    the official torch.sort leaves tie order unspecified.
  """
  num_classes = logits.shape[-1]
  if not 0 <= num_confusing <= num_classes - 1:
    raise ValueError(f'num_confusing={num_confusing} must be in [0, num_classes - 1 = '
                     f'{num_classes - 1}].')
  logits = jax.lax.stop_gradient(logits)
  # The true class goes to -inf so it sorts last and is never among the first C - 1.
  is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
  masked = jnp.where(is_true, -jnp.inf, logits.astype(jnp.float32))
  _, order = jax.lax.top_k(masked, num_confusing)
  return order.astype(jnp.int32)


def channel_scores(head_kernel: jax.Array, labels: jax.Array, confusing: jax.Array) -> jax.Array:
  """s = 3 W[:, c] - W[:, conf0] - W[:, conf1] - W[:, conf2].

  Args:
    head_kernel: (D, C) key head kernel W.
    labels: (B,) true classes c.
    confusing: (B, >=3) confusing classes, most confusing first.
  Returns:
    (B, D) float32 channel scores.
  """
  w_t = jax.lax.stop_gradient(head_kernel).astype(jnp.float32).T          # (C, D)
  top3 = confusing[:, :_SCORE_CONFUSING]
  # Same association as the official expression: ((3 w_c - w_0) - w_1) - w_2.
  scores = 3.0 * w_t[labels]
  for j in range(_SCORE_CONFUSING):
    scores = scores - w_t[top3[:, j]]
  return scores


def concept_maps(feature_map: jax.Array, scores: jax.Array, *, num_concepts: int,
                 concept_step: int, channels_per_concept: int) -> jax.Array:
  """Sums the feature map over each concept's slice of the score-ranked channels.

  Args:
    feature_map: (B, h, w, D) layer4 map.
    scores: (B, D) channel scores.
  Returns:
    (B, num_concepts, h, w) float32 concept maps.
  """
  # Stable argsort of -s: equal scores keep the lower channel index first.
  ranked = jnp.argsort(-scores, axis=-1)                                       # (B, D)
  starts = jnp.arange(num_concepts) * concept_step
  ranks = starts[:, None] + jnp.arange(channels_per_concept)[None, :]          # (N, width)
  channels = ranked[:, ranks]                                                  # (B, N, width)
  fmap = jax.lax.stop_gradient(feature_map).astype(jnp.float32)
  # Gather-then-sum keeps exact float32 additions (a 0/1 matmul could run in TF32 on GPUs).
  picked = jax.vmap(lambda f, c: jnp.take(f, c, axis=-1))(fmap, channels)     # (B, h, w, N, width)
  return jnp.moveaxis(picked.sum(axis=-1), -1, 1)


def peak_boxes(maps: jax.Array, *, stride: int, image_size: Union[int, Sequence[int]],
               box_anchor: str = 'corner') -> jax.Array:
  """Turns each map's peak cell into a box of side 2 * stride, clipped to the image.

  The peak is the row-major first maximum (torch.argmax / jnp.argmax). 'corner' (official)
  centres the box on the top-left corner of the peak cell:
  (col*s - s, row*s - s, col*s + s, row*s + s); 'center' centres it on the cell centre (+ s/2).

  Args:
    maps: (B, N, h, w).
    stride: pixels per feature cell.
    image_size: int or (height, width), the clip range [0, size].
    box_anchor: 'corner' or 'center'.
  Returns:
    (B, N, 4) float32 boxes (x1, y1, x2, y2) in pixels.
  """
  if box_anchor not in ('corner', 'center'):
    raise ValueError(f"box_anchor must be 'corner' (official) or 'center', got {box_anchor!r}.")
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  b, n, h, w = maps.shape
  flat = jnp.argmax(maps.reshape(b, n, h * w), axis=-1)
  row = (flat // w).astype(jnp.float32)
  col = (flat % w).astype(jnp.float32)
  shift = 0.0 if box_anchor == 'corner' else stride / 2.0
  cx = col * stride + shift
  cy = row * stride + shift
  boxes = jnp.stack([
      jnp.clip(cx - stride, 0, width), jnp.clip(cy - stride, 0, height),
      jnp.clip(cx + stride, 0, width), jnp.clip(cy + stride, 0, height)], axis=-1)
  return boxes


def concept_boxes(feature_map: jax.Array, logits: jax.Array, labels: jax.Array,
                  head_kernel: jax.Array, *, num_confusing: int, num_concepts: int = 9,
                  concept_step: Optional[int] = None,
                  channels_per_concept: Optional[int] = None, stride: int = 32,
                  image_size: Optional[Union[int, Sequence[int]]] = None,
                  box_anchor: str = 'corner') -> Tuple[jax.Array, jax.Array]:
  """Concept search of spec section 4 (no gradient).

  Args:
    feature_map: (B, h, w, D) key encoder layer4 map.
    logits: (B, C) key encoder logits of the same view.
    labels: (B,) int true classes.
    head_kernel: (D, C) key encoder head kernel.
    num_confusing: length of the returned confusing lists (CUB recipe 199). The channel score
      always uses the three most confusing classes, whatever this is; needs C >= 4.
    num_concepts: boxes per image (9).
    concept_step, channels_per_concept: channel slices; None derives them from D
      (see `concept_slices`: 250 / 30 at D = 2048).
    stride: pixels per feature cell (32 for ResNets).
    image_size: clip range, int or (height, width); None means (h * stride, w * stride).
    box_anchor: 'corner' (official quirk: box centred on the peak cell's top-left corner) or
      'center'.
  Returns:
    boxes: (B, num_concepts, 4) float32 (x1, y1, x2, y2) pixels.
    confusing: (B, num_confusing) int32 classes by decreasing logit, true class removed.
  """
  b, h, w, d = feature_map.shape
  num_classes = logits.shape[-1]
  if head_kernel.shape != (d, num_classes):
    raise ValueError(f'head_kernel has shape {head_kernel.shape}, expected (D, C) = '
                     f'({d}, {num_classes}) from feature_map {feature_map.shape} and logits '
                     f'{logits.shape}.')
  if num_classes - 1 < _SCORE_CONFUSING:
    raise ValueError(f'concept search needs at least {_SCORE_CONFUSING + 1} classes '
                     f'(3 confusing ones for the channel score), got {num_classes}.')
  step, width = concept_slices(d, num_concepts, concept_step, channels_per_concept)
  if image_size is None:
    image_size = (h * stride, w * stride)
  ranked_classes = confusing_classes(logits, labels, max(num_confusing, _SCORE_CONFUSING))
  scores = channel_scores(head_kernel, labels, ranked_classes)
  maps = concept_maps(feature_map, scores, num_concepts=num_concepts, concept_step=step,
                      channels_per_concept=width)
  boxes = peak_boxes(maps, stride=stride, image_size=image_size, box_anchor=box_anchor)
  return boxes, ranked_classes[:, :num_confusing]
