"""The embedded default (configs/negative_transfer.py:demo) end to end, in its fast setting."""
import importlib.util
import os

from concept_jax import compare

from tests.conftest import ROOT


def _config(arg):
  spec = importlib.util.spec_from_file_location('nt', os.path.join(ROOT, 'configs', 'negative_transfer.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_demo_runs_offline_and_prints_the_negative_transfer_table(tmp_path, capsys):
  config = _config('demo,fast')
  assert set(config.comparison.runs.values()[0]) >= {'row', 'rate', 'seed'}
  rows = sorted(r['row'] for r in config.comparison.runs.values())
  assert rows == ['ERM from clean', 'ERM from spurious', 'concept_tuning from spurious', 'scratch']
  compare.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count(f'Loaded pretrained weights from {tmp_path / "s0_source_spurious"}') == 2
  for row in rows:
    assert row in out
  for name in ('results.csv', 'results.md', 'results.png'):
    assert os.path.getsize(tmp_path / name) > 0
  # The fine-tuned runs read their target data; the sources were evaluated with shuffled colours too.
  assert 'colours shuffled' in (tmp_path / 'results.md').read_text()
  # A rerun reads every finished run back instead of training again.
  compare.run(config, str(tmp_path))
  assert 'finished earlier' in capsys.readouterr().out
