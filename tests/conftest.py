"""Shared test fixtures: tiny configs that run the real trainer in seconds on a CPU."""
import os

# Tests run on the CPU even where a GPU is visible, and need no TPU probing.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiling dominates the suite on 2 cores; these halve it and change no semantics (both sides of
# every equality test are compiled alike). Subprocesses inherit them.
_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FAST_COMPILE).strip()

import pytest  # noqa: E402

from concept_jax import methods, recipes, runtime  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
  """Environment for a child `python` running project code: CPU, unbuffered, the shared compile cache."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', PYTHONPATH=ROOT,
             GLIBC_TUNABLES=runtime.MALLOC_TUNABLES,  # what the entry points would restart with
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             # Unbounded, as in this process: a bounded cache keeps an access-time file per entry and
             # fails every write into a directory with entries that lack one; its eviction scan reads
             # every entry's file on each write, under a lock the suite's processes would queue on.
             JAX_COMPILATION_CACHE_MAX_SIZE='-1')
  env.update(extra)
  return env


def tiny_config(method: str = 'erm', **changes):
  """A complete config for a few-second run: synthetic 10-class data, the test-only ResNet."""
  c = recipes.base_config()
  c.method = recipes.method_config(method)
  c = recipes.tiny(c)
  c.data.synthetic.update(num_classes=10, train_per_class=6, test_per_class=3, image_size=48)
  c.data.val_fraction = 0.2
  c.image_size = 32
  c.model.update(depth=0, width=8)
  c.batch_size = 4
  c.epochs, c.iters_per_epoch, c.checkpoint_every = 2, 2, 2
  c.eval_batch_size = 8
  if method == 'concept_tuning':
    c.method.update(confusing=4, queue_size=3, patch_size=16)
  if methods.get(method).uses_source_head:
    c.model.source_classes = 7  # a small stand-in for ImageNet's 1000
  c.update(changes)
  return c


@pytest.fixture
def make_config():
  return tiny_config


def pytest_configure(config):
  # Many tests compile the same step (each train.run builds its own jitted closure); the persistent
  # cache turns the repeats into cache hits, which keeps the suite within minutes on 2 cores.
  import jax
  jax.config.update('jax_compilation_cache_dir', os.path.join(ROOT, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# `make test` runs the suite in 2 processes (pytest-xdist, whole files each, in this order): the
# longest file starts first, so that the two finish together.
SLOWEST_FILE = 'test_distributed.py'


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name != SLOWEST_FILE)  # stable: the rest keep their order


def small_stem_config(method, **changes):
  """tiny_config with the small-image stem: a 4x4 layer4 map at 32 px, so concept boxes differ."""
  c = tiny_config(method, epochs=1, **changes)
  c.model.stem = 'small'
  return c


@pytest.fixture(scope='session')
def concept_runs(tmp_path_factory):
  """ROOT/source (ERM) and ROOT/ct (Concept-Tuning from it), small-stem tiny runs, trained once."""
  from concept_jax import train
  root = tmp_path_factory.mktemp('runs')
  train.run(small_stem_config('erm'), str(root / 'source'))
  target = small_stem_config('concept_tuning')
  target.pretrained.path = str(root / 'source')
  train.run(target, str(root / 'ct'))
  return root
