"""Data parallelism leaves the result alone: 1 device, 4 devices and 2 processes x 2 devices train to
the same state (to float32 rounding), the methods' global state included, and 2 processes resume from
their shared checkpoint to that state too. 2 processes x 2 devices (4 devices across processes) run
ERM, Concept-Tuning (key encoder, queues) and DELTA (frozen starting weights, channel attention);
1 process x 4 devices runs ERM and the global state the other run lacks: Bi-Tuning's key encoder and
queues, L2-SP's frozen starting weights. (The methods the two layouts share cost minutes on 2 cores
and would check the same sharded code.)

The reference runs in the test process (one CPU device), the other layouts in processes of their
own, since the device count is fixed when JAX starts: CPU devices faked with JAX_NUM_CPU_DEVICES, the
two processes started by launch/local.sh and talking through jax.distributed with gloo CPU
collectives. The global batch (4) and every other setting are equal, so any difference beyond
rounding is a bug: BatchNorm statistics or gradients taken per device, a queue written per shard, an
input row read twice...
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from concept_jax import checkpoint
from tests.conftest import ROOT, subprocess_env, tiny_config

TIMEOUT_S = 480  # per launch: a cold one compiles every stage in each of two processes (~2 min idle)


def configs() -> dict:
  """The runs compared, by name (also their directory in a layout's workdir)."""
  ct = tiny_config('concept_tuning')
  # beta = 0: the concept contrast is still computed and its keys enqueued, but it adds no gradient.
  # Its positives and negatives are the top entries of Sinkhorn plans, and in this tiny random
  # network a sample's 9 patch embeddings nearly coincide, so the plans are flat (every entry
  # ~log(1/81)) and which entries come first is decided by rounding. Rounding differs between
  # layouts (BatchNorm statistics and gradients are summed in another order, ~1e-7), so other
  # entries are picked: the loss moves by 1e-3 at step 1 and the state by O(1) after 4 steps.
  # (The official code has the same sensitivity; on a trained model the top plan entries are also
  # near ties.) lr 1e-3: the recipe's 1e-2 on a random network with gradient norm ~240 amplifies
  # the same rounding to ~1e-4 relative in the momentum after 4 steps.
  ct.method.beta = 0.0
  ct.optim.lr = 1e-3
  # Bi-Tuning: its key encoder and queues are global state like Concept-Tuning's, written from the
  # whole batch; lr 1e-3 for the same reason.
  bt = tiny_config('bi_tuning')
  bt.optim.lr = 1e-3
  # L2-SP and DELTA: frozen starting weights in the state; DELTA's attention is computed by every
  # process from the whole training set and cached by process 0.
  return {'erm': tiny_config('erm'), 'concept_tuning': ct, 'bi_tuning': bt, 'l2_sp': tiny_config('l2_sp'),
          'delta': tiny_config('delta')}


def train_all(workdir: str, names=None) -> None:
  """Runs the configs of `configs` named (all: None) into workdir/<name>."""
  from concept_jax import train
  for name, config in configs().items():
    if names is None or name in names:
      train.run(config, os.path.join(workdir, name))


def _env(**extra) -> dict:
  env = subprocess_env(**extra)
  # A --xla_force_host_platform_device_count here would fight JAX_NUM_CPU_DEVICES; the suite's
  # fast-compile flags stay (every layout compiles with them alike).
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  return env


def _run(command: list, env: dict) -> subprocess.CompletedProcess:
  """Runs command to completion: see `_finish`."""
  return _finish(_start(command, env))


def _start(command: list, env: dict) -> subprocess.Popen:
  """Starts command in its own process group (so `_finish` can kill launched children too)."""
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, context=lambda: '') -> subprocess.CompletedProcess:
  """Waits for proc, kills its whole group when it exits or overruns TIMEOUT_S, and asserts it
  succeeded; context() adds to the failure message (e.g. the processes' logs)."""
  command = proc.args
  try:
    out, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f'{command[:3]} did not finish in {TIMEOUT_S} s.\n{out[-2000:]}\n{err[-3000:]}')
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode == 0, (f'{command[:3]} exited with {proc.returncode}:\n{err[-3000:]}'
                                f'{context()}')
  return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _two_processes(tmp_path, get_config_body: str):
  """(command, env) of launch/local.sh with 2 CPU processes x 2 devices on a config whose
  get_config() body is given, workdir tmp_path/'run', logs in tmp_path/'logs'. Set env's PORT per
  launch (a fresh `_free_port()`)."""
  config = tmp_path / 'config.py'
  config.write_text('from tests.test_distributed import configs\n\n\ndef get_config():\n'
                    + get_config_body)
  command = ['bash', os.path.join(ROOT, 'launch', 'local.sh'), '2', f'--config={config}',
             f'--workdir={tmp_path / "run"}']
  return command, _env(CPU_DEVICES='2', PYTHON=sys.executable, LOG_DIR=str(tmp_path / 'logs'))


def _train_on_devices(workdir, devices: int, names) -> None:
  code = f'from tests.test_distributed import train_all; train_all({str(workdir)!r}, {names!r})'
  run = _run([sys.executable, '-c', code], _env(JAX_NUM_CPU_DEVICES=str(devices)))
  assert f'{devices} device(s), 1 process(es)' in run.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _results_json(workdir) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def _results(workdir) -> dict:
  """results.json without its environment record (the devices and processes differ by design)."""
  results = _results_json(workdir)
  del results['environment']
  return results


def _environment(workdir) -> dict:
  return _results_json(workdir)['environment']


