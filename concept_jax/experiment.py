"""A run of one config, or of a sequence of stages (pre-train, then fine-tune with several methods).

A config with `stages` (a dict of full configs) and `stage_order` runs each stage in WORKDIR/<stage>;
a stage whose pretrained.path is '@NAME' starts from stage NAME's final checkpoint. A finished stage is
skipped on a rerun (its results.json is read back), an interrupted one resumes. A stage directory
remembers the config it was started with (WORKDIR/<stage>/stage_config.json): a stage whose config
has changed since is refused rather than read back, so a table never mixes old settings with new ones.
Before each stage a progress line gives its place in the order, the time so far and an estimate of
the time left. Several processes may run one stages config in the same workdir at once, e.g. one per
GPU or per host, or `--workers=2` on a 2-core CPU (concept_jax/main.py starts the others): each takes
the next stage that no other process holds (StageLock) and whose source has finished.
"""
import contextlib
import functools
import json
import os
import socket
import time
import types

import jax

from concept_jax import train, validate


def run(config, workdir: str, helper: bool = False, first_taken=None) -> list[dict]:
  """Runs config (or its stages); prints and returns one summary per run (helper, first_taken: see
  run_stages)."""
  if 'stages' not in config:
    summaries = [run_alone(config, workdir)]
  else:
    summaries = run_stages(config, workdir, helper=helper, first_taken=first_taken)
  if not helper:
    train.log(results_table(summaries))
  return summaries


def run_alone(config, workdir: str, runner=train.run) -> dict:
  """runner(config, workdir) (train.run) while WORKDIR/RUNNING names this process; ValueError, naming
  the other process, while another holds it: two runs writing one workdir would mix their checkpoints.
  The processes of one jax.distributed run share the workdir, so they take no lock."""
  if jax.process_count() > 1:
    return runner(config, workdir)
  validate.check(config, workdir)  # a bad config creates nothing, not even the lock's directory
  with StageLock(workdir) as lock:
    if not lock.held:
      raise ValueError(f'{workdir} is in use by another run (process {lock.owner or "starting"}, see '
                       f'{lock.path}). Wait for it to end, or give this run another --workdir.')
    return runner(config, workdir)


def run_stages(config, workdir: str, runner=train.run, poll: float = 2.0,
               helper: bool = False, first_taken=None) -> list[dict]:
  """Runs config.stage_order's stages, each in WORKDIR/<stage>; one summary per finished stage, in
  that order, each with 'run': its name. Stops after a stage interrupted by SIGTERM (the rerun
  resumes it).

  Each time, the process takes the first stage in the order that is unfinished, held by no other
  process (StageLock) and whose '@' source has finished; while there is none it waits (every `poll`
  seconds) for the other processes' stages. A helper (main's --workers) stops instead once every
  stage left is held by another process or waits for one; the others wait for the whole set.
  runner(config, run_dir) -> summary trains one run and writes RUN_DIR/results.json (train.run; tests
  pass a fake). first_taken(), if given, is called once: when this process has taken its first stage
  (before running it) or found none to take (main's --workers lets its helpers start there).

  Processes of one jax.distributed run (a multi-host job, launch/local.sh) train every stage together,
  so they act as one: no locks, and what has finished is what was read at the start plus what they
  trained, never a results.json that process 0 may not have written yet (the processes would choose
  differently and hang in each other's collectives). Such a group does not share a workdir with others.
  """
  group = jax.process_count() > 1
  first_taken = functools.cache(first_taken or (lambda: None))  # a cached call runs once
  order = tuple(config.stage_order)
  unknown = [name for name in order if name not in config.stages]
  if unknown:
    raise ValueError(f'stage_order names {unknown}, which are not in config.stages '
                     f'({sorted(config.stages)}).')
  validate.check_stages(config, workdir)  # every stage before the first one runs
  for name in order:
    check_stage_config(config.stages[name], os.path.join(workdir, name))
  number = {name: i for i, name in enumerate(order, 1)}
  start, timed, done, first_look = time.perf_counter(), [], {}, True
  while True:
    for name in order if first_look or not group else ():
      if name not in done and (summary := read_results(os.path.join(workdir, name))) is not None:
        done[name] = dict(summary, run=name)
        how = 'finished earlier' if first_look else 'finished by another process'
        train.log(f'[{number[name]}/{len(order)}] {name}: {how}, results.json read back')
    first_look = False
    pending = [name for name in order if name not in done]
    if not pending:
      break
    ready = [name for name in pending if _source(config.stages[name]) in (None, *done)
             or _source(config.stages[name]) not in config.stages]
    for name in ready:
      stage_dir = os.path.join(workdir, name)
      with contextlib.nullcontext(HELD) if group else StageLock(stage_dir) as lock:
        if not lock.held or (not group and read_results(stage_dir) is not None):
          continue
        first_taken()
        todo = [_work(config.stages[n]) for n in pending]
        train.log(f'[{number[name]}/{len(order)}] {name} ... '
                  f'({progress(time.perf_counter() - start, timed, todo)})')
        t = time.perf_counter()
        summary = runner(_resolve_references(config.stages[name], workdir), stage_dir)
        timed.append((*_work(config.stages[name]), time.perf_counter() - t))
      done[name] = dict(summary, run=name)
      if 'preempted_at' in summary or summary.get('stop_requested'):
        train.log(f'Stopped at stage {name}; the rest of the stages run when the command is repeated.')
        return [done[n] for n in order if n in done]
      break
    else:  # nothing to take now: the stages left are running elsewhere or wait for one that is
      first_taken()
      if helper:
        break
      time.sleep(poll)
  return [done[name] for name in order if name in done]


