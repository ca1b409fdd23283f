"""Orbax checkpoints: what a checkpoint holds, how it is found again, and what happens when it is damaged.

A checkpoint is one step directory under WORKDIR/checkpoints holding
  state: {'step', 'params', 'batch_stats', 'opt', 'method'}  (method: key encoder, queues, pointers, ...)
  meta:  JSON {'step', 'history': [eval records], 'config': the run's config as a dict}
The data position is the step itself: the input pipeline is a pure function of (seed, step).

Orbax writes a step into a temporary directory and renames it when complete, so a save killed midway
leaves a '*.orbax-checkpoint-tmp*' directory that is never taken for a checkpoint; the previous step
stays the latest good one. A step damaged later (a truncated or deleted file, a lost _METADATA, another
run's structure, non-finite values) is skipped on resume: `Checkpointer.restore_newest` names it, renames
it to '<step>.damaged' (never deletes it) and resumes from the newest one that restores. That step is
known to restore, so max_to_keep never deletes it during the run (a later run that resumes from a
newer step lets it go).
"""
import os

from etils import epath
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from concept_jax import metrics

SUBDIR = 'checkpoints'
DAMAGED = '.damaged'  # suffix of a step directory moved aside; Orbax ignores such names


class CheckpointError(ValueError):
  """No checkpoint in a directory restores; the message lists each one's reason and what to do."""


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with the project's layout and damage handling."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = 2, asynchronous: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), SUBDIR)
    self.known_good = None  # the step this run restored from: never deleted by max_to_keep
    keep = ocp.checkpoint_managers
    policy = None if max_to_keep is None else keep.AnyPreservationPolicy(
        [keep.LatestN(max_to_keep), _KeepStep(self)])
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True),
        item_names=('state', 'meta'))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, target):
    """Returns (state shaped and sharded like `target`, meta)."""
    missing = [f for f in _INDEX_FILES if not os.path.exists(os.path.join(self.directory, str(step), f))]
    if missing:  # else Orbax guesses the structure and reports a misleading pytree mismatch
      raise FileNotFoundError(f'{", ".join(missing)} missing')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    if not _finite(restored.state):
      raise FloatingPointError('it holds NaN or inf values')
    return restored.state, restored.meta

  def restore_newest(self, target, *, move_aside: bool = True, log=print):
    """(step, state shaped and sharded like `target`, meta) of the newest checkpoint that restores;
    None when there is no checkpoint at all.

    Each newer one that does not is named in one `log` line with the reason and, with move_aside,
    renamed to '<step>.damaged'. Raises CheckpointError, moving nothing, when none restores (then the
    cause is more likely a changed config than damage).
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # Orbax and tensorstore raise many types for unreadable files
        failures.append((step, _reason(e)))
        continue
      for bad, reason in failures:
        where = self._move_aside(bad) if move_aside else 'left in place'
        log(f'Checkpoint step {bad} cannot be restored ({reason}); {where}. Resuming from step {step}.')
      self.known_good = step
      return step, state, meta
    if not failures:
      return None
    found = '\n'.join(f'  step {step}: {reason}' for step, reason in failures)
    raise CheckpointError(
        f'No checkpoint in {self.directory} can be restored:\n{found}\nIf the config changed since '
        'they were written (method, model, classes), rerun with the original config or use another '
        f'--workdir; to start this run afresh, rename {self.directory} (nothing there was changed).')

  def _move_aside(self, step: int) -> str:
    """Renames a step directory out of Orbax's sight (process 0; the others wait); returns where to."""
    source = os.path.join(self.directory, str(step))
    target, n = source + DAMAGED, 1
    while os.path.exists(target):
      n += 1
      target = f'{source}{DAMAGED}{n}'
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self._manager.reload()
    return f'moved aside to {target}'

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


_finite = jax.jit(metrics.finite)
# Orbax's index files of a step; without them the remaining files cannot be interpreted.
_INDEX_FILES = ('state/_METADATA', 'meta/metadata')


class _KeepStep:
  """An Orbax preservation policy: keeps the checkpointer's known-good step (the one its run restored
  from)."""

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step == self._checkpointer.known_good for c in checkpoints]


def _reason(error: Exception) -> str:
  """One line saying why a restore failed: the root cause's message on one line, without tensorstore's
  spec, shortened."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).split(' [tensorstore_spec=')[0].split('. See full TensorStore details')[0]
  text = ' '.join(text.split()) or type(error).__name__
  return text if len(text) <= 240 else text[:240] + '...'


def _step_directory(path: str) -> str:
  """Accepts a workdir, its checkpoints/ directory or one step directory; returns a step directory."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, SUBDIR), path):
    if not os.path.isdir(candidate):
      continue
    if os.path.isdir(os.path.join(candidate, 'state')):
      return candidate
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()
             and os.path.isdir(os.path.join(candidate, d, 'state'))]
    if steps:
      return os.path.join(candidate, str(max(steps)))
  raise FileNotFoundError(
      f'No concept_jax checkpoint under {path}: expected WORKDIR/{SUBDIR}/<step>/state as written by '
      '`python -m concept_jax.main`. Pass the workdir of a finished run, or a .pth/.safetensors file.')


def load_state(path: str) -> dict:
  """The whole saved state {'step', 'params', 'batch_stats', 'opt', 'method'} as host numpy arrays.

  Reads a checkpoint written on any devices and processes (8 GPUs, a TPU pod) from any other.
  """
  state_dir = os.path.join(_step_directory(path), 'state')
  with ocp.StandardCheckpointer() as checkpointer:
    # The saved shardings name the writer's devices; restore every array whole onto this process's
    # first device instead, which exists whatever the topology.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      # The item's own metadata: the checkpointer's would look for the step's metadata file in the
      # item's directory (a CheckpointManager writes it one level up) and warn that it is missing.
      tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
      return jax.device_get(checkpointer.restore(state_dir, target))
    except Exception as e:  # Orbax and tensorstore raise many types for unreadable files
      raise CheckpointError(f'The checkpoint {state_dir} cannot be read ({_reason(e)}).') from e


def load_meta(path: str) -> dict:
  """The meta saved with the latest checkpoint under `path`: {'step', 'history', 'config' (a dict)}."""
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return checkpointer.restore(os.path.join(_step_directory(path), 'meta'))


def load_variables(path: str) -> dict:
  """{'params', 'batch_stats'} (numpy, host memory) of the Classifier saved in a project checkpoint."""
  state = load_state(path)
  missing = [k for k in ('params', 'batch_stats') if k not in state]
  if missing:
    raise ValueError(f'{path} is not a concept_jax training checkpoint: it lacks {missing}.')
  return {'params': state['params'], 'batch_stats': state['batch_stats']}
