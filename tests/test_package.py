"""The wheel, as a user installs it: built from the checkout, installed into a fresh virtual environment
outside it, used from another directory (the README's functional API, the `concept-jax` command).

The wheel is built without build isolation (setuptools is pinned in requirements-test.txt), so the test
needs no network. The fresh environment gets only the wheel (`--no-deps`): a .pth file puts the test
environment's site-packages after its own, so jax and TensorFlow are not installed again, while
concept_jax itself must come from the wheel. About 40 s of CPU time (a cold compile cache), mostly the
functional-API example and the one-step run in their own processes.
"""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT, subprocess_env
from tests.test_main import TINY_ERM
from tests.test_readme import check_example_output, functional_api_example

pytestmark = pytest.mark.package


def _run(*args, **kwargs):
  run = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(wheel, python, cwd, env): the wheel installed in a fresh venv; an empty cwd outside the checkout."""
  tmp = tmp_path_factory.mktemp('package')
  assert not str(tmp).startswith(ROOT)
  # Build from a copy of what a clone holds (tracked and new files, not ignored ones): an in-tree
  # build would leave build/ in the checkout, and a stale build/lib would ship deleted modules.
  files = _run('git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard', cwd=ROOT)
  for name in filter(None, files.split('\0')):
    if os.path.isfile(os.path.join(ROOT, name)):  # not a file deleted from the working tree
      os.makedirs(os.path.dirname(tmp / 'src' / name), exist_ok=True)
      shutil.copyfile(os.path.join(ROOT, name), tmp / 'src' / name)
  _run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', tmp / 'dist',
       tmp / 'src')
  [wheel] = (tmp / 'dist').iterdir()
  _run(sys.executable, '-m', 'venv', '--without-pip', tmp / 'venv')
  python = str(tmp / 'venv' / 'bin' / 'python')
  _run(sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', '--no-index', wheel)
  purelib = _run(python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))').strip()
  # The test environment's package folders (those a .pth of its own may add included), not the checkout.
  packages = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')]
  with open(os.path.join(purelib, 'test_environment.pth'), 'w') as f:
    f.write('\n'.join(packages) + '\n')
  env = subprocess_env()
  del env['PYTHONPATH']  # nothing from the checkout
  os.makedirs(tmp / 'cwd')
  return wheel, python, tmp / 'cwd', env


def test_the_wheel_holds_the_package_and_its_command_only(installed):
  wheel = installed[0]
  dist_info = '-'.join(wheel.name.split('-')[:2]) + '.dist-info'  # concept_jax-VERSION.dist-info
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split('/')[0] for n in names} == {'concept_jax', dist_info}  # no configs/, tests/
  modules = {os.path.relpath(os.path.join(d, f), ROOT)
             for d, _, fs in os.walk(os.path.join(ROOT, 'concept_jax')) for f in fs if f.endswith('.py')}
  assert modules == {n for n in names if n.endswith('.py')}
  entry_points = zipfile.ZipFile(wheel).read(f'{dist_info}/entry_points.txt').decode()
  assert 'concept-jax = concept_jax.__main__:cli' in entry_points


def test_readme_functional_api_runs_from_the_installed_wheel(installed):
  _, python, cwd, env = installed
  (cwd / 'example.py').write_text('import concept_jax\nprint(concept_jax.__file__)\n' + functional_api_example())
  out = _run(python, 'example.py', cwd=cwd, env=env)
  assert out.splitlines()[0].startswith(os.path.dirname(os.path.dirname(python)))  # the venv's copy
  check_example_output(out)


def test_the_command_runs_a_recipe_given_by_absolute_path(installed):
  _, python, cwd, env = installed
  command = os.path.join(os.path.dirname(python), 'concept-jax')
  # absl exits with status 1 after --help; what matters is that it shows main.py's flags.
  help_text = subprocess.run([command, '--help'], cwd=cwd, env=env, capture_output=True, text=True).stdout
  assert '--config: Config file' in help_text and '--workdir' in help_text
  config = ['--config', os.path.join(ROOT, TINY_ERM[1]), *TINY_ERM[2:]]
  out = _run(command, *config, '--config.epochs=1', '--config.iters_per_epoch=1',
             '--config.data.synthetic.train_per_class=2', '--workdir', 'run', cwd=cwd, env=env)
  assert 'erm on synthetic: 10 classes, 20 train' in out
  assert os.path.exists(cwd / 'run' / 'results.json')


def _requirements(path):
  """{name: pinned version} of a requirements file's `name==version` lines (markers and -r skipped)."""
  pins = {}
  for line in open(os.path.join(ROOT, path)):
    line = line.split('#')[0].strip()
    if '==' in line and ';' not in line:
      name, version = line.split('==')
      pins[name.strip().lower()] = version.strip()
  return pins


def test_the_package_declares_every_pinned_runtime_dependency():
  # A dependency missing from either list breaks one kind of install quietly: filelock, pinned in
  # neither, left `make demo`'s compilation cache off (JAX only warns) on environments without torch.
  import tomllib
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    declared = tomllib.load(f)['project']['dependencies']
  lower = {}
  for spec in declared:
    name, rest = spec.split('>=')
    lower[name.strip().lower()] = rest.split(',')[0].strip()
  assert lower == _requirements('requirements.txt')  # the pins are the lower bounds
