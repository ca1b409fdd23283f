"""Our tfds builders on data the tests generate (image folder, miniature FGVC-Aircraft archive,
scikit-learn digits), the prepare command, and the errors for unprepared data and broken images."""
import io
import os
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from concept_jax.data import augment, pipeline, prepare
from concept_jax.data.builders import common, registry

VIEWS = (augment.ViewSpec(16, scale=(0.3, 1.0)),)


def _jpeg(path, colour, size=(24, 20)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  pixels = np.clip(np.array(colour) + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
  Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def _image_folder(root):
  """3 classes (created out of order), 3 train / 2 test images each, one PNG."""
  for c, name in enumerate(['cat', 'ant', 'bee']):
    for split, count in (('train', 3), ('test', 2)):
      for i in range(count):
        _jpeg(os.path.join(root, split, name, f'{name}_{split}_{i}.jpg'), (80 * c, 60, 200 - 80 * c))
  Image.new('RGB', (20, 30), (1, 2, 3)).save(os.path.join(root, 'train', 'ant', 'extra.png'))


def _config(name, data_dir, **kw):
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir = name, str(data_dir)
  cfg.update(kw)
  return cfg


def test_image_folder_end_to_end(tmp_path):
  root, data_dir = tmp_path / 'pics', tmp_path / 'tfds'
  _image_folder(str(root))
  assert prepare.main(['--data=image_folder', f'--data_dir={data_dir}', f'--manual_dir={root}']) == 0
  cfg = _config('image_folder', data_dir, manual_dir=str(root))
  info = pipeline.dataset_info(cfg)
  assert info.class_names == ('ant', 'bee', 'cat')
  assert (info.num_classes, info.num_train, info.num_test) == (3, 10, 6)
  batch = next(pipeline.train_batches(cfg, VIEWS, global_batch_size=4, seed=0, start_step=0))
  assert batch['images'].shape == (4, 1, 16, 16, 3) and batch['images'].dtype == np.uint8
  test = list(pipeline.eval_batches(cfg, 'test', batch_size=4, image_size=16))
  labels = np.concatenate([b['label'][b['mask']] for b in test])
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  # The colour of each class survives the round trip (ant: colour 1, bee: 2, cat: 0).
  red = np.concatenate([b['image'][b['mask']][..., 0].mean(axis=(1, 2)) for b in test])
  np.testing.assert_allclose(red, [80, 80, 160, 160, 0, 0], atol=12)

  # A tllib list fixes the training set, matched by file name.
  image_list = tmp_path / 'list.txt'
  image_list.write_text('train/ant/ant_train_0.jpg 0\ntrain/cat/cat_train_2.jpg 2\n')
  listed = _config('image_folder', data_dir, manual_dir=str(root), image_list=str(image_list))
  assert pipeline.dataset_info(listed).num_train == 2
  listed.sampling_rate = 50
  with pytest.raises(ValueError, match='sampling_rate=100'):
    pipeline.dataset_info(listed)


def test_corrupt_images_are_listed_at_prepare_time(tmp_path):
  root = tmp_path / 'pics'
  _image_folder(str(root))
  (root / 'train' / 'bee' / 'garbage.jpg').write_bytes(b'not an image at all')
  good = (root / 'train' / 'cat' / 'cat_train_0.jpg').read_bytes()
  (root / 'test' / 'cat' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
  with pytest.raises(common.CorruptImageError) as err:
    prepare.prepare('image_folder', str(tmp_path / 'tfds'), str(root))
  msg = str(err.value)
  assert '2 image file(s)' in msg and 'garbage.jpg' in msg and 'truncated.jpg' in msg
  assert 'Delete or replace these files' in msg


def test_corrupt_image_at_training_time_is_named(tmp_path, monkeypatch):
  buf = io.BytesIO()
  Image.new('RGB', (20, 20), (9, 9, 9)).save(buf, format='JPEG')
  examples = registry.Examples(
      labels=np.array([0, 0, 1, 1]), names=np.array(['a.jpg', 'b.jpg', 'broken.jpg', 'd.jpg']),
      images=(buf.getvalue(), buf.getvalue(), b'\xff\xd8garbage', buf.getvalue()),
      class_names=('x', 'y'), name='cub200', split='train')
  monkeypatch.setattr(registry, 'load_examples', lambda cfg, split: examples)
  batches = pipeline.train_batches(_config('cub200', tmp_path), VIEWS, global_batch_size=4, seed=0,
                                   start_step=0)
  with pytest.raises(common.CorruptImageError, match="'broken.jpg'") as err:
    next(batches)
  assert 'python -m concept_jax.data.prepare --data=cub200' in str(err.value)


def _aircraft_archive(folder):
  """A miniature fgvc-aircraft-2013b layout: 3 variants, 2 trainval + 1 test image each."""
  variants = ['707-320', 'Cessna 172', 'F-16A/B']
  data = os.path.join(folder, 'fgvc-aircraft-2013b', 'data')
  rows = {'trainval': [], 'test': []}
  n = 0
  for v, variant in enumerate(variants):
    for split, count in (('trainval', 2), ('test', 1)):
      for _ in range(count):
        n += 1
        img = f'{1000000 + n:07d}'
        _jpeg(os.path.join(data, 'images', f'{img}.jpg'), (100 * v, 50, 50), size=(40, 50))
        rows[split].append(f'{img} {variant}')
  with open(os.path.join(data, 'variants.txt'), 'w') as f:
    f.write('\n'.join(variants) + '\n')
  for split, lines in rows.items():
    with open(os.path.join(data, f'images_variant_{split}.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return variants


def test_aircraft_from_archive_and_cropped_from_folder(tmp_path):
  src, manual, data_dir = tmp_path / 'src', tmp_path / 'manual', tmp_path / 'tfds'
  variants = _aircraft_archive(str(src))
  manual.mkdir()
  with tarfile.open(manual / 'fgvc-aircraft-2013b.tar.gz', 'w:gz') as tar:
    tar.add(src / 'fgvc-aircraft-2013b', arcname='fgvc-aircraft-2013b')
  prepare.prepare('aircraft', str(data_dir), str(manual))
  cfg = _config('aircraft', data_dir)
  info = pipeline.dataset_info(cfg)
  assert info.class_names == tuple(variants)
  assert (info.num_classes, info.num_train, info.num_test) == (3, 6, 3)
  train = registry.load_examples(cfg, 'train')
  np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
  assert Image.open(io.BytesIO(train.images[0])).size == (40, 50)
  assert train.images[0] == (src / 'fgvc-aircraft-2013b' / 'data' / 'images' /
                             train.names[0]).read_bytes()  # 'full' keeps the archive's bytes

  prepare.prepare('aircraft/cropped', str(data_dir), str(src))  # extracted folder as manual dir
  cropped = registry.load_examples(_config('aircraft/cropped', data_dir), 'test')
  assert Image.open(io.BytesIO(cropped.images[0])).size == (40, 30)  # 20-pixel banner removed


def test_unprepared_data_sets_name_the_prepare_command(tmp_path):
  with pytest.raises(registry.DataNotPreparedError) as err:
    pipeline.dataset_info(_config('cub200', tmp_path))
  assert f'python -m concept_jax.data.prepare --data=cub200 --data_dir={tmp_path}' in str(err.value)
  with pytest.raises(registry.DataNotPreparedError) as err:
    pipeline.dataset_info(_config('aircraft', tmp_path))
  assert '--manual_dir=MANUAL_DIR' in str(err.value)
  assert 'fgvc-aircraft-2013b.tar.gz' in str(err.value)
  with pytest.raises(registry.DataNotPreparedError) as err:
    pipeline.dataset_info(_config('stanford_cars', tmp_path))
  assert '--data=stanford_cars' in str(err.value) and '--manual_dir=MANUAL_DIR' in str(err.value)
  assert 'cars_train.tgz' in str(err.value) and 'car_devkit.tgz' in str(err.value)
  with pytest.raises(ValueError, match='Unknown data set'):
    pipeline.dataset_info(_config('no_such_data_set', tmp_path))


def test_stanford_cars_reads_the_release_files_from_manual_dir(tmp_path, capsys):
  # tfds's own URLs are dead: the four release files come from --manual_dir, checked against tfds's
  # recorded checksums. Stand-ins fail that check offline, with an error that says what to put there.
  manual = tmp_path / 'cars'
  manual.mkdir()
  for name in ('cars_train.tgz', 'cars_test.tgz', 'car_devkit.tgz', 'cars_test_annos_withlabels.mat'):
    (manual / name).write_bytes(b'not the release file')
  code = prepare.main(['--data=stanford_cars', f'--data_dir={tmp_path / "tfds"}',
                       f'--manual_dir={manual}'])
  err = capsys.readouterr().err
  assert code == 2 and '\nprepare: error: tfds could not prepare' in err and 'Traceback' not in err
  assert 'NonMatchingChecksumError' in err and str(manual) in err   # tfds read our files
  assert 'cars_test_annos_withlabels.mat' in err and 'download it again' in err


def test_digits_prepare_themselves_offline(tmp_path):
  cfg = _config('digits', tmp_path, sampling_rate=15)
  info = pipeline.dataset_info(cfg)
  assert info.class_names == tuple(str(d) for d in range(10))
  assert info.num_test == 539
  full = pipeline.dataset_info(_config('digits', tmp_path))
  assert full.num_train == 1258
  assert 10 <= info.num_train <= 0.15 * 1258 + 10
  batch = next(pipeline.train_batches(cfg, VIEWS, global_batch_size=8, seed=0, start_step=0))
  assert batch['images'].shape == (8, 1, 16, 16, 3)
  assert batch['images'].max() > 200 and batch['images'].min() < 30  # a white digit on black


@pytest.mark.parametrize('name', sorted(n for n, s in registry.REGISTRY.items() if s.builder is None))
def test_registered_tfds_data_sets_read_through_mock_data(name, tmp_path, monkeypatch):
  """The registry's split names and feature keys fit each tfds builder (tfds mock examples)."""
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  cfg = _config(name, tmp_path)
  with tfds.testing.mock_data(num_examples=4):
    info = pipeline.dataset_info(cfg)
    assert info.num_classes == registry.REGISTRY[name].num_classes
    assert info.num_train > 0 and info.num_test > 0
    batch = next(pipeline.train_batches(cfg, VIEWS, global_batch_size=2, seed=0, start_step=0))
  assert batch['images'].shape == (2, 1, 16, 16, 3)
  assert len(set(registry.load_examples(cfg, 'train').names)) > 1  # real per-example names