def _source(stage) -> str | None:
  """The stage a stage starts from ('@NAME' in pretrained.path), or None."""
  return stage.pretrained.path[1:] if stage.pretrained.path.startswith('@') else None


LOCK = 'RUNNING'
# A lock is created empty and its owner written just after (no hard link, which gcsfuse lacks): an
# empty lock younger than this is being written; an older one was left by a crash in between.
WRITING_S = 10.0
HELD = types.SimpleNamespace(held=True)  # a jax.distributed group's stand-in for a StageLock


class StageLock:
  """STAGE_DIR/RUNNING, created exclusively, names the process running a stage, so that several
  processes (on one machine or several sharing the file system) can work through one comparison:
  each runs the stages nobody holds. A lock whose process has ended on this host is taken over; on
  another host its owner cannot be checked, so a crashed host's lock is removed by hand."""

  def __init__(self, stage_dir: str):
    self.path, self.held, self.owner = os.path.join(stage_dir, LOCK), False, ''

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = f'{socket.gethostname()} {os.getpid()}'
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self.owner = _read(self.path)
        if self.owner is None:  # released since
          continue
        if _alive(self.owner) or (not self.owner and _age(self.path) < WRITING_S):
          return self  # '': just created, its owner is writing its name (not a crashed owner's)
        with contextlib.suppress(FileNotFoundError):  # another process took it over first
          os.remove(self.path)  # its process ended without releasing it (kill -9, a crash)
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(me)
      self.held, self.owner = True, me
      return self
    return self

  def __exit__(self, *exc):
    if self.held:
      os.remove(self.path)


def _read(path: str) -> str | None:
  """A lock's owner ('host pid'; '' while its creator writes it); None when there is no lock."""
  try:
    with open(path) as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def _age(path: str) -> float:
  try:
    return time.time() - os.path.getmtime(path)
  except FileNotFoundError:
    return 0.0


def _alive(owner: str) -> bool:
  host, _, pid = owner.partition(' ')
  if host != socket.gethostname():
    return bool(owner)
  try:
    os.kill(int(pid), 0)
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return True


STAGE_CONFIG = 'stage_config.json'


