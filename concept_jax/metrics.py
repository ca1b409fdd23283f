"""Measurements: one JSON line per record in WORKDIR/metrics.jsonl, a progress bar, a NaN guard."""
import json
import math
import os
import sys

import jax
import numpy as np
import tqdm


class NonFiniteError(FloatingPointError):
  """Raised when a training loss or gradient norm is NaN or inf; names the first bad step."""


class Writer:
  """Appends {'step': s, name: value, ...} records as JSON lines; only process 0 writes."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._active = jax.process_index() == 0

  def write(self, step: int, **values) -> None:
    if not self._active:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def _plain(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def check_finite(steps, losses, grad_norms) -> None:
  """Stops the run at the first step whose loss or gradient norm is not finite."""
  for step, loss, gnorm in zip(steps, losses, grad_norms):
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      raise NonFiniteError(
          f'Non-finite training values at step {step}: loss={loss}, grad_norm={gnorm}. '
          'Lower optim.lr, check the input data, or use model.dtype=float32.')


def mean_records(records: list[dict]) -> dict:
  """Averages a list of per-step metric dicts (host numpy) key by key."""
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def progress(total: int, initial: int):
  """A tqdm bar with ETA on process 0's terminal; disabled elsewhere and when stderr is not a tty."""
  disable = jax.process_index() != 0 or not sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, disable=disable)
