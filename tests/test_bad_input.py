"""What a user can get wrong or have go wrong, each ending in a short message that names the problem and
the fix: damaged checkpoints (the run resumes from the newest good one), NaN (never saved), config
ranges and workdirs (all reported before anything is created), wrong-shaped weights, empty class
folders; and the metrics history and TensorBoard summaries across a resume."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from concept_jax import checkpoint, main, metrics, pretrained, train, validate
from concept_jax.data import prepare
from concept_jax.models.classifier import Classifier
from tests.conftest import ROOT, subprocess_env, tiny_config
from tests.test_pretrained import WIDTH, torchvision_state_dict

# Orbax's read tasks of a damaged checkpoint, abandoned when the restore fails, are collected later.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 6-step ERM run (checkpoints 4 and 6, one metrics record per step) and its final state."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.run(tiny_config('erm', epochs=3), workdir)
  assert _steps(workdir) == [4, 6]
  return workdir, checkpoint.load_state(workdir)


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  return workdir


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True),
             key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _save_other(step_dir, state):
  """Writes checkpoint step 8 beside step_dir's, holding `state` (another run's, or NaN)."""
  ckpt = checkpoint.Checkpointer(os.path.dirname(os.path.dirname(step_dir)), max_to_keep=None)
  ckpt.save(8, state, {'step': 8, 'history': [], 'config': {}})
  ckpt.close()


# kind -> (damage(step directory of checkpoint 6, the run's final state), damaged step, reason shown)
DAMAGE = {
    'truncated data file': (lambda d, s: _truncate(d), 6, 'Error reading'),
    'deleted data file': (lambda d, s: os.remove(_largest_data_file(d)), 6, 'Error reading'),
    'deleted _METADATA': (lambda d, s: os.remove(os.path.join(d, 'state', '_METADATA')), 6,
                          'state/_METADATA missing'),
    'another structure': (lambda d, s: _save_other(d, {'params': {'w': np.zeros(3, np.float32)}}), 8,
                          'tree structures do not match'),
    'NaN values': (lambda d, s: _save_other(d, jax.tree.map(lambda x: x * np.nan, s)), 8,
                   'holds NaN or inf'),
}


@pytest.mark.parametrize('kind', DAMAGE)
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(trained, tmp_path, capsys, kind):
  damage, bad, reason = DAMAGE[kind]
  workdir = _copy(trained, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '6'), trained[1])
  train.run(tiny_config('erm', epochs=3), workdir)

  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.startswith('Checkpoint step')]
  good = 4 if bad == 6 else 6
  assert len(lines) == 1 and lines[0].startswith(f'Checkpoint step {bad} cannot be restored (')
  assert reason in lines[0] and f'Resuming from step {good}.' in lines[0], lines[0]
  moved = os.path.join(workdir, 'checkpoints', f'{bad}.damaged')
  assert f'moved aside to {moved}' in lines[0] and os.path.isdir(os.path.join(moved, 'state'))
  # Resumed from good weights: steps 5-6 again give exactly the uninterrupted run's state.
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_state(workdir), trained[1])
  # The history shows every step once: the resumed run dropped the records after its start.
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in records if 'test_main' in r] == [2, 4, 6]


def test_no_checkpoint_restores_stops_and_moves_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (4, 6):
    os.remove(os.path.join(workdir, 'checkpoints', str(step), 'state', '_METADATA'))
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.run(tiny_config('erm', epochs=3), workdir)
  message = str(e.value)
  assert 'step 6: state/_METADATA missing' in message and 'step 4: state/_METADATA missing' in message
  assert 'rerun with the original config' in message
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6']


def test_max_to_keep_never_deletes_the_checkpoint_known_to_restore(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  train.run(tiny_config('erm', epochs=5, keep_checkpoints=1), workdir)  # resumes from 6, saves 8, 10
  assert _steps(workdir) == [6, 10]


def _diverging(**changes):
  """12 steps logged only at epoch ends; lr 0.01 for 6 steps, then 1e6 (NaN 2 or 3 steps later)."""
  config = tiny_config('erm', epochs=2, iters_per_epoch=6, log_every=6, **changes)
  config.optim.update(schedule='multistep', milestones=(1,), gamma=1e8)
  return config


def test_nan_between_log_steps_is_never_saved_and_the_rerun_resumes_from_good_weights(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  with pytest.raises(metrics.NonFiniteError) as e:
    train.run(_diverging(checkpoint_every=3), workdir)
  bad = int(re.search(r'at step (\d+)', str(e.value)).group(1))
  saved = _steps(workdir)
  assert saved == [3, 6] and bad in (8, 9), (saved, bad)  # 9 would have been saved with NaN weights
  for step in saved:
    state = checkpoint.load_state(os.path.join(workdir, 'checkpoints', str(step)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == 'f')
  assert 'Nothing after step 6 was saved' in str(e.value)

  config = _diverging(checkpoint_every=3)
  config.optim.gamma = 1.0  # the fix the message suggests: a lower learning rate
  summary = train.run(config, workdir)
  assert f'Resumed from {os.path.join(workdir, "checkpoints")} at step 6' in capsys.readouterr().out
  assert summary['steps'] == 12 and np.isfinite(summary['last']['test_main'])


def test_a_sigterm_save_is_checked_too(tmp_path, monkeypatch):
  monkeypatch.setattr(train._Preemption, 'requested', lambda self, step: step == 10)  # after the NaN
  with pytest.raises(metrics.NonFiniteError, match='Nothing after step 6 was saved'):
    train.run(_diverging(checkpoint_every=6), str(tmp_path))
  assert _steps(tmp_path) == [6]


# ---------------------------------------------------------------- the config, checked up front

# field=value -> the problem that must be reported (method: the one whose rules apply)
RANGES = [
    ('erm', 'image_size', 0, 'image_size=0: must be an integer in [1, inf)'),
    ('erm', 'batch_size', 0, 'batch_size=0: must be an integer in [1, inf)'),
    ('erm', 'batch_size', -4, 'batch_size=-4: must be an integer in [1, inf)'),
    ('erm', 'batch_size', 64, 'batch_size=64: larger than the training set (50 examples)'),
    ('erm', 'eval_batch_size', 0, 'eval_batch_size=0: must be an integer in [1, inf)'),
    ('erm', 'epochs', 0, 'epochs=0: must be an integer in [1, inf)'),
    ('erm', 'checkpoint_every', 0, 'checkpoint_every=0: must be an integer in [1, inf)'),
    ('erm', 'optim.lr', -0.1, 'optim.lr=-0.1: must be a number in (0, inf)'),
    ('erm', 'optim.milestones', (12,), 'optim.milestones=(12,): must be increasing epochs in [1, 2]'),
    ('erm', 'data.sampling_rate', 150, 'data.sampling_rate=150: must be a number in (0, 100]'),
    ('erm', 'data.val_fraction', 1.0, 'data.val_fraction=1.0: must be a number in [0, 1)'),
    ('erm', 'model.depth', 7, 'model.depth: Unsupported ResNet depth 7'),
    ('concept_tuning', 'method.patch_size', 64, 'method.patch_size=64: must be an integer in [1, 32] '
     '(image_size=32)'),
    ('concept_tuning', 'method.confusing', 10, 'method.confusing=10: must be an integer in [1, 9]'),
    ('concept_tuning', 'method.queue_size', 0, 'method.queue_size=0: must be an integer in [1, inf)'),
    ('concept_tuning', 'method.top_neg', 100, 'method.top_neg=100: must be an integer in [1, 81]'),
]


@pytest.mark.parametrize('method, field, value, problem', RANGES,
                         ids=[f'{f}={v}' for _, f, v, _ in RANGES])
def test_each_range_is_checked_before_anything_is_created(tmp_path, method, field, value, problem):
  config = tiny_config(method)
  *parents, key = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[key] = value
  with pytest.raises(validate.ConfigError) as e:
    train.run(config, str(tmp_path / 'run'))
  assert problem in str(e.value)
  assert os.listdir(tmp_path) == []  # no empty workdir left behind


def test_every_problem_is_reported_at_once(tmp_path):
  config = tiny_config('concept_tuning', image_size=0, batch_size=0)
  config.optim.lr = 0.0
  (tmp_path / 'file').write_text('')
  with pytest.raises(validate.ConfigError) as e:
    validate.check(config, str(tmp_path / 'file'))
  message = str(e.value)
  assert message.startswith('4 problem(s) in the config (nothing was run or created)')
  for field in ('--workdir=', 'image_size=0', 'batch_size=0', 'optim.lr=0.0'):
    assert f'\n  {field}' in message
  assert validate.check(tiny_config(batch_size=64, repeats_in_batch=True), str(tmp_path / 'ok')).num_train == 50


def test_config_argument_of_the_wrong_type_is_named():
  from configs import cub200
  with pytest.raises(ValueError, match=r"Config argument sr='abc': must be int, e\.g\. sr=100"):
    cub200.get_config('sr=abc')


def test_workdir_that_is_a_file_is_one_line_from_the_command(tmp_path):
  (tmp_path / 'run').write_text('not a directory')
  result = subprocess.run(
      [sys.executable, '-m', 'concept_jax.main', '--config', 'configs/cub200.py:tiny,method=erm',
       '--config.image_size=0', '--workdir', str(tmp_path / 'run')],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert f'--workdir={tmp_path / "run"}: is a file, not a directory' in result.stderr
  assert 'image_size=0: must be an integer in [1, inf)' in result.stderr


def test_file_system_errors_become_one_line(trained, tmp_path, capsys, monkeypatch):
  """A workdir that stops being writable by the end of the run (results.json): a short message."""
  workdir = _copy(trained, tmp_path)
  os.mkdir(os.path.join(workdir, 'results.json.tmp'))  # open(..., 'w') fails like a read-only disk
  with pytest.raises(OSError) as e:
    train.run(tiny_config('erm', epochs=3), workdir)
  assert main.error_message(e.value) == (
      f'Is a directory: {workdir}/results.json.tmp. Check that --workdir and the paths in the config '
      'are on a writable file system with free space.')
  # The command prints that and leaves at once (interpreter shutdown can hang on a tf.data thread).
  monkeypatch.setattr(os, '_exit', lambda code: (_ for _ in ()).throw(SystemExit(code)))
  with pytest.raises(SystemExit, match='1'):
    main.fail(e.value, verbose=False)
  assert capsys.readouterr().err.startswith('concept_jax: error: Is a directory: ')


# ---------------------------------------------------------------- weights and data

def test_wrong_shaped_weight_is_a_shape_mismatch(tmp_path):
  state = torchvision_state_dict(0)
  state['conv1.weight'] = state['conv1.weight'].reshape(WIDTH, -1)  # 2-D where a conv kernel belongs
  save_file(state, str(tmp_path / 'w.safetensors'))
  model = Classifier(num_classes=3, depth=0, width=WIDTH, source_classes=10)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False))
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  with pytest.raises(ValueError) as e:
    pretrained.merge(init, pretrained.load(str(tmp_path / 'w.safetensors')))
  message = str(e.value)
  assert 'Shape mismatches (1):\n  params/backbone/conv1/kernel: checkpoint (8, 147) vs model (7, 7, 3, 8); ' \
         'likely a different rank' in message
  assert 'Missing' not in message and 'Unexpected' not in message


def test_torch_advice_to_load_unsafely_is_not_passed_on(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; .pth files need it')
  torch.save({'conv1.weight': torch.zeros(1), 'hook': print}, tmp_path / 'pickled.pth')
  with pytest.raises(ValueError) as e:
    pretrained.load(str(tmp_path / 'pickled.pth'))
  assert 'Unsupported global' in str(e.value) and 'weights_only=False' not in str(e.value)


def _folder(root, classes, empty=()):
  for split in ('train', 'test'):
    for c in classes + list(empty):
      os.makedirs(root / split / c)
    for c in classes:
      for i in range(2):
        Image.new('RGB', (24, 20), (40 * i, 90, 200)).save(root / split / c / f'{i}.jpg')
  (root / 'train' / classes[0] / 'notes.txt').write_text('not an image')


def test_empty_class_folder_is_refused_or_skipped_with_a_warning(tmp_path, capsys):
  root, data_dir = tmp_path / 'pics', str(tmp_path / 'tfds')
  _folder(root, ['ant', 'bee', 'cat'], empty=['dog'])
  args = ['--data=image_folder', f'--data_dir={data_dir}', f'--manual_dir={root}']
  assert prepare.main(args) == 2
  err = capsys.readouterr().err
  assert '2 class folder(s) hold no images' in err and f'{root}/train/dog' in err
  assert '--skip_empty_classes' in err

  assert prepare.main(args + ['--skip_empty_classes']) == 0
  out, err = capsys.readouterr()
  assert 'left out 2 class folder(s) without images' in err
  assert "skipped 1 file(s) that are not images" in err and f'{root}/train/ant/notes.txt' in err
  assert out.strip().endswith("3 classes: ant, bee, cat")


# ---------------------------------------------------------------- metrics

def test_metrics_keep_only_records_up_to_the_restored_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "test_main": 5.0}\n{"step": 3, "loss": 1.0}\n'
                  '{"step": 4, "lo')  # the last line torn by kill -9
  metrics.keep_until(str(path), 2)
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "test_main": 5.0}\n'
  assert not os.path.exists(str(path) + '.tmp')


def test_tensorboard_summaries_hold_the_logged_scalars(trained):
  import tensorflow as tf
  events = glob.glob(os.path.join(trained[0], 'events.out.tfevents.*'))
  assert len(events) == 1
  losses = {}
  for event in tf.compat.v1.train.summary_iterator(events[0]):
    for v in event.summary.value:
      assert v.metadata.plugin_data.plugin_name == 'scalars'
      if v.tag == 'loss':
        losses[event.step] = float(tf.make_ndarray(v.tensor))
  records = [json.loads(l) for l in open(os.path.join(trained[0], 'metrics.jsonl'))]
  assert losses == pytest.approx({r['step']: r['loss'] for r in records if 'loss' in r})
