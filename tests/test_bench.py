"""The benchmark end to end: the CPU preset's ERM and Concept-Tuning rows, and a tiny pipeline run."""
import json
import math
import subprocess
import sys

import pytest

from concept_jax import methods
from concept_jax.bench import pipeline, run, settings
from tests.conftest import ROOT, subprocess_env

# Runs the benchmark with TensorFlow and tensorflow-datasets unimportable, as on the GPU machine.
_WITHOUT_TF = """
import importlib.abc, runpy, sys
class _NoTF(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} imported on the train-step path of concept_jax.bench')
sys.meta_path.insert(0, _NoTF())
sys.argv = ['concept_jax.bench'] + sys.argv[1:]
runpy.run_module('concept_jax.bench', run_name='__main__')
"""


def _positive_finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cpu_preset_train_rows(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, '--preset=cpu', '--steps=2', '--warmup=0', f'--out={out}',
       f'--profile={tmp_path / "profile"}'],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'concept_tuning' in result.stdout and 'erm' in result.stdout   # the printed table

  report = json.loads(out.read_text())
  assert report['environment']['platform'] == 'cpu' and report['environment']['jax']
  assert report['settings']['depth'] == 18 and report['settings']['steps'] == 2
  rows = report['rows']
  assert [(r['kind'], r['method'], r['batch'], r.get('views')) for r in rows] == [
      ('train_step', 'concept_tuning', 8, 4), ('train_step', 'erm', 8, 1),
      ('concept_loss', 'concept_loss', 8, None)]
  for row in rows:
    for key in ('init_s', 'lower_s', 'compile_s', 'first_step_s', 'step_median_s', 'step_p90_s',
                'images_per_s', 'steps_per_s'):
      assert _positive_finite(row[key]), (row['method'], key, row[key])
    assert len(row['step_times_s']) == 2 and row['step_p90_s'] >= row['step_median_s']
    assert row['images_per_s'] == pytest.approx(row['batch'] / row['step_median_s'])
    if row['memory_source'] == 'n/a':
      assert row['peak_memory_bytes'] is None
    else:
      assert _positive_finite(row['peak_memory_bytes'])
    assert all(math.isfinite(v) for v in row['last_step_metrics'].values()), row['last_step_metrics']
  assert {'concept_contrast', 'image_contrast', 'kl'} <= set(rows[0]['last_step_metrics'])
  # The CPU preset: K 4, confusing 5 -> 8 x (1 + 4 + 5 x 4) problems; Sinkhorn stops within its cap.
  assert rows[2]['sinkhorn_problems'] == 200
  for row in (rows[0], rows[2]):
    assert 1 <= row['last_step_metrics']['sinkhorn_iters'] <= 200
  assert 'Sinkhorn ran' in result.stdout

  # --profile: a trace and the compiled HLO per row; the OT loop is most of the concept loss's time.
  from concept_jax.bench import trace_summary
  for row in ('concept_tuning_b8', 'erm_b8', 'concept_loss_b8'):
    assert (tmp_path / 'profile' / row / 'hlo.txt').read_text().startswith('HloModule')
  summary = trace_summary.summarize(str(tmp_path / 'profile' / 'concept_loss_b8'))
  scopes = summary.split('JAX scope\n')[1].splitlines()
  assert scopes[0].endswith('  jvp()/while'), summary
  assert 'backbone' in trace_summary.summarize(str(tmp_path / 'profile' / 'erm_b8'))


def test_methods_with_statistics_or_a_source_head_have_rows_without_tensorflow(tmp_path):
  """DELTA and Co-Tuning compute their one-time statistics on the synthetic batch, LwF and Co-Tuning
  get a 1,000-way source head (the other methods need neither, like the rows above)."""
  out = tmp_path / 'bench.json'
  rows = ['delta', 'lwf', 'co_tuning']
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, '--preset=cpu', '--depth=0', '--steps=1', '--warmup=0',
       f'--rows={",".join(rows)}', f'--out={out}'],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert [r['method'] for r in report['rows']] == rows
  for row in report['rows']:
    assert _positive_finite(row['step_median_s']), row
    assert all(math.isfinite(v) for v in row['last_step_metrics'].values()), row

@pytest.mark.parametrize('source', ['synthetic', 'jpeg', 'digits'])
def test_pipeline_throughput(tmp_path, source):
  out = tmp_path / 'pipeline.json'
  args = ['--pipeline', '--batch=4', '--image_size=32', '--classes=10', '--pipeline_batches=2',
          '--pipeline_warmup=0', f'--out={out}', f'--pipeline_data={source}']
  if source == 'jpeg':
    args.append('--pipeline_jpeg_images=6')
  if source == 'digits':  # a prepared data set, read by name like cub200 would be
    from concept_jax.data import prepare
    prepare.prepare('digits', str(tmp_path / 'tfds'))
    args.append(f'--pipeline_data_dir={tmp_path / "tfds"}')
  report = run.main(args)
  assert json.loads(out.read_text()) == report
  (row,) = report['rows']
  assert row['batch_shape'] == [4, 4, 32, 32, 3]
  assert _positive_finite(row['samples_per_s']) and _positive_finite(row['first_batch_s'])
  assert row['images_per_s'] == pytest.approx(4 * row['samples_per_s'])
  assert report['settings']['pipeline_data'] == source
  expected = {'synthetic': 'synthetic, generated 64 px', 'jpeg': '6 generated JPEG files',
              'digits': 'digits ('}[source]
  assert expected in row['source']


