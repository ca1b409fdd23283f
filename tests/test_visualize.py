"""Concept pictures (concept_jax/visualize.py) of real tiny runs: an ERM source, Concept-Tuning from it,
and the CUB recipe's tiny variant; boxes checked against Concept-Tuning's own search and the image.
The class separation of the same runs' patch embeddings (concept_jax/separation.py) too."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

from concept_jax import separation, train, visualize
from concept_jax.data.normalize import normalize
from concept_jax.methods.concept_tuning import ConceptTuning
from tests.conftest import ROOT


def test_box_pixels_stay_inside_the_enlarged_image():
  boxes = np.array([[0, 0, 32, 32],          # the whole image
                    [-8, -8, 8, 8],          # past the top-left corner (not clipped by the search)
                    [24, 16, 40, 32],        # past the right edge
                    [3.5, 4.2, 9.9, 12.0],   # fractional
                    [31, 31, 31, 31]])       # empty
  scale, size = 8, 32
  got = visualize.box_pixels(boxes, scale, size)
  last = size * scale - 1
  starts = np.clip(np.floor(boxes[:, :2] * scale), 0, last)
  reference = np.concatenate([starts, np.maximum(np.clip(np.ceil(boxes[:, 2:] * scale) - 1, 0, last),
                                                 starts)], 1)
  np.testing.assert_array_equal(got, reference)
  assert got.min() >= 0 and got.max() <= last
  assert (got[:, 2:] >= got[:, :2]).all()
  assert got[0].tolist() == [0, 0, last, last] and got[3].tolist() == [28, 33, 79, 95]


def test_concept_tuning_pictures_use_its_key_encoders_search(concept_runs, tmp_path):
  runs = concept_runs
  records = visualize.visualize(str(runs / 'ct'), 'test', num_images=4, out=str(tmp_path))
  # 30 test images: four spread over them, first and last included.
  assert [r['index'] for r in records] == [0, 10, 19, 29]
  assert sorted(os.listdir(tmp_path)) == sorted(['concepts_grid.png'] + [f'test_{i}.png' for i in
                                                                         (0, 10, 19, 29)])
  config, state = visualize.load_run(str(runs / 'ct'))
  images, labels = visualize.read_images(config.data, 'test', [0, 10, 19, 29], config.image_size)
  _, expected, _ = ConceptTuning(config, 10).concepts(
      state['method']['key_params'], state['batch_stats'], normalize(images), labels, jax.random.key(0))
  boxes = np.stack([r['boxes'] for r in records])
  np.testing.assert_array_equal(boxes, np.asarray(expected))
  assert boxes.shape == (4, 9, 4) and boxes.min() >= 0 and boxes.max() <= 32
  assert len({tuple(b) for b in boxes.reshape(-1, 4)}) > 1        # a 4x4 map: boxes differ

  source_names = {f'class_{c:03d}' for c in range(10)}
  assert all(r['source_prediction'] in source_names for r in records)
  picture = Image.open(records[0]['path'])
  assert picture.width == 256 and picture.height > 256          # 32 px x 8, and the caption below
  # Slot 1 is drawn last: the bottom-right corner of its box has its colour.
  x2, y2 = visualize.box_pixels(records[0]['boxes'], 8, 32)[0, 2:]
  assert picture.getpixel((int(x2), int(y2))) == visualize.SLOT_COLOURS[0]
  grid = Image.open(tmp_path / 'concepts_grid.png')
  assert grid.size == (2 * 256 + 4, 2 * picture.height + 4)


def test_erm_pictures_and_the_command_line(concept_runs, tmp_path, capsys):
  runs = concept_runs
  visualize.main(['--workdir', str(runs / 'source'), '--num_images', '3', '--split', 'val', '--out',
                  str(tmp_path)])
  assert 'Wrote 3 pictures' in capsys.readouterr().out
  pictures = sorted(p for p in os.listdir(tmp_path) if p.startswith('val_'))
  assert len(pictures) == 3
  for name in pictures:
    with Image.open(tmp_path / name) as picture:
      picture.load()
      assert picture.size[0] == 256
  records = visualize.visualize(str(runs / 'source'), 'val', num_images=3, out=str(tmp_path))
  assert all(r['source_prediction'] is None for r in records)     # trained from scratch: n/a
  with pytest.raises(SystemExit, match='No concept_jax checkpoint under'):
    visualize.main(['--workdir', str(tmp_path / 'nothing')])


def test_the_cub_recipe_tiny_run(tmp_path):
  spec = importlib.util.spec_from_file_location('cub200', os.path.join(ROOT, 'configs', 'cub200.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tiny,method=concept_tuning')
  # 200 classes as CUB, 1 step, a small test split.
  config.data.synthetic.update(train_per_class=2, test_per_class=1)
  config.update(epochs=1, iters_per_epoch=1, eval_batch_size=200)
  train.run(config, str(tmp_path / 'run'))
  records = visualize.visualize(str(tmp_path / 'run'), num_images=2)
  assert [r['index'] for r in records] == [0, 199]
  for r in records:
    assert r['boxes'].min() >= 0 and r['boxes'].max() <= config.image_size
    with Image.open(r['path']) as picture:
      assert picture.width == 256            # 64 px x 4
  assert os.path.exists(tmp_path / 'run' / 'concepts' / 'concepts_grid.png')


def test_a_run_saved_before_a_config_field_existed_loads_with_its_default(concept_runs, monkeypatch):
  from concept_jax import checkpoint
  meta = checkpoint.load_meta(str(concept_runs / 'ct'))
  del meta['config']['model']['norm']                      # as runs made before StochNorm saved it
  monkeypatch.setattr(checkpoint, 'load_meta', lambda workdir: meta)
  config, _ = visualize.load_run(str(concept_runs / 'ct'))
  assert config.model.norm == 'batch' and config.method.name == 'concept_tuning'


def test_a_concept_tuning_run_is_scored_per_slot(concept_runs, capsys):
  result = separation.separation(str(concept_runs / 'ct'), num_images=12)
  assert result['slots'].shape == (9,)
  assert np.all((result['slots'] >= 0) & (result['slots'] <= 100))
  assert result['best_slot'] == result['slots'].max() and 0 <= result['touch'] <= 100
  separation.main(['--workdir', str(concept_runs / 'ct'), '--workdir', str(concept_runs / 'source'),
                   '--num_images', '12'])
  assert capsys.readouterr().out.count(f'| {concept_runs}/') == 2   # the ERM source scored as well
