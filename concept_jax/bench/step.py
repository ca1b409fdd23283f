"""Train-step and concept-loss rows: lower, compile and time a jitted function on device-resident data."""
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

from concept_jax.bench.settings import make_config
from concept_jax.data.normalize import normalize


def synthetic_batch(batch: int, num_views: int, size: int, num_classes: int, seed: int) -> dict:
  """Host batch shaped like the pipeline's: {'images': uint8 (B, V, S, S, 3), 'label': int32 (B,)}.

  Uniform noise: the convolutions cost the same whatever the pixels, but Sinkhorn stops early per
  problem group, so Concept-Tuning's OT time on real images may differ a little.
  """
  rng = np.random.default_rng(seed)
  return {'images': rng.integers(0, 256, (batch, num_views, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (batch,), dtype=np.int32)}


def memory_figure(device, compiled) -> tuple[float | None, str]:
  """(bytes or None, where the figure comes from); see the package docstring."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    return float(stats['peak_bytes_in_use']), 'memory_stats peak_bytes_in_use (process so far)'
  try:
    m = compiled.memory_analysis()
  except Exception:
    m = None
  if m is not None:
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    if total > 0:
      return float(total), 'compiled memory_analysis (args + outputs - aliased + temps)'
  return None, 'n/a'


def bench_train(method_name: str, batch: int, args) -> dict:
  """Times one method's train step; returns the row's figures."""
  from concept_jax import distributed, methods, optim, train

  config = make_config(method_name, batch, args)
  method = methods.get(method_name)(config, args.classes)
  mesh = distributed.make_mesh()
  local = distributed.check_batch_size(batch, mesh)
  init_rng, train_rng = jax.random.split(jax.random.key(args.seed))

  t = time.perf_counter()
  abstract = jax.eval_shape(lambda r: method.model.init(
      {'params': r, 'sample': r}, jax.numpy.zeros((1, args.image_size, args.image_size, 3)),
      train=False)['params'], init_rng)
  tx, lr_fn = optim.make_optimizer(config, abstract, config.iters_per_epoch)
  host = synthetic_batch(batch, len(method.views), args.image_size, args.classes, args.seed)
  with tempfile.TemporaryDirectory() as prepared_dir:
    # Statistics a method computes before step 0 (DELTA's channel attention, Co-Tuning's category
    # relationship) come from the synthetic batch: the step costs the same whatever their values.
    first_view = (np.asarray(normalize(host['images'][:, 0])), host['label'])
    state = train.initial_state(method, config, tx, init_rng, mesh, prepared_dir=prepared_dir,
                                prepare_batches=[first_view])
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t

  p, n = jax.process_index(), local
  data = distributed.global_batch({k: v[p * n:(p + 1) * n] for k, v in host.items()}, mesh)
  jax.block_until_ready(data)
  step = train.make_train_step(method, tx, lr_fn, train_rng, mesh)

  carry = [state]  # the step donates its state: each call continues from the last one's

  def run_step(compiled, _, data):
    carry[0], values = compiled(carry[0], data)
    return carry[0], values

  row = _time_jitted(step, (state, data), args, f'{method_name}_b{batch}', run=run_step)
  values = {k: float(v) for k, v in jax.device_get(row.pop('outputs')[1]).items()}
  if not all(math.isfinite(v) for v in values.values()):
    print(f'WARNING: {method_name} produced non-finite metrics: {values}', file=sys.stderr)
  return {'kind': 'train_step', 'method': method_name, 'batch': batch, 'views': len(method.views),
          'image_size': args.image_size, 'dtype': args.dtype, 'init_s': init_s, **row,
          'images_per_s': batch / row['step_median_s'], 'last_step_metrics': values}


def bench_concept_loss(batch: int, args) -> dict:
  """The concept contrastive loss alone (value and gradient), at the row's shapes.

  Inputs are random unit vectors (B, 9, C) and a (C, K, 9, C) queue, so the figure isolates the
  OT part of the Concept-Tuning step: B x (1 + K + confusing x K) Sinkhorn problems.
  """
  import jax.numpy as jnp
  from concept_jax.concepts import losses, queues

  c, k, n = args.classes, args.queue_size, 9
  n_conf = min(args.confusing, c - 1)
  t = time.perf_counter()
  keys = jax.random.split(jax.random.key(args.seed), 5)
  unit = lambda key, shape: queues.l2_normalise(jax.random.normal(key, shape))
  zq, zk, queue_h = unit(keys[0], (batch, n, c)), unit(keys[1], (batch, n, c)), unit(keys[2], (c, k, n, c))
  labels = jax.random.randint(keys[3], (batch,), 0, c)
  # The n_conf classes after the label (mod C): distinct and never the label, like the search's.
  confusing = (labels[:, None] + 1 + jnp.arange(n_conf)[None, :]) % c
  jax.block_until_ready((zq, zk, queue_h, confusing))
  init_s = time.perf_counter() - t

  def loss_and_grad(zq):
    (loss, aux), grad = jax.value_and_grad(
        lambda z: losses.concept_contrastive_loss(z, zk, queue_h, labels, confusing, keys[4],
                                                  with_aux=True), has_aux=True)(zq)
    return loss, grad, aux

  row = _time_jitted(jax.jit(loss_and_grad), (zq,), args, f'concept_loss_b{batch}')
  loss, _, aux = jax.device_get(row.pop('outputs'))
  return {'kind': 'concept_loss', 'method': 'concept_loss', 'batch': batch, 'init_s': init_s, **row,
          'images_per_s': batch / row['step_median_s'],
          'sinkhorn_problems': batch * (1 + k + n_conf * k),
          'last_step_metrics': {'concept_contrast': float(loss),
                                'sinkhorn_iters': float(aux['sinkhorn_iters_max'])}}


def _time_jitted(fn, inputs, args, name, run=None) -> dict:
  """Lowers, compiles and times a jitted fn on inputs (and traces it under --profile/name).

  run(compiled, *inputs) -> outputs makes one step (default: compiled(*inputs)); a train step
  threads its own state through it. Returns the timing and memory figures, and 'outputs' of the
  last step (for the caller to read and drop).
  """
  run = run or (lambda compiled, *xs: compiled(*xs))
  t0 = time.perf_counter()
  lowered = fn.lower(*inputs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  outputs = jax.block_until_ready(run(compiled, *inputs))
  first_s = time.perf_counter() - t2
  for _ in range(args.warmup):
    outputs = run(compiled, *inputs)
  jax.block_until_ready(outputs)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    outputs = jax.block_until_ready(run(compiled, *inputs))
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  if args.profile:
    # More steps under the profiler, after the timed ones so the trace costs them nothing; the
    # compiled HLO beside it maps the trace's operations to JAX source (bench/trace_summary.py).
    from concept_jax.bench import trace_summary  # lazily: it is also a __main__ module
    row_dir = os.path.join(args.profile, name)
    os.makedirs(row_dir, exist_ok=True)
    with open(os.path.join(row_dir, 'hlo.txt'), 'w') as f:
      f.write(compiled.as_text())
    try:
      with jax.profiler.trace(row_dir):
        for _ in range(trace_summary.TRACED_STEPS):
          outputs = jax.block_until_ready(run(compiled, *inputs))
    except Exception as e:  # e.g. no CUPTI on a GPU machine: the timings above still stand
      print(f'WARNING: {name}: the profiler failed ({type(e).__name__}: {e}); no trace.',
            file=sys.stderr)
  flops, bytes_accessed = static_cost(compiled)
  memory, memory_source = memory_figure(jax.local_devices()[0], compiled)
  return {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'first_step_s': first_s,
          'step_median_s': median, 'step_p90_s': float(np.percentile(times, 90)),
          'step_mean_s': float(np.mean(times)), 'step_min_s': float(np.min(times)),
          'step_times_s': times, 'steps_per_s': 1.0 / median, 'outputs': outputs,
          'xla_flops': flops, 'xla_bytes_accessed': bytes_accessed,
          'xla_tflops_per_s': None if flops is None else flops / median / 1e12,
          'peak_memory_bytes': memory, 'memory_source': memory_source}


def static_cost(compiled) -> tuple[float | None, float | None]:
  """(flops, bytes accessed) of one step by XLA's static cost analysis, None where unavailable.

  A while loop's body counts once whatever its trip count, so the Sinkhorn loop is undercounted.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None, None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost:
    return None, None
  flops, accessed = cost.get('flops'), cost.get('bytes accessed')
  return (float(flops) if flops else None), (float(accessed) if accessed else None)