def test_soak_reports_host_memory_over_the_run(tmp_path, capsys):
  report = run.main(['--soak', '--soak_steps=40', f'--out={tmp_path / "soak.json"}'])
  row, = report['rows']
  assert row['kind'] == 'soak' and row['steps'] == 40 and row['rss_start_step'] == 10
  assert sorted(row['rss_mib_by_step']) == [10, 20, 30, 40]  # a record every 10 steps
  assert all(_positive_finite(v) for v in row['rss_mib_by_step'].values())
  assert row['rss_growth_mib'] == row['rss_end_mib'] - row['rss_start_mib']
  assert json.loads((tmp_path / 'soak.json').read_text())['settings'] == {'soak_steps': 40, 'seed': 0}
  assert 'soak (40 erm steps' in capsys.readouterr().out


def test_jpeg_folder_is_shaped_like_cub(tmp_path):
  import tensorflow as tf
  pipeline.write_jpeg_folder(str(tmp_path), num_images=4, num_classes=3, seed=0)
  train = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / 'train').rglob('*.jpg'))
  assert train == ['train/c000/0.jpg', 'train/c000/3.jpg', 'train/c001/1.jpg', 'train/c002/2.jpg']
  assert len(list((tmp_path / 'test').rglob('*.jpg'))) == 3
  shapes = {tuple(tf.io.decode_jpeg(tf.io.read_file(str(tmp_path / p))).shape) for p in train}
  assert shapes == {(500, 375, 3), (375, 500, 3)}


def test_rows_are_parsed_and_bad_ones_explained():
  assert settings.parse_rows('concept_tuning, erm:128', 48) == [('concept_tuning', 48), ('erm', 128)]
  with pytest.raises(ValueError, match="erm:128"):
    settings.parse_rows('erm:big', 48)
  known = ', '.join(methods.names() + ('concept_loss',))
  with pytest.raises(ValueError, match=f"unknown row 'bogus'; rows are {known}"):
    settings.parse_rows('erm,bogus:8', 48)
  done = subprocess.run([sys.executable, '-m', 'concept_jax.bench', '--preset=cpu', '--rows=bogus'],
                        cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert done.stderr.startswith("concept_jax.bench: error: --rows item 'bogus': unknown row")


def test_trace_summary_counts_exclusive_device_time_and_names_jax_ops(tmp_path):
  from concept_jax.bench import trace_summary
  hlo = '\n'.join([
      '%fused_computation.1 (param_0: f32[4]) -> f32[4] {',
      '  %param_0 = f32[4]{0} parameter(0)',
      '  ROOT %exp.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(f)/jvp()/while/body/exp"}',
      '}',
      'ENTRY %main (p: f32[4]) -> f32[4] {',
      '  %fusion.7 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1',
      '  ROOT %while.3 = f32[4]{0} while(%fusion.7), condition=%c, body=%b, '
      'metadata={op_name="jit(f)/jvp()/while" source_file="x.py"}',
      '}'])
  assert trace_summary.op_names(hlo) == {'exp.1': 'jit(f)/jvp()/while/body/exp',
                                        'fusion.7': 'jit(f)/jvp()/while/body/exp',
                                        'while.3': 'jit(f)/jvp()/while'}
  meta = lambda pid, name: {'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}
  op = lambda pid, ts, dur, name: {'ph': 'X', 'pid': pid, 'tid': 1, 'ts': ts, 'dur': dur,
                                   'args': {'hlo_op': name}}
  # Device track: a while (0-10 us) running fusion.7 twice inside it; the host's launch events of the
  # same operations (pid 1) must not count again.
  trace = {'traceEvents': [meta(1, '/host:CPU'), meta(2, '/device:GPU:0'),
                           op(2, 0, 10, 'while.3'), op(2, 2, 3, 'fusion.7'), op(2, 6, 2, 'fusion.7'),
                           op(1, 0, 50, 'fusion.7')]}
  assert trace_summary.op_times(trace) == {'while.3': 5.0, 'fusion.7': 5.0}
  # Without device tracks (the CPU backend) the host events are the operations.
  assert trace_summary.op_times({'traceEvents': [op(1, 0, 4, 'fusion.7')]}) == {'fusion.7': 4.0}
  with pytest.raises(FileNotFoundError, match='--profile=DIR'):
    trace_summary.summarize(str(tmp_path))


def test_negative_transfer_preset_has_the_benchmarks_shapes():
  """The preset times the steps of configs/negative_transfer.py (what `make demo` spends its time on)."""
  from configs import negative_transfer
  args = settings.parse_args(['--preset=negative_transfer'])
  bench_config = settings.make_config('concept_tuning', args.batch, args)
  demo_run = negative_transfer.get_config('demo').stages['s0_sr15_concept_tuning_spurious']
  for field in ('depth', 'width', 'stem', 'dtype', 'ib_dim'):
    assert bench_config.model[field] == demo_run.model[field], field
  for field in ('queue_size', 'confusing', 'patch_size'):
    assert bench_config.method[field] == demo_run.method[field], field
  assert (bench_config.image_size, bench_config.batch_size) == (demo_run.image_size, demo_run.batch_size)
  assert args.classes == 5
  assert settings.make_config('erm', 8, settings.parse_args(['--preset=cpu'])).model.stem == 'imagenet'
