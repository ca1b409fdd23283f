"""Orbax checkpoints: what a checkpoint holds and how it is found again.

A checkpoint is one step directory under WORKDIR/checkpoints holding
  state: {'step', 'params', 'batch_stats', 'opt', 'method'}  (method: key encoder, queues, pointers, ...)
  meta:  JSON {'step', 'history': [eval records], 'config': the run's config as a dict}
The data position is the step itself: the input pipeline is a pure function of (seed, step).

Orbax writes a step into a temporary directory and renames it when complete, so a save killed midway
leaves a '*.orbax-checkpoint-tmp*' directory that is never taken for a checkpoint; the previous step
stays the latest good one.
"""
import os
import re

import jax
import orbax.checkpoint as ocp

SUBDIR = 'checkpoints'
_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def check_local_directory(path: str, what: str) -> None:
  """Raises ValueError if `path` is a URL (gs://, s3://, ...), naming it as `what`.

  Checkpoints, metrics and results go through the local file API, which would take 'gs://b/run' for
  the relative directory 'gs:/b/run' and silently keep everything on this machine's disk.
  """
  if _URL.match(os.fspath(path)):
    raise ValueError(
        f'{what}={path!r}: URL paths are not supported yet (checkpoints and metrics are written '
        'with local file operations). Use a directory every process sees at the same path: a '
        'gcsfuse mount of the bucket, Filestore or NFS.')


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with the project's layout."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2, asynchronous: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), SUBDIR)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True),
        item_names=('state', 'meta'))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, target):
    """Returns (state shaped and sharded like `target`, meta)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(state_dir).item_metadata.tree)
    return jax.device_get(checkpointer.restore(state_dir, target))


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