def check_stage_config(stage, stage_dir: str) -> None:
  """Records the stage's config in a new stage directory; ValueError if an existing one was made with
  another config (naming the first field that differs). Fields the code gained since the run was made
  are not compared (the run had their default behaviour); directories from before this record are
  accepted as they are."""
  wanted = json.loads(json.dumps(stage.to_dict()))  # tuples -> lists, as the file holds them
  path = os.path.join(stage_dir, STAGE_CONFIG)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    difference = _first_difference(saved, wanted)
    if difference:
      field, old, new = difference
      raise ValueError(f'{stage_dir} holds a run made with another config ({field}: {old!r} there, '
                       f'{new!r} now). Delete that directory to run it again, or use another --workdir.')
  elif not os.path.exists(os.path.join(stage_dir, 'results.json')):
    os.makedirs(stage_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'  # processes starting together write the same file
    with open(tmp, 'w') as f:
      json.dump(wanted, f, indent=1)
    os.replace(tmp, path)


def _first_difference(a, b, prefix=''):
  """(dotted field, value in a, value in b) of the first field of JSON tree a that b lacks or holds
  another value in; None when there is none (b may have more fields)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(a):
      difference = _first_difference(a[key], b.get(key, '<absent>'), f'{prefix}{key}.')
      if difference:
        return difference
    return None
  return None if a == b else (prefix.rstrip('.'), a, b)


def read_results(run_dir: str) -> dict | None:
  """A finished run's summary (RUN_DIR/results.json), or None while the run is not finished."""
  path = os.path.join(run_dir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _resolve_references(stage, workdir: str):
  if not stage.pretrained.path.startswith('@'):
    return stage
  stage = stage.copy_and_resolve_references()
  stage.pretrained.path = os.path.join(workdir, stage.pretrained.path[1:])
  return stage


def _work(stage) -> tuple[str, int]:
  """(method name, training steps) of a stage: what its duration is estimated from."""
  return stage.method.name, stage.epochs * stage.iters_per_epoch


def progress(elapsed: float, timed: list[tuple[str, int, float]], todo: list[tuple[str, int]]) -> str:
  """'elapsed 12m03s, ETA 31m40s from 6 finished runs'.

  The estimate: the seconds per step of the runs timed so far in this command ((method, steps,
  seconds)), per method where that method has been timed (a Concept-Tuning step costs several ERM
  steps), times the steps of the runs still to do ((method, steps), the current one included).
  """
  text = f'elapsed {_duration(elapsed)}'
  if not timed:
    return text + ', ETA after the first finished run'
  per_step = lambda rows: sum(r[2] for r in rows) / max(sum(r[1] for r in rows), 1)
  overall = per_step(timed)
  rate = {m: per_step([r for r in timed if r[0] == m]) for m, _, _ in timed}
  left = sum(steps * rate.get(method, overall) for method, steps in todo)
  return f'{text}, ETA {_duration(left)} from {len(timed)} finished run{"s" * (len(timed) > 1)}'


def _duration(seconds: float) -> str:
  minutes, s = divmod(int(round(seconds)), 60)
  hours, m = divmod(minutes, 60)
  return f'{hours}h{m:02d}m' if hours else f'{m}m{s:02d}s' if m else f'{s}s'


def results_table(summaries: list[dict]) -> str:
  """Top-1 (%) under both protocols, one row per run."""
  lines = [f"{'run':<16} {'method':<16} {'data':<14} {'official':>9} {'held-out':>9} {'last':>7}"]
  for s in summaries:
    run = s.get('run', s.get('method', '?'))
    if 'official' not in s:
      lines.append(f"{run:<16} (not finished: {s})")
      continue
    held = s.get('held_out', {}).get('top1')
    lines.append(f"{run:<16} {s['method']:<16} {s['data']:<14} {s['official']['top1']:>9.2f} "
                 f"{'n/a' if held is None else f'{held:.2f}':>9} {s['last']['test_main']:>7.2f}")
  return '\n'.join(lines)
