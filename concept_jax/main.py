"""concept-jax (or python -m concept_jax.main) --config configs/NAME.py[:key=value,...] --workdir DIR

One run, a stages config (concept_jax/experiment.py) or a comparison (concept_jax/compare.py).
--workers=N runs a stages config with N processes on this machine: this one and N - 1 helpers it
starts (the same command with --worker_index=k, output in WORKDIR/worker_<k>.log), each taking the
next stage that is free and whose source has finished. One process keeps 2 CPU cores only 60% busy
(the benchmark's small network does not split well over threads): `make demo` uses --workers=2. The
helpers run HELPER_NICENESS steps down in priority and take no stage before this process has taken
its first: it takes the stages in order, so it runs the longest chain (a source model, then the
methods started from it) at full speed while the helpers use what it leaves (`make demo`: 2 min 51 s
against 3 min 04 s with equal priorities, 2026-12-02).
The processes are not pinned to cores: XLA:CPU's results depend on how many threads it splits work
over, so a pinned process would not reproduce a run made alone.
"""
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import traceback
from typing import Callable

from concept_jax import runtime

if __name__ == '__main__':
  # Before the imports below (jax, orbax, ...: 1.2 s of CPU), which the restarted process makes anyway.
  runtime.restart_with_malloc_settings()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from concept_jax import compare, distributed, experiment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, with optional :key=value arguments.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (multi-process).')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 "jax.distributed: 'auto' starts it when a coordinator is given.")
_WORKERS = flags.DEFINE_integer('workers', 1, 'Processes that run a stages config together on this '
                                'machine (this one starts the others); 2 on a 2-core CPU.')
_WORKER_INDEX = flags.DEFINE_integer('worker_index', 0, 'Set by --workers on the processes it starts '
                                     '(1, 2, ...): run stages until none is left to take; no table.')
_START_FD = flags.DEFINE_integer('start_fd', -1, 'Set by --workers on the processes it starts: a '
                                 'pipe they wait on until this process has taken its first stage.')
flags.mark_flags_as_required(['config', 'workdir'])
HELPER_NICENESS = 10

# Errors that describe bad input and say how to fix it (OSError: the file system's own, e.g. a full disk
# or a read-only workdir). Any error is shown without a traceback; --verbosity=1 shows it.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def error_message(e: Exception) -> str:
  """What the user sees of an error instead of its traceback."""
  if isinstance(e, OSError) and e.strerror:  # raised by the file system, not by our checks
    return (f'{e.strerror}: {e.filename}. Check that --workdir and the paths in the config are on a '
            'writable file system with free space.')
  if isinstance(e, USER_ERRORS):
    return str(e)
  lines = (getattr(e, 'message', None) or str(e)).strip().splitlines()  # tf errors carry .message
  return (f'{type(e).__name__}: {lines[0] if lines else ""}\n(unexpected: if the input looks right, '
          'please report it with the traceback)')


def config_errors(argv: list[str]) -> str:
  """'' when --config loads and every --config.a.b override names a field; else what is wrong."""
  specs = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  specs += [b for a, b in zip(argv, argv[1:]) if a == '--config']
  if not specs:
    return ''
  spec = specs[-1]
  path, _, arg = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except (OSError, ValueError) as e:
    return f'{spec}: {e}'
  for a in argv:
    if not a.startswith('--config.'):
      continue
    node = config
    for key in a[len('--config.'):].split('=', 1)[0].split('.'):
      if not hasattr(node, 'keys') or key not in node:
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return f'{a}: {key!r} is not a config field here; valid fields: {valid}.'
      node = node[key]
  return ''


def run(config, workdir: str, helper: bool = False, first_taken=None):
  """A comparison config (a `comparison` field) -> compare.run; else experiment.run."""
  if 'comparison' in config:
    return compare.run(config, workdir, helper=helper, first_taken=first_taken)
  return experiment.run(config, workdir, helper=helper, first_taken=first_taken)


