"""`python -m concept_jax.main` as a user runs it: a real run on JPEGs, SIGTERM, and its error messages."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from concept_jax import runtime
from tests.conftest import ROOT, subprocess_env

TINY_ERM = ['--config', 'configs/cub200.py:tiny,method=erm', '--config.model.depth=0',
            '--config.image_size=32', '--config.batch_size=4', '--config.eval_batch_size=8',
            '--config.data.synthetic.num_classes=10', '--config.data.synthetic.test_per_class=2']


def _main(*args, **kwargs):
  return subprocess.run([sys.executable, '-m', 'concept_jax.main', *args], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300, **kwargs)


def _jpeg_folder(root, classes=5, train=3, test=2):
  rng = np.random.default_rng(0)
  for split, n in (('train', train), ('test', test)):
    for c in range(classes):
      os.makedirs(root / split / f'class_{c}')
      for i in range(n):
        pixels = rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / f'class_{c}' / f'{i}.jpg')


def test_two_steps_on_a_folder_of_jpegs(tmp_path):
  _jpeg_folder(tmp_path / 'images')
  data_dir = tmp_path / 'tfds'
  prepare = subprocess.run(
      [sys.executable, '-m', 'concept_jax.data.prepare', '--data=image_folder', f'--data_dir={data_dir}',
       f'--manual_dir={tmp_path / "images"}'], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
  assert prepare.returncode == 0, prepare.stderr
  run = _main(*TINY_ERM, '--config.data.name=image_folder', f'--config.data.data_dir={data_dir}',
              f'--config.data.manual_dir={tmp_path / "images"}', '--config.epochs=1',
              '--config.iters_per_epoch=2', '--workdir', str(tmp_path / 'run'))
  assert run.returncode == 0, run.stderr[-3000:]
  assert '5 classes, 15 train' in run.stdout
  assert os.path.exists(tmp_path / 'run' / 'results.json')
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')


def test_sigterm_saves_and_the_rerun_resumes(tmp_path):
  args = [*TINY_ERM, '--config.epochs=1', '--config.iters_per_epoch=200', '--config.checkpoint_every=1000',
          '--config.log_every=1', '--workdir', str(tmp_path)]
  proc = subprocess.Popen([sys.executable, '-m', 'concept_jax.main', *args], cwd=ROOT, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith('step 3/'):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM: saved step' in out
  saved = int(out.split('SIGTERM: saved step ')[1].split()[0])
  assert 3 <= saved < 200
  assert os.path.isdir(tmp_path / 'checkpoints' / str(saved))
  rerun = _main(*args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'at step {saved}' in rerun.stdout
  assert os.path.exists(tmp_path / 'results.json')


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/cub200.py:bogus=1'], "Unknown config argument 'bogus'; valid arguments"),
    (['--config', 'configs/cub200.py', '--config.optim.bogus=1'], "'bogus' is not a config field here"),
    (['--config=configs/cub200.py', '--config.bogus=1'], "valid fields: ['batch_size'"),
    (['--config=configs/cub200.py:tiny', '--workers=2'], '--workers=2 shares the stages of a stages '
                                                        'config or a comparison'),
    (['--config=configs/negative_transfer.py:demo', '--workers=0'], '--workers=0: give 1 or more'),
])
def test_unknown_config_keys_and_bad_flags_are_named(tmp_path, args, message):
  run = _main(*args, '--workdir', str(tmp_path))
  assert run.returncode != 0
  assert message in run.stderr
  assert 'Traceback' not in run.stderr


def test_missing_data_set_says_how_to_prepare_it(tmp_path):
  run = _main('--config', 'configs/cub200.py', f'--config.data.data_dir={tmp_path}', '--workdir',
              str(tmp_path / 'run'))
  assert run.returncode != 0
  assert 'python -m concept_jax.data.prepare --data=cub200' in run.stderr
  assert 'Traceback' not in run.stderr


def test_wrong_weight_file_is_explained(tmp_path):
  bad = tmp_path / 'resnet50.safetensors'
  bad.write_bytes(b'not a safetensors file')
  run = _main(*TINY_ERM, f'--config.pretrained.path={bad}', '--workdir', str(tmp_path / 'run'))
  assert run.returncode != 0
  assert 'not a readable .safetensors file' in run.stderr
  assert 'Traceback' not in run.stderr


@pytest.mark.parametrize('user_setting', ['', 'glibc.malloc.arena_max=2'])
def test_entry_points_restart_with_the_allocator_settings_and_cache_compilations(tmp_path, user_setting):
  env = subprocess_env(XDG_CACHE_HOME=str(tmp_path), GLIBC_TUNABLES=user_setting)
  env.pop('JAX_COMPILATION_CACHE_DIR')
  code = ('import os; from concept_jax import runtime; runtime.restart_with_malloc_settings(); '
          'print(os.environ["GLIBC_TUNABLES"]); print(runtime.persistent_compilation_cache())')
  done = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  tunables, cache = done.stdout.split()
  assert tunables == (user_setting or runtime.MALLOC_TUNABLES)   # a user's malloc setting is kept
  assert cache == str(tmp_path / 'concept_jax' / 'xla')


@pytest.mark.parametrize('command, help_flag, usage', [
    ('concept_jax.main', '--helpfull', 'python -m concept_jax.main) --config'),
    ('concept_jax.compare', '--helpfull', 'python -m concept_jax.compare --config'),
    ('concept_jax.bench', '--help', 'usage: python -m concept_jax.bench')])
def test_the_command_restarts_before_importing_jax(tmp_path, command, help_flag, usage):
  # -X importtime is kept across the restart (sys.orig_argv), so both processes report their imports:
  # jax imported once means the first process replaced itself before paying for it (1 s of CPU).
  env = subprocess_env(XDG_CACHE_HOME=str(tmp_path), GLIBC_TUNABLES='')
  done = subprocess.run([sys.executable, '-X', 'importtime', '-m', command, help_flag],
                        env=env, cwd=ROOT, capture_output=True, text=True)
  assert usage in done.stdout, done.stderr[-2000:]  # the help: the module's docstring
  imports = [line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines()
             if line.startswith('import time:')]
  assert imports.count('concept_jax.runtime') == 2   # both processes ran the module's first lines
  assert imports.count('jax') == 1


def test_the_compilation_cache_keeps_what_an_entry_point_compiles(tmp_path):
  # With the size bound the entry points set: JAX turns a bounded cache off, with only a warning,
  # where filelock is missing; a second process must find the first one's program.
  env = subprocess_env(XDG_CACHE_HOME=str(tmp_path))
  for key in ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE'):
    env.pop(key)
  code = ('import warnings; import jax; from concept_jax import runtime; warnings.simplefilter("error"); '
          'runtime.persistent_compilation_cache(); print(jax.config.jax_compilation_cache_max_size); '
          'jax.config.update("jax_persistent_cache_min_compile_time_secs", 0); '  # a quick program too
          'jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()')
  entries = []
  for _ in range(2):
    done = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(runtime.CACHE_MAX_BYTES)]
    entries.append({f for f in os.listdir(tmp_path / 'concept_jax' / 'xla') if f.endswith('-cache')})
  assert entries[0] and entries[1] == entries[0]  # written by the first process, read by the second


def test_a_helper_that_failed_is_named_with_the_end_of_its_log(tmp_path, capsys):
  from concept_jax import main
  helpers = []
  for k, code in ((1, 0), (2, 3)):
    with open(tmp_path / f'worker_{k}.log', 'w') as log:
      helpers.append(subprocess.Popen(
          [sys.executable, '-c', f'print("[1/2] a ..."); print("concept_jax: error: boom {k}"); exit({code})'],
          stdout=log, stderr=subprocess.STDOUT))
    helpers[-1].wait()
  main.stop_helpers(helpers, str(tmp_path))
  out = capsys.readouterr().out
  assert 'Helper process 2 ended with exit status 3' in out and 'concept_jax: error: boom 2' in out
  assert 'Helper process 1' not in out