def assert_same_state(path_a, path_b) -> None:
  """Whole saved states equal to rtol 1e-4 / atol 1e-5, the momentum buffers to 1e-4 of their
  largest entry: a gradient entry is a sum over the batch and positions whose terms mostly cancel,
  so reordering that sum moves it by float32 rounding of the terms, not of the small result."""
  a, b = checkpoint.load_state(path_a), checkpoint.load_state(path_b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    x, y = np.asarray(x), np.asarray(y)
    atol = 1e-4 * max(1.0, float(np.abs(y).max())) if "['trace']" in name else 1e-5
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=f'{path_a} vs {path_b}: {name}')


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  """Workdir of the reference runs: one process, one device (this one: a test process has one CPU
  device, and its compile settings are the ones its subprocesses inherit)."""
  assert jax.device_count() == 1, f'the reference layout needs 1 device; this process has {jax.devices()}'
  workdir = tmp_path_factory.mktemp('one_device')
  train_all(str(workdir))
  return workdir


@pytest.fixture(scope='module')
def four_devices(tmp_path_factory):
  """Workdir of FOUR_DEVICES's runs in one process over 4 devices (1 example each)."""
  workdir = tmp_path_factory.mktemp('four_devices')
  _train_on_devices(workdir, 4, FOUR_DEVICES)
  return workdir


FOUR_DEVICES = ('erm', 'bi_tuning', 'l2_sp')


@pytest.mark.parametrize('name', FOUR_DEVICES)
def test_four_devices_train_like_one(one_device, four_devices, name):
  assert_same_state(four_devices / name, one_device / name)
  assert _results(four_devices / name) == _results(one_device / name)
  assert _environment(four_devices / name)['devices'] == '4 x cpu'
  assert _environment(one_device / name)['devices'] == '1 x cpu'


# One launch runs ERM, Concept-Tuning and DELTA as the stages of one config (a multi-host comparison
# works this way: the processes must agree on every stage they run), then a longer ERM stage that one
# process's SIGTERM interrupts. Bi-Tuning's state crosses processes through the same global-batch code
# as Concept-Tuning's, and L2-SP's frozen copy is DELTA's 'source' in kind: the four-device comparison
# checks them. DELTA: every process prepares its attention, and the resume reads the cache back.
COMPARED = ('erm', 'concept_tuning', 'delta')
STAGES_CONFIG = f"""  import ml_collections
  stages = {{n: configs()[n] for n in {COMPARED!r}}}
  # ERM's step program (same steps per epoch, so the same learning-rate milestone): a cache hit.
  stages['preempted'] = configs()['erm']
  stages['preempted'].update(epochs=20, eval_every_epochs=20, checkpoint_every=1000, log_every=1)
  return ml_collections.ConfigDict({{'stages': stages, 'stage_order': tuple(stages)}})
"""


def test_two_processes_train_preempt_and_resume_like_one(one_device, tmp_path):
  """launch/local.sh: 2 processes x 2 CPU devices, both writing one Orbax checkpoint per stage in
  workdir, train the compared stages to the one-process state. A preempted host gets SIGTERM alone
  in the last stage: jax.distributed's preemption service makes every process save the same step and
  exit cleanly. Then each compared stage's last checkpoint is removed, and the same command resumes
  every stage (the compared ones from step 2, read back by both processes; the preempted one from its
  saved step) and still ends in the one-process state."""
  command, env = _two_processes(tmp_path, STAGES_CONFIG)
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  log_0 = lambda: _read(logs / 'process_0.log')
  logs_tail = lambda: ''.join(f'\n{name}: {_read(logs / name)[-3000:]}'
                              for name in ('process_0.log', 'process_1.log'))

  def assert_like_one_device():
    for name in COMPARED:
      assert_same_state(workdir / name, one_device / name)
      assert _results(workdir / name) == _results(one_device / name)
      assert _environment(workdir / name)['processes'] == 2

  proc = _start(command, dict(env, PORT=str(_free_port())))
  try:
    # local.sh names the process ids first; process 0 logs every step.
    pids = proc.stderr.readline().split('(pids ')[1].split(')')[0].split()
    deadline = time.monotonic() + TIMEOUT_S
    while 'step 3/40' not in log_0():
      assert proc.poll() is None and time.monotonic() < deadline, logs_tail()
      time.sleep(0.2)
    os.kill(int(pids[1]), signal.SIGTERM)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  _finish(proc, logs_tail)
  log = log_0()
  assert '4 device(s), 2 process(es)' in log and 'SIGTERM: saved step' in log, log[-3000:]
  saved = int(log.split('SIGTERM: saved step ')[1].split()[0])
  assert 3 <= saved < 40 and os.path.isdir(workdir / 'preempted' / checkpoint.SUBDIR / str(saved))
  assert not os.path.exists(workdir / 'preempted' / 'results.json')
  assert_like_one_device()

  for name in COMPARED:
    checkpoints = workdir / name / checkpoint.SUBDIR
    assert sorted(os.listdir(checkpoints)) == ['2', '4']
    shutil.rmtree(checkpoints / '4')
    os.remove(workdir / name / 'results.json')
  _run(command, dict(env, PORT=str(_free_port())))
  # Process 0 reports for both; had process 1 not restored step 2 too, the states would differ.
  log = log_0()
  for name, step in [(n, 2) for n in COMPARED] + [('preempted', saved)]:
    assert f'Resumed from {workdir / name / checkpoint.SUBDIR} at step {step}' in log, log[-3000:]
  assert 'step 40/40' in log and _results(workdir / 'preempted')['steps'] == 40
  assert_like_one_device()


def _read(path) -> str:
  return path.read_text() if os.path.exists(path) else ''