def start_helpers(config, workdir: str, workers: int) -> tuple[list[subprocess.Popen], Callable]:
  """The workers - 1 helper processes of --workers, each logging to WORKDIR/worker_<k>.log, and the
  call that lets them take stages.

  They start at once, so that their imports overlap this process's, but take no stage before that
  call (they wait for the end of a pipe, --start_fd): made once this process has taken its first
  stage, it leaves this process, at full priority, the first stage in the order, the head of the
  longest chain, as the priorities intend. Before, a helper took it in 2 of 26 `make demo` runs
  (2026-12-02 and 03); those took no longer than their neighbours (once this process had nothing left
  to take, the helper had both cores), but their order was not the one the timings describe.
  """
  if workers < 1:
    raise ValueError(f'--workers={workers}: give 1 or more processes.')
  if workers == 1 or _WORKER_INDEX.value:
    return [], lambda: None
  if 'stages' not in config:
    raise ValueError(f'--workers={workers} shares the stages of a stages config or a comparison '
                     'among processes; this config is one run: leave --workers out.')
  if _NUM_PROCESSES.value > 1:
    raise ValueError('--workers starts processes on this machine; with --num_processes (one run over '
                     'several processes) leave it out.')
  os.makedirs(workdir, exist_ok=True)
  helpers, (wait_end, release_end) = [], os.pipe()
  for k in range(1, workers):
    command = [sys.executable, '-m', 'concept_jax.main', *sys.argv[1:], f'--worker_index={k}',
               f'--start_fd={wait_end}']
    with open(os.path.join(workdir, f'worker_{k}.log'), 'a') as log:
      helpers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                      pass_fds=(wait_end,)))
  os.close(wait_end)
  logs = ', '.join(f'worker_{k}.log' for k in range(1, workers))
  print(f'{workers - 1} helper process(es) started; their output: {logs} in {workdir}', flush=True)
  return helpers, functools.cache(lambda: os.close(release_end))  # closed once, their read ends


def stop_helpers(helpers: list[subprocess.Popen], workdir: str) -> None:
  """Ends the helpers when this process stops early (an error, SIGTERM): SIGTERM makes each save the
  stage it runs, which a rerun resumes. Names each helper that ended with an error: its stages were
  taken over (a dead process's lock is), so the table is complete, but the error is in its log."""
  for helper in helpers:
    if helper.poll() is None:
      helper.send_signal(signal.SIGTERM)
  for k, helper in enumerate(helpers, 1):
    if helper.wait() > 0:  # not when our SIGTERM ended it before it could save (< 0)
      log = os.path.join(workdir, f'worker_{k}.log')
      with open(log, errors='replace') as f:
        last = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
      print(f'Helper process {k} ended with exit status {helper.returncode}; the end of {log}:\n  '
            + '\n  '.join(last), flush=True)


def main(argv, run=run):
  del argv
  verbose = flags.FLAGS['verbosity'].present
  if not verbose:
    # Orbax logs every save step at INFO; --verbosity=0 brings that back.
    logging.set_verbosity(logging.WARNING)
  try:
    if _WORKER_INDEX.value:
      print(f'Helper {_WORKER_INDEX.value} at niceness {os.nice(HELPER_NICENESS)}', flush=True)
    if _START_FD.value >= 0:
      os.read(_START_FD.value, 1)  # nothing is written: returns when the main process closes it
      os.close(_START_FD.value)
    helpers, release = start_helpers(_CONFIG.value, _WORKDIR.value, _WORKERS.value)
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _DISTRIBUTED.value)
      run(_CONFIG.value, _WORKDIR.value, helper=_WORKER_INDEX.value > 0, first_taken=release)
    except BaseException:
      stop_helpers(helpers, _WORKDIR.value)  # a helper still waiting for the pipe ends at once
      raise
    release()  # if every stage had finished before, run took none: the helpers find that and end
    stages = _CONFIG.value.get('stage_order', ())
    if all(experiment.read_results(os.path.join(_WORKDIR.value, name)) for name in stages):
      for helper in helpers:  # each ends once it sees that; a SIGTERM could land between its
        helper.wait()         # last results.json and the release of that stage's lock
    stop_helpers(helpers, _WORKDIR.value)  # stopped early (SIGTERM): they save their stages too
  except Exception as e:  # pylint: disable=broad-except
    fail(e, verbose)


def fail(e: Exception, verbose: bool):
  """Prints the error (its message, or with --verbosity=1 its traceback) and exits with status 1 at once.

  At once: interpreter shutdown can deadlock on a tf.data iterator whose threads are still running (an
  error inside the input pipeline), and nothing is left to save (the trainer waited for its checkpoints).
  """
  if verbose:
    traceback.print_exception(e)
  else:
    print(f'concept_jax: error: {error_message(e)}\n(rerun with --verbosity=1 for the traceback)',
          file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def cli(run=run):
  """The command line; run(config, workdir) is what it calls (python -m concept_jax.compare: compare.run)."""
  runtime.restart_with_malloc_settings()  # already done when main.py runs as __main__
  problem = config_errors(sys.argv[1:])
  if problem:
    sys.exit(f'concept_jax: error: {problem}')
  runtime.persistent_compilation_cache()
  app.run(functools.partial(main, run=run))


if __name__ == '__main__':
  cli()
