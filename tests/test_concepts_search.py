"""Concept search against hand-built maps and a literal numpy version of spec section 4."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_jax.concepts import search


def np_concept_boxes(fmap, logits, labels, w, num_confusing, num_concepts, step, width, stride,
                     image_size, anchor='corner'):
  """Per-sample loop, following the spec word for word."""
  b, h, wd, d = fmap.shape
  boxes = np.zeros((b, num_concepts, 4), np.float32)
  confusing = np.zeros((b, num_confusing), np.int64)
  for i in range(b):
    order = [c for c in np.argsort(-logits[i], kind='stable') if c != labels[i]]
    confusing[i] = order[:num_confusing]
    s = 3 * w[:, labels[i]] - w[:, order[0]] - w[:, order[1]] - w[:, order[2]]
    ranked = np.argsort(-s, kind='stable')
    for k in range(num_concepts):
      chans = ranked[k * step:k * step + width]
      cmap = fmap[i][:, :, chans].sum(-1)
      flat = int(np.argmax(cmap))
      row, col = divmod(flat, wd)
      shift = 0 if anchor == 'corner' else stride / 2
      cx, cy = col * stride + shift, row * stride + shift
      boxes[i, k] = [np.clip(cx - stride, 0, image_size), np.clip(cy - stride, 0, image_size),
                     np.clip(cx + stride, 0, image_size), np.clip(cy + stride, 0, image_size)]
  return boxes, confusing


def test_concept_slices_defaults():
  assert search.concept_slices(2048) == (250, 30)
  assert search.concept_slices(512) == (62, 7)
  assert search.concept_slices(512, concept_step=50, channels_per_concept=10) == (50, 10)
  with pytest.raises(ValueError, match='need'):
    search.concept_slices(100, concept_step=20, channels_per_concept=30)


def test_hand_built_peaks_and_border_clipping():
  # 18 channels, 9 concepts of 2 channels, step 2. Only the true class column of W is non-zero,
  # so the channel score is 3 W[:, c] and the ranking is the permutation `perm`.
  d, num_classes, h = 18, 5, 7
  rng = np.random.default_rng(0)
  perm = rng.permutation(d)                       # perm[r] = channel ranked r
  w = np.zeros((d, num_classes), np.float32)
  w[perm, 2] = np.arange(d, 0, -1)                # ranked 0 has the largest score
  cells = [(0, 0), (6, 6), (3, 5), (0, 4), (5, 0), (2, 2), (6, 1), (1, 6), (4, 3)]
  fmap = np.zeros((1, h, h, d), np.float32)
  for k, (r, c) in enumerate(cells):
    fmap[0, r, c, perm[2 * k]] = 1.0
    fmap[0, r, c, perm[2 * k + 1]] = 0.5
    fmap[0, (r + 3) % h, (c + 2) % h, perm[(2 * k + 2) % d]] = 0.2   # weaker distractors
  logits = np.array([[0.1, 0.9, 5.0, 0.3, 0.7]], np.float32)
  boxes, confusing = search.concept_boxes(
      jnp.asarray(fmap), jnp.asarray(logits), jnp.array([2]), jnp.asarray(w), num_confusing=4,
      concept_step=2, channels_per_concept=2)
  np.testing.assert_array_equal(confusing, [[1, 4, 3, 0]])
  expected = [[0, 0, 32, 32], [160, 160, 224, 224], [128, 64, 192, 128], [96, 0, 160, 32],
              [0, 128, 32, 192], [32, 32, 96, 96], [0, 160, 64, 224], [160, 0, 224, 64],
              [64, 96, 128, 160]]
  np.testing.assert_array_equal(boxes[0], np.array(expected, np.float32))
  centred, _ = search.concept_boxes(
      jnp.asarray(fmap), jnp.asarray(logits), jnp.array([2]), jnp.asarray(w), num_confusing=4,
      concept_step=2, channels_per_concept=2, box_anchor='center')
  np.testing.assert_array_equal(centred[0, :3], [[0, 0, 48, 48], [176, 176, 224, 224],
                                                 [144, 80, 208, 144]])


def test_argmax_takes_row_major_first_maximum():
  fmap = np.zeros((1, 3, 3, 4), np.float32)
  fmap[0, 2, 0, :] = 1.0
  fmap[0, 1, 2, :] = 1.0        # equal peak, earlier in row-major order
  w = np.eye(4, 5, dtype=np.float32)
  boxes, _ = search.concept_boxes(jnp.asarray(fmap), jnp.zeros((1, 5)), jnp.array([0]),
                                  jnp.asarray(w), num_confusing=3, num_concepts=1,
                                  concept_step=1, channels_per_concept=4)
  np.testing.assert_array_equal(boxes[0, 0], [32, 0, 96, 64])    # row 1, col 2; image 96


def test_confusing_lists():
  logits = jnp.array([[3.0, 1.0, 2.0, 5.0, 4.0], [0.0, 0.0, 1.0, 0.0, -1.0]])
  conf = search.confusing_classes(logits, jnp.array([4, 2]), 4)
  np.testing.assert_array_equal(conf, [[3, 0, 2, 1], [0, 1, 3, 4]])  # ties: lower index first
  np.testing.assert_array_equal(search.confusing_classes(logits, jnp.array([4, 2]), 2),
                                [[3, 0], [0, 1]])
  with pytest.raises(ValueError, match='num_confusing'):
    search.confusing_classes(logits, jnp.array([0, 0]), 5)


@pytest.mark.parametrize('anchor', ['corner', 'center'])
def test_matches_numpy_reference(anchor):
  rng = np.random.default_rng(1)
  b, h, d, num_classes = 6, 7, 64, 12
  fmap = rng.standard_normal((b, h, h, d)).astype(np.float32)
  logits = rng.standard_normal((b, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, b)
  w = rng.standard_normal((d, num_classes)).astype(np.float32)
  fn = jax.jit(lambda f, l, y, k: search.concept_boxes(
      f, l, y, k, num_confusing=num_classes - 1, concept_step=7, channels_per_concept=4,
      image_size=224, box_anchor=anchor))
  boxes, confusing = fn(fmap, logits, labels, w)
  ref_boxes, ref_conf = np_concept_boxes(fmap, logits, labels, w, num_classes - 1, 9, 7, 4, 32,
                                         224, anchor)
  assert boxes.shape == (b, 9, 4) and confusing.shape == (b, num_classes - 1)
  assert confusing.dtype == jnp.int32
  np.testing.assert_array_equal(confusing, ref_conf)
  np.testing.assert_array_equal(boxes, ref_boxes)
  assert not np.any(np.asarray(confusing) == labels[:, None])


def test_derived_slices_for_resnet18_width():
  rng = np.random.default_rng(2)
  fmap = rng.standard_normal((2, 7, 7, 512)).astype(np.float32)
  logits = rng.standard_normal((2, 8)).astype(np.float32)
  w = rng.standard_normal((512, 8)).astype(np.float32)
  boxes, conf = search.concept_boxes(fmap, logits, jnp.array([1, 5]), w, num_confusing=5)
  ref_boxes, ref_conf = np_concept_boxes(fmap, logits, np.array([1, 5]), w, 5, 9, 62, 7, 32, 224)
  np.testing.assert_array_equal(boxes, ref_boxes)
  np.testing.assert_array_equal(conf, ref_conf)


def test_shape_errors():
  with pytest.raises(ValueError, match='head_kernel'):
    search.concept_boxes(jnp.zeros((1, 7, 7, 64)), jnp.zeros((1, 5)), jnp.array([0]),
                         jnp.zeros((32, 5)), num_confusing=3)
  with pytest.raises(ValueError, match='at least 4 classes'):
    search.concept_boxes(jnp.zeros((1, 7, 7, 64)), jnp.zeros((1, 3)), jnp.array([0]),
                         jnp.zeros((64, 3)), num_confusing=2)
