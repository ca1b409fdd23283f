"""The trainer end to end on tiny configs: checkpoints, errors, the NaN guard (resume exactness for
every method: test_methods.py)."""
import json
import os

import jax
import pytest

from concept_jax import checkpoint, metrics, train
from tests.conftest import tiny_config


def test_config_resume_continues_another_runs_checkpoint(tmp_path):
  """Precedence: the workdir's own checkpoints first, then config.resume, then pretrained weights."""
  half = tiny_config('erm')
  half.epochs = 1
  train.run(half, str(tmp_path / 'first'))
  continued = tiny_config('erm', resume=str(tmp_path / 'first'))
  continued.pretrained.path = str(tmp_path / 'does-not-exist')   # never read: resume wins
  assert train.run(continued, str(tmp_path / 'second'))['steps'] == 4
  assert checkpoint.Checkpointer(str(tmp_path / 'first')).latest_step() == 2
  # Rerunning now resumes from 'second' itself (step 4, nothing left), not from config.resume.
  assert train.run(continued, str(tmp_path / 'second'))['steps'] == 4


@pytest.mark.parametrize('field', ['workdir', 'resume'])
def test_url_paths_are_refused_before_anything_is_written(tmp_path, monkeypatch, field):
  # os.makedirs('gs://b/run') would create ./gs:/b/run and keep the run on this machine's disk.
  monkeypatch.chdir(tmp_path)
  config = tiny_config('erm', resume='gs://bucket/old' if field == 'resume' else '')
  workdir = 'gs://bucket/run' if field == 'workdir' else str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r"URL paths are not supported yet.*gcsfuse mount"):
    train.run(config, workdir)
  assert os.listdir(tmp_path) == []


def test_results_and_metrics_are_written(tmp_path):
  summary = train.run(tiny_config('erm'), str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    assert json.load(f) == summary
  assert set(summary) >= {'official', 'held_out', 'last'}
  assert summary['environment']['backend'] == 'cpu' and summary['environment']['jax'] == jax.__version__
  # XLA:CPU's kernels, and so the numbers, depend on the CPU model and on the number of cores.
  assert summary['environment']['cpu'] and summary['environment']['cpu_cores'] >= 1
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == [1, 2, 3, 4]
  assert {'loss', 'lr', 'grad_norm', 'accuracy', 'steps_per_sec'} <= set(train_records[0])
  evals = [r for r in records if 'test_main' in r]
  assert len(evals) == 2 and all(0 <= r['test_main'] <= 100 for r in evals)


def test_the_cpu_is_described_by_model_and_the_features_xla_picks_kernels_by():
  x86 = ('processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n'
         'model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx avx2 fma avx512f amx_tile\n\n'
         'processor\t: 1\nmodel name\t: another\n')
  assert metrics.cpu_description(x86) == 'Intel(R) Xeon(R) Platinum 8480+ (6/143), avx2 fma avx512f amx_tile'
  arm = 'processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n'
  assert metrics.cpu_description(arm) == 'CPU implementer 0x41, asimd sve'


def test_reading_a_runs_weights_logs_no_warning(tmp_path, caplog):
  # A fine-tuning stage reads its source run this way; Orbax warned that a metadata file was missing
  # (it looked for the step's file in the item's directory), a line in the middle of `make demo`.
  train.run(tiny_config('erm'), str(tmp_path))
  with caplog.at_level('WARNING'):
    assert 'params' in checkpoint.load_variables(str(tmp_path))
  assert not [r.getMessage() for r in caplog.records if r.levelno >= 30]


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
  config = tiny_config('erm')
  config.optim.lr = 1e30
  with pytest.raises(metrics.NonFiniteError, match=r'at step \d+'):
    train.run(config, str(tmp_path))


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
  """A save killed midway leaves only a tmp directory, which is never taken for a checkpoint."""
  train.run(tiny_config('erm'), str(tmp_path))
  ckpt_dir = tmp_path / 'checkpoints'
  os.makedirs(ckpt_dir / '6.orbax-checkpoint-tmp-1234' / 'state')
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 4
  assert 'params' in checkpoint.load_variables(str(tmp_path))
