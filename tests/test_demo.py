"""The embedded default end to end, in its fast setting: `make demo`'s command (two worker processes
share the six runs; nothing is downloaded), then a rerun that reads every finished run back."""
import importlib.util
import os
import subprocess
import sys

from concept_jax import experiment, main

from tests.conftest import ROOT, subprocess_env


def _config(arg):
  spec = importlib.util.spec_from_file_location('nt', os.path.join(ROOT, 'configs', 'negative_transfer.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_demo_runs_offline_in_two_processes_and_prints_the_negative_transfer_table(tmp_path):
  config = _config('demo,fast')
  assert set(config.comparison.runs.values()[0]) >= {'row', 'rate', 'seed'}
  rows = sorted(r['row'] for r in config.comparison.runs.values())
  assert rows == ['ERM from clean', 'ERM from spurious', 'concept_tuning from spurious', 'scratch']
  workdir = tmp_path / 'demo'
  command = [sys.executable, '-m', 'concept_jax.main', '--config=configs/negative_transfer.py:demo,fast',
             f'--workdir={workdir}', '--workers=2']
  env = subprocess_env(TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  helper = (workdir / 'worker_1.log').read_text()
  started = lambda text: {line.split()[1] for line in text.splitlines()
                          if line.startswith('[') and ' ... (elapsed' in line}
  mine, theirs = started(done.stdout), started(helper)
  assert mine and theirs and not mine & theirs, (  # a string: pytest would shorten a tuple's repr
      f'main ran {sorted(mine)}, the helper {sorted(theirs)}; the end of the helper log:\n{helper[-3000:]}')
  assert mine | theirs == set(config.stage_order)   # the demo's six stages, each run once
  assert config.stage_order[0] in mine              # the helper waited for the main process's first
  assert f'Helper 1 at niceness {min(19, os.nice(0) + main.HELPER_NICENESS)}\n' in helper
  assert not list(workdir.rglob(experiment.LOCK))
  # Both fine-tunes from the spurious source read its weights, whichever process ran them.
  both = done.stdout + helper
  assert both.count(f'Loaded pretrained weights from {workdir / "s0_source_spurious"}') == 2
  for row in rows:                                  # the table and sentence, from the main process
    assert row in done.stdout
  assert 'ERM from spurious is' in done.stdout and 'ERM from spurious is' not in helper
  for name in ('results.csv', 'results.md', 'results.png'):
    assert os.path.getsize(workdir / name) > 0
  # The fine-tuned runs read their target data; the sources were evaluated with shuffled colours too.
  assert 'colours shuffled' in (workdir / 'results.md').read_text()
  # A rerun reads every finished run back instead of training again; its helper, which waits until the
  # main process has taken a stage, is let go when there is none to take (a timeout, not a hang).
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  out = again.stdout
  assert out.count('finished earlier') == len(config.stage_order) and 'steps of batch' not in out
  assert 'ERM from spurious is' in out
