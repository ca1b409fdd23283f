"""The trainer, in sections: mesh, data, init-or-resume, the jitted step, the loop, eval, checkpoints.

Initialisation precedence: resume from WORKDIR's checkpoints > config.resume (another run's checkpoint,
whole state) > config.pretrained.path (weights only) > scratch.
Randomness: every step uses fold_in(train_rng, step) and the input pipeline is a pure function of
(seed, step), so a run interrupted at any checkpoint resumes to bit-identical parameters.
"""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from concept_jax import checkpoint, distributed, metrics, methods, optim, pretrained, validate
from concept_jax.data import pipeline
from concept_jax.data.normalize import normalize
from concept_jax.protocols import summarize


PREPARED = 'prepared.npz'  # method.prepare's one-time statistics, beside the checkpoints


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class _Preemption:
  """SIGTERM -> the loop saves and exits cleanly, at the same step on every process.

  One process: a handler sets a flag the loop reads after each step. Several processes: each may get
  the signal at a different step (or alone), and a process that leaves the loop while the others run
  the next step's collectives hangs them all; jax.distributed's preemption service (it owns SIGTERM
  there) agrees on a step every process reaches, with no device synchronisation.
  """

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._requested = False
    if not self._multi_process:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    """Call once after every step, with the same steps on every process."""
    if self._multi_process and not self._requested:
      self._requested = multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def received(self) -> bool:
    """Whether a request has been seen, without a new agreement between processes."""
    return self._requested

  def restore(self):
    if not self._multi_process:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------- initialisation

def initial_variables(method, config, rng, *, load_pretrained: bool = True) -> dict:
  """{'params', 'batch_stats'} from pretrained weights (strict merge) or from scratch, on the host."""
  size = config.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(lambda r: method.model.init({'params': r, 'sample': r}, dummy, train=False))(rng)
  variables = jax.device_get(dict(variables))
  if load_pretrained and config.pretrained.path:
    loaded = pretrained.load(config.pretrained.path)
    variables = pretrained.merge(variables, loaded, reinit=tuple(config.pretrained.reinit))
    log(f'Loaded pretrained weights from {config.pretrained.path}')
  return variables


def prepared_statistics(method, config, variables, directory: str, batches=None) -> dict:
  """method.prepare's result, read from DIRECTORY/prepared.npz when there, else computed and saved.

  Every process computes it alike over the whole training set (no collectives); process 0 writes it.
  batches: what method.prepare reads instead of the training set (the benchmark's synthetic batch).
  """
  path = os.path.join(directory, PREPARED)
  if os.path.exists(path):
    with np.load(path) as cached:
      return dict(cached)

  def training_set():
    for b in pipeline.eval_batches(config.data, 'train', batch_size=config.eval_batch_size,
                                   image_size=config.image_size):
      mask = b['mask']
      yield np.asarray(normalize(b['image'][mask])), b['label'][mask]

  batches = training_set() if batches is None else batches
  prepared = {k: np.asarray(v) for k, v in method.prepare(variables, batches).items()}
  if prepared and jax.process_index() == 0:
    with open(path + '.tmp', 'wb') as f:  # written whole or not at all, like results.json
      np.savez(f, **prepared)
    os.replace(path + '.tmp', path)
  return prepared


def initial_state(method, config, tx, rng, mesh, *, load_pretrained: bool = True,
                  prepared_dir: str | None = None, prepare_batches=None) -> dict:
  """The step-0 state, replicated over the mesh (also the target a resumed checkpoint is read into).

  prepared_dir: where method.prepare's result is cached (None: the method's prepare is not run);
  prepare_batches: see prepared_statistics.
  """
  model_rng, method_rng = jax.random.split(rng)
  variables = initial_variables(method, config, model_rng, load_pretrained=load_pretrained)
  prepared = {} if prepared_dir is None else prepared_statistics(method, config, variables, prepared_dir,
                                                                 prepare_batches)
  state = {
      'step': np.int32(0),
      'params': variables['params'],
      'batch_stats': variables['batch_stats'],
  }
  state = distributed.put_replicated(state, mesh)
  init_rest = jax.jit(lambda s, r, p: {'opt': tx.init(s['params']),
                                       'method': method.init_state(r, s, p)},
                      out_shardings=distributed.replicated(mesh))
  state.update(init_rest(state, method_rng, prepared))
  return state


