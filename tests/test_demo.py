"""The embedded default (configs/demo.py) end to end, in its fast setting."""
import importlib.util
import os

from concept_jax import experiment

from tests.conftest import ROOT


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location('demo', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_demo_stages_run_offline_and_print_a_table(tmp_path, capsys):
  summaries = experiment.run(_demo_config('fast'), str(tmp_path))
  out = capsys.readouterr().out
  assert [s['run'] for s in summaries] == ['pretrain', 'erm', 'concept_tuning']
  assert out.count(f'Loaded pretrained weights from {tmp_path / "pretrain"}') == 2
  table = out[out.index('run '):]
  for s in summaries:
    assert 0 <= s['official']['top1'] <= 100 and 'held_out' in s
    assert s['run'] in table
  # A rerun reads finished stages back instead of training again.
  assert experiment.run(_demo_config('fast'), str(tmp_path)) == summaries
