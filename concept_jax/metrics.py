"""Measurements: JSON lines in WORKDIR/metrics.jsonl and TensorBoard scalars beside them, a progress bar,
the NaN guard, the machine a run's numbers came from."""
import json
import math
import os
import platform
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import tqdm

from concept_jax import runtime

# The train step's per-step flag: loss, gradient norm and the whole new state are finite. A guard, not
# a measurement: read before every log and every save, never averaged or written.
FINITE = 'finite'


class NonFiniteError(FloatingPointError):
  """Raised when a training loss, gradient norm or updated state is NaN or inf; names the first bad step."""


class Writer:
  """Writes {'step': s, name: value, ...} records as JSON lines to WORKDIR/metrics.jsonl and the same
  scalars as TensorBoard summaries to WORKDIR (`tensorboard --logdir WORKDIR`); only process 0 writes.

  start_step: where this run starts. Records after it (written by an interrupted run past its last
  checkpoint) are dropped first, so the history never shows a step twice.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.directory = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._active = jax.process_index() == 0
    self._summaries = None
    if self._active and os.path.exists(self.path):
      keep_until(self.path, start_step)

  def write(self, step: int, **values) -> None:
    if not self._active:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    self._summarize(record)

  def _summarize(self, record: dict) -> None:
    from concept_jax.data.builders import common  # lazily: TensorFlow, with the GPUs hidden from it
    tf = common.import_tf()
    if self._summaries is None:
      self._summaries = tf.summary.create_file_writer(self.directory)
      # tf.summary.scalar lives in the tensorboard package; this is what it writes, without that import.
      self._scalar = tf.compat.v1.SummaryMetadata(
          plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name='scalars'))
    with self._summaries.as_default(step=record['step']):
      for name, value in record.items():
        if name != 'step' and isinstance(value, (int, float)):
          tf.summary.write(name, tf.constant(value, tf.float32), metadata=self._scalar)

  def close(self) -> None:
    if self._summaries is not None:
      self._summaries.close()


def keep_until(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl file with only its records up to `step` (and without a line torn by a
  kill), atomically: a temporary file renamed over it."""
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get('step', 0) <= step:
      kept.append(line.rstrip('\n') + '\n')
  if kept == lines:
    return
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)


def _plain(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def finite(tree) -> jax.Array:
  """() bool: every floating-point leaf of `tree` is free of NaN and inf (usable inside jit)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite(steps, records, last_saved: int | None) -> None:
  """Stops the run at the first step whose FINITE flag is False.

  records: the steps' metric dicts, on the device or the host (only the flags are transferred).
  last_saved: the newest checkpoint's step (finite, as every save is checked first), or None.
  """
  flags = jax.device_get([r[FINITE] for r in records])
  for step, ok, record in zip(steps, flags, records):
    if ok:
      continue
    loss, gnorm = (float(x) for x in jax.device_get((record['loss'], record['grad_norm'])))
    where = ' (the updated state holds NaN or inf)' if math.isfinite(loss + gnorm) else ''
    resume = ('No checkpoint was saved; rerun' if last_saved is None else
              f'Nothing after step {last_saved} was saved; rerunning resumes from that finite checkpoint')
    raise NonFiniteError(
        f'Non-finite training values at step {step}: loss={loss}, grad_norm={gnorm}{where}. {resume} '
        'after lowering optim.lr, checking the input data, or with model.dtype=float32.')


def mean_records(records: list[dict]) -> dict:
  """Averages a list of per-step metric dicts (host numpy) key by key; the FINITE flag is left out."""
  return {k: float(np.mean([r[k] for r in records])) for k in records[0] if k != FINITE}


def host_rss_mib() -> float | None:
  """This process's resident host memory in MiB (Linux /proc), or None where it cannot be read."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError, IndexError):
    return None


# CPU features that change which kernels XLA:CPU runs (YNNPACK, oneDNN, Eigen pick their code by them).
_CPU_FEATURES = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_bf16',
                 'amx_tile', 'asimd', 'sve')


def environment() -> dict:
  """What a run's numbers depend on besides its config: versions, devices and, on CPU, the CPU.

  XLA picks its kernels (and so the order of float sums) by the device and, on CPU, by the
  instruction set, so one config trained twice on one machine gives the same numbers, and on another
  CPU model or core count numbers that differ within the seeds' spread. results.json records this
  to tell which.
  """
  devices = jax.devices()
  record = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(),
            'devices': f'{len(devices)} x {devices[0].device_kind}', 'processes': jax.process_count()}
  if jax.default_backend() == 'cpu':  # XLA:CPU also splits its work by the number of cores
    record.update(cpu=_cpu(), cpu_cores=runtime.cpu_count())
  return record


def _cpu() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return cpu_description(f.read())
  except OSError:
    return platform.processor() or platform.machine()


def cpu_description(cpuinfo: str) -> str:
  """'model name (family/model), features' from the text of Linux's /proc/cpuinfo (its first CPU)."""
  first = cpuinfo.split('\n\n')[0].splitlines()
  fields = {k.strip(): v.strip() for k, v in (line.split(':', 1) for line in first if ':' in line)}
  flags = set((fields.get('flags') or fields.get('Features', '')).split())
  name = fields.get('model name') or f"CPU implementer {fields.get('CPU implementer', '?')}"
  family = '/'.join(fields[k] for k in ('cpu family', 'model') if k in fields)
  features = ' '.join(f for f in _CPU_FEATURES if f in flags)
  return name + (f' ({family})' if family else '') + (f', {features}' if features else '')


def progress(total: int, initial: int):
  """A tqdm bar with ETA on process 0's terminal; disabled elsewhere and when stderr is not a tty."""
  disable = jax.process_index() != 0 or not sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, disable=disable)