# ---------------------------------------------------------------- the compiled steps

def make_train_step(method, tx, lr_fn, rng, mesh):
  """One jitted step: (state, batch) -> (state, metrics); state donated, batch sharded on 'data'."""

  def step_fn(state, batch):
    step_rng = jax.random.fold_in(rng, state['step'])
    images = normalize(batch['images'])

    def loss_fn(params):
      return method.loss(params, state['batch_stats'], state['method'], images, batch['label'], step_rng)

    (loss, (values, batch_stats, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = optax.tree.norm(grads)
    new_state = {'step': state['step'] + 1, 'params': params, 'batch_stats': batch_stats,
                 'opt': opt, 'method': method_state}
    # Read (one transfer for many steps) before every log and every save: nothing non-finite is saved.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & metrics.finite(new_state)
    values = dict(values, loss=loss, lr=lr_fn(state['step']), grad_norm=grad_norm,
                  param_norm=optax.tree.norm(params), **{metrics.FINITE: finite})
    return new_state, values

  replicated = distributed.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, distributed.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(method, mesh):
  """(variables, batch, rng) -> ({head: number correct}, number of real examples)."""

  def eval_fn(variables, batch, rng):
    heads = method.eval_logits(variables, normalize(batch['image']), rng)
    mask = batch['mask']
    correct = {name: jnp.sum((jnp.argmax(logits, -1) == batch['label']) & mask)
               for name, logits in heads.items()}
    return correct, jnp.sum(mask)

  replicated = distributed.replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(replicated, distributed.batch_sharding(mesh), replicated),
                 out_shardings=replicated)


def evaluate(eval_step, state, config, split: str, mesh, rng, *, data=None, name=None) -> dict:
  """Top-1 accuracy (%) of every head on a split of config.data (or of `data`, another data config
  with the same classes), keyed '<name or split>_<head>'; every example counted exactly once."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  correct, count = {}, 0
  batches = pipeline.eval_batches(data or config.data, split, batch_size=config.eval_batch_size,
                                  image_size=config.image_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  for i, local in enumerate(batches):
    c, n = eval_step(variables, distributed.global_batch(local, mesh), jax.random.fold_in(rng, i))
    c, n = jax.device_get((c, n))
    correct = {k: correct.get(k, 0) + int(v) for k, v in c.items()}
    count += int(n)
  return {f'{name or split}_{k}': 100.0 * v / max(count, 1) for k, v in correct.items()}


# ---------------------------------------------------------------- the run

def run(config, workdir: str) -> dict:
  """Trains config's method, evaluating every epoch; returns the summary written to results.json."""
  info = validate.check(config, workdir)  # every problem at once, before anything is created
  os.makedirs(workdir, exist_ok=True)
  mesh = distributed.make_mesh()
  method = methods.get(config.method.name)(config, info.num_classes)
  iters = config.iters_per_epoch
  total_steps = config.epochs * iters
  init_rng, train_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
  log(f'{config.method.name} on {config.data.name}: {info.num_classes} classes, {info.num_train} train / '
      f'{info.num_val} val / {info.num_test} test, {len(jax.devices())} device(s), '
      f'{jax.process_count()} process(es), {total_steps} steps of batch {config.batch_size}')

  # Optimizer: its multiplier tree only needs the parameter structure.
  abstract_params = jax.eval_shape(
      lambda r: method.model.init({'params': r, 'sample': r},
                                  jnp.zeros((1, config.image_size, config.image_size, 3)),
                                  train=False)['params'], init_rng)
  tx, lr_fn = optim.make_optimizer(config, abstract_params, iters, method.optimizer_rules())

  # Init or resume.
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  source = ckpt if ckpt.latest_step() is not None else None
  if source is None and config.resume:
    source = checkpoint.Checkpointer(config.resume, max_to_keep=None)
  state = initial_state(method, config, tx, init_rng, mesh, load_pretrained=source is None,
                        prepared_dir=workdir if source in (None, ckpt) else config.resume)
  history, last_saved = [], None
  if source is not None:
    # A damaged newest checkpoint is named and skipped (moved aside only in this run's own workdir).
    last_saved, state, meta = source.restore_newest(state, move_aside=source is ckpt, log=log)
    history = meta['history']
    log(f'Resumed from {source.directory} at step {last_saved}')
    if source is not ckpt:
      source.close()
  start = int(state['step'])

  train_step = make_train_step(method, tx, lr_fn, train_rng, mesh)
  eval_step = make_eval_step(method, mesh)
  writer = metrics.Writer(workdir, start_step=start)
  batches = pipeline.train_batches(
      config.data, method.views, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, process_index=jax.process_index(), process_count=jax.process_count())

  def save(step):
    nonlocal last_saved
    metrics.check_finite(pending_steps, pending, last_saved)  # the steps since the last log
    ckpt.save(step, state, {'step': step, 'history': history, 'config': config.to_dict()})
    last_saved = step

  preemption = _Preemption()
  bar = metrics.progress(total_steps, start)
  pending, pending_steps, t_last = [], [], time.perf_counter()
  step, stop = start, False
  try:
    while step < total_steps and not stop:
      state, values = train_step(state, distributed.global_batch(next(batches), mesh))
      step += 1
      stop = preemption.requested(step)
      pending.append(values)
      pending_steps.append(step)
      bar.update(1)
      epoch_end = step % iters == 0
      if step % config.log_every == 0 or epoch_end or step == total_steps:
        host = jax.device_get(pending)
        metrics.check_finite(pending_steps, host, last_saved)
        now = time.perf_counter()
        record = dict(metrics.mean_records(host), steps_per_sec=len(host) / (now - t_last))
        rss = metrics.host_rss_mib()  # where a host memory leak would show
        if rss is not None:
          record['host_rss_mib'] = rss
        writer.write(step, **record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2g}")
        if bar.disable:
          log(f"step {step}/{total_steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
              f"{record['steps_per_sec']:.2f} steps/s")
        pending, pending_steps, t_last = [], [], time.perf_counter()
      if (epoch_end and (step // iters) % config.eval_every_epochs == 0) or step == total_steps:
        record = {'epoch': -(-step // iters)}
        for split in ('test', 'val') if info.num_val else ('test',):
          record.update(evaluate(eval_step, state, config, split, mesh,
                                 jax.random.fold_in(eval_rng, step)))
        for name, data in config.get('extra_eval', {}).items():
          record.update(evaluate(eval_step, state, config, 'test', mesh,
                                 jax.random.fold_in(eval_rng, step), data=data, name=name))
        history.append(record)
        writer.write(step, **record)
        log(f'epoch {record["epoch"]}: ' + ', '.join(f'{k} {v:.2f}' for k, v in record.items()
                                                      if k != 'epoch'))
        t_last = time.perf_counter()
      if step % config.checkpoint_every == 0 or step == total_steps or stop:
        save(step)
    # A SIGTERM during the last step's evaluation or save finds the run complete; whoever runs the
    # next stage must still hear it.
    late_stop = step == total_steps and preemption.received()
  finally:
    bar.close()
    preemption.restore()
    ckpt.close()
    writer.close()

  if stop and step < total_steps:
    log(f'SIGTERM: saved step {step} to {ckpt.directory}; rerun the same command to resume.')
    return {'preempted_at': step}
  summary = summarize(history)
  summary.update(method=config.method.name, data=config.data.name, steps=step,
                 environment=metrics.environment())
  if jax.process_index() == 0:
    # Written whole or not at all: experiment.py treats an existing results.json as a finished run.
    path = os.path.join(workdir, 'results.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(summary, f, indent=2)
    os.replace(path + '.tmp', path)
  return dict(summary, stop_requested=True) if late_stop else summary
