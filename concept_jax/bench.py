"""Speed benchmark: train-step time, compile time and peak memory; separately the input pipeline.

    python -m concept_jax.bench                  # GPU rows: CT and ERM at CUB shapes, ERM batch 128
    python -m concept_jax.bench --preset=cpu     # the same rows, CI-sized (ResNet-18/8, 64 px)
    python -m concept_jax.bench --rows=erm:128 --steps=50 --out=erm128.json
    python -m concept_jax.bench --pipeline       # tf.data four-view samples/s on this CPU

A row is `method[:batch]`. Every row runs the trainer's real code path (methods.get, optim.make_optimizer,
train.initial_state, train.make_train_step, distributed.make_mesh) on one synthetic batch that stays on
the device, so the figures exclude the input pipeline. Per row: lower and compile times, the first step
(timed apart), `--warmup` untimed steps, then `--steps` steps each timed to jax.block_until_ready.

Peak memory: device.memory_stats()['peak_bytes_in_use'] where the backend keeps it (GPU, TPU). That is a
process-wide high-water mark, so with several rows in one process each row reports the largest so far:
run one row per process for per-row peaks (launch/gpu_bench.sh does). Elsewhere (CPU) the compiled step's
memory_analysis() (arguments + outputs - aliased + temporaries); 'n/a' when neither exists.

The train-step path imports neither TensorFlow nor tensorflow-datasets; `--pipeline` needs TensorFlow.
Results go to a printed table and to --out as JSON: device kind, versions, date, settings, every figure.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import jax
import numpy as np

# Shapes of the official CUB recipe (../shared/docs/reference.md), and a CI-sized stand-in.
PRESETS = {
    'cub': dict(depth=50, width=64, image_size=224, batch=48, classes=200, queue_size=40,
                confusing=199, patch_size=64, ib_dim=512, dtype='bfloat16', steps=20, warmup=3,
                rows='concept_tuning,erm,erm:128'),
    'cpu': dict(depth=18, width=8, image_size=64, batch=8, classes=10, queue_size=4, confusing=5,
                patch_size=32, ib_dim=16, dtype='float32', steps=3, warmup=1,
                rows='concept_tuning,erm'),
}


# ---------------------------------------------------------------- settings

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m concept_jax.bench', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=sorted(PRESETS), default='cub',
                 help='default shapes; every flag below overrides its preset value')
  p.add_argument('--rows', help="comma-separated 'method[:batch]', e.g. 'concept_tuning,erm:128'")
  p.add_argument('--depth', type=int, help='ResNet depth (0 = the test-only tiny variant)')
  p.add_argument('--width', type=int, help='ResNet stem width (64 for a real ResNet)')
  p.add_argument('--image_size', type=int)
  p.add_argument('--batch', type=int, help='global batch of rows that give none')
  p.add_argument('--classes', type=int)
  p.add_argument('--queue_size', '--K', type=int, help='Concept-Tuning keys per class (K)')
  p.add_argument('--confusing', type=int, help='Concept-Tuning confusing classes per sample')
  p.add_argument('--patch_size', type=int, help='Concept-Tuning patch size (px)')
  p.add_argument('--ib_dim', type=int, help='information-bottleneck width of the front-door head')
  p.add_argument('--dtype', choices=('bfloat16', 'float32', 'float16'), help='compute dtype')
  p.add_argument('--steps', type=int, help='timed steps per row')
  p.add_argument('--warmup', type=int, help='untimed steps after the first one')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--pipeline', action='store_true',
                 help='measure the tf.data input pipeline instead of the train step (needs TensorFlow)')
  p.add_argument('--pipeline_method', default='concept_tuning', help='whose views the pipeline makes')
  p.add_argument('--pipeline_batches', type=int, default=10, help='timed pipeline batches')
  p.add_argument('--pipeline_warmup', type=int, default=2, help='untimed pipeline batches first')
  p.add_argument('--pipeline_source_size', type=int, default=64,
                 help="side of the generated 'synthetic' source images (the data set's default: 64)")
  p.add_argument('--out', default='bench.json', help="JSON results ('' writes none)")
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.steps < 1 or args.warmup < 0 or args.batch < 1:
    p.error(f'need --steps >= 1, --warmup >= 0, --batch >= 1; got {args.steps}, {args.warmup}, '
            f'{args.batch}.')
  if args.classes < 2:
    p.error(f'--classes must be >= 2 (Concept-Tuning needs confusing classes); got {args.classes}.')
  return args


def parse_rows(spec: str, default_batch: int) -> list[tuple[str, int]]:
  """'concept_tuning,erm:128' -> [('concept_tuning', default_batch), ('erm', 128)]."""
  rows = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    name, _, batch = item.partition(':')
    try:
      rows.append((name, int(batch) if batch else default_batch))
    except ValueError:
      raise ValueError(f"--rows item {item!r}: the batch after ':' must be an integer, "
                       f"e.g. 'erm:128'.") from None
  if not rows:
    raise ValueError("--rows is empty; give e.g. 'concept_tuning,erm:128'.")
  return rows


def make_config(method: str, batch: int, args):
  """The base recipe (configs/common.py) with the benchmark's shapes; synthetic data, no weights."""
  try:
    from configs import common
  except ImportError as e:
    raise ImportError(
        f'{e}. The configs need ml_collections (concept_jax.data.pipeline and configs/common.py '
        'import it). On a machine without it: python3 -m pip install --no-index --no-deps '
        '--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site (see launch/gpu_bench.sh).'
    ) from e
  c = common.base_config()
  c.seed = args.seed
  c.method = common.method_config(method)
  c.data.name = 'synthetic'
  c.data.synthetic.num_classes = args.classes
  c.data.synthetic.image_size = args.pipeline_source_size
  c.image_size = args.image_size
  c.model.update(depth=args.depth, width=args.width, dtype=args.dtype, ib_dim=args.ib_dim)
  c.batch_size = batch
  c.pretrained.path = ''
  if method == 'concept_tuning':
    c.method.update(queue_size=args.queue_size, confusing=args.confusing, patch_size=args.patch_size)
  return c


def settings(args) -> dict:
  keys = ('preset', 'depth', 'width', 'image_size', 'batch', 'classes', 'queue_size', 'confusing',
          'patch_size', 'ib_dim', 'dtype', 'steps', 'warmup', 'seed')
  if args.pipeline:
    keys = ('preset', 'image_size', 'batch', 'classes', 'seed', 'pipeline_method', 'pipeline_batches',
            'pipeline_warmup', 'pipeline_source_size')
  else:
    keys += ('rows',)
  return {k: getattr(args, k) for k in keys}


# ---------------------------------------------------------------- the train step

def synthetic_batch(batch: int, num_views: int, size: int, num_classes: int, seed: int) -> dict:
  """Host batch shaped like the pipeline's: {'images': uint8 (B, V, S, S, 3), 'label': int32 (B,)}.

  Uniform noise: the convolutions cost the same whatever the pixels, but Sinkhorn stops early per
  problem group, so Concept-Tuning's OT time on real images may differ a little.
  """
  rng = np.random.default_rng(seed)
  return {'images': rng.integers(0, 256, (batch, num_views, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (batch,), dtype=np.int32)}


def memory_figure(device, compiled) -> tuple[float | None, str]:
  """(bytes or None, where the figure comes from); see the module docstring."""
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
  state = train.initial_state(method, config, tx, init_rng, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t

  host = synthetic_batch(batch, len(method.views), args.image_size, args.classes, args.seed)
  p, n = jax.process_index(), local
  data = distributed.global_batch({k: v[p * n:(p + 1) * n] for k, v in host.items()}, mesh)
  jax.block_until_ready(data)
  step = train.make_train_step(method, tx, lr_fn, train_rng, mesh)

  t0 = time.perf_counter()
  lowered = step.lower(state, data)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  state, values = compiled(state, data)
  jax.block_until_ready((state, values))
  first_s = time.perf_counter() - t2
  for _ in range(args.warmup):
    state, values = compiled(state, data)
  jax.block_until_ready((state, values))

  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, values = compiled(state, data)
    jax.block_until_ready((state, values))
    times.append(time.perf_counter() - t)

  memory, memory_source = memory_figure(jax.local_devices()[0], compiled)
  median = float(np.median(times))
  values = {k: float(v) for k, v in jax.device_get(values).items()}
  if not all(math.isfinite(v) for v in values.values()):
    print(f'WARNING: {method_name} produced non-finite metrics: {values}', file=sys.stderr)
  return {
      'kind': 'train_step', 'method': method_name, 'batch': batch, 'views': len(method.views),
      'image_size': args.image_size, 'dtype': args.dtype,
      'init_s': init_s, 'lower_s': t1 - t0, 'compile_s': t2 - t1, 'first_step_s': first_s,
      'step_median_s': median, 'step_p90_s': float(np.percentile(times, 90)),
      'step_mean_s': float(np.mean(times)), 'step_min_s': float(np.min(times)),
      'step_times_s': times, 'images_per_s': batch / median, 'steps_per_s': 1.0 / median,
      'peak_memory_bytes': memory, 'memory_source': memory_source,
      'last_step_metrics': values,
  }


# ---------------------------------------------------------------- the input pipeline

def bench_pipeline(args) -> dict:
  """Samples/s of pipeline.train_batches (all of the method's views) on the 'synthetic' data set."""
  from concept_jax import methods
  from concept_jax.data import pipeline

  config = make_config(args.pipeline_method, args.batch, args)
  method = methods.get(args.pipeline_method)(config, args.classes)
  t = time.perf_counter()
  batches = pipeline.train_batches(config.data, method.views, global_batch_size=args.batch,
                                   seed=args.seed, start_step=0)
  next(batches)
  first_s = time.perf_counter() - t
  for _ in range(args.pipeline_warmup):
    next(batches)
  t = time.perf_counter()
  for _ in range(args.pipeline_batches):
    last = next(batches)
  elapsed = time.perf_counter() - t
  batches.close()
  samples = args.pipeline_batches * args.batch
  return {
      'kind': 'pipeline', 'method': args.pipeline_method, 'batch': args.batch,
      'views': len(method.views), 'image_size': args.image_size,
      'source': f"synthetic, generated {args.pipeline_source_size} px",
      'batch_shape': list(last['images'].shape), 'first_batch_s': first_s,
      'timed_batches': args.pipeline_batches, 'elapsed_s': elapsed,
      'samples_per_s': samples / elapsed, 'batch_s': elapsed / args.pipeline_batches,
      'images_per_s': samples * len(method.views) / elapsed, 'host_cpus': _cpu_count(),
  }


def _cpu_count():
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


# ---------------------------------------------------------------- report

def environment() -> dict:
  import flax
  import optax
  device = jax.devices()[0]
  return {
      'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'process_count': jax.process_count(),
      'jax': jax.__version__, 'jaxlib': getattr(jax.lib, '__version__', None) or _jaxlib_version(),
      'flax': flax.__version__, 'optax': optax.__version__, 'python': platform.python_version(),
      'host': platform.node(), 'host_cpus': _cpu_count(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(['python -m concept_jax.bench'] + sys.argv[1:]),
  }


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:
    return None


def _fmt_bytes(b):
  return 'n/a' if b is None else f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'


def table(report: dict) -> str:
  env, s = report['environment'], report['settings']
  lines = [f"{env['device_kind']} ({env['platform']} x{env['device_count']}), jax {env['jax']}, "
           f"{env['date']}"]
  train_rows = [r for r in report['rows'] if r['kind'] == 'train_step']
  if train_rows:
    lines.append(f"ResNet-{s['depth']} width {s['width']}, {s['image_size']} px, {s['classes']} "
                 f"classes, {s['dtype']}; CT K {s['queue_size']}, confusing {s['confusing']}, "
                 f"patch {s['patch_size']}; {s['warmup']} warm-up + {s['steps']} timed steps")
    header = ('method', 'batch', 'median s', 'p90 s', 'img/s', 'init s', 'lower s', 'compile s',
              'first s', 'peak mem')
    body = [(r['method'], r['batch'], f"{r['step_median_s']:.4f}", f"{r['step_p90_s']:.4f}",
             f"{r['images_per_s']:.1f}", f"{r['init_s']:.1f}", f"{r['lower_s']:.1f}",
             f"{r['compile_s']:.1f}", f"{r['first_step_s']:.2f}",
             _fmt_bytes(r['peak_memory_bytes'])) for r in train_rows]
    lines += _grid(header, body)
    lines.append('peak mem: ' + '; '.join(sorted({r['memory_source'] for r in train_rows})))
  for r in report['rows']:
    if r['kind'] == 'pipeline':
      lines.append(f"pipeline ({r['method']} views, {r['views']} x {r['image_size']} px, batch "
                   f"{r['batch']}, {r['source']}, {r['host_cpus']} CPUs): "
                   f"{r['samples_per_s']:.1f} samples/s ({r['images_per_s']:.1f} views/s, "
                   f"{r['batch_s']:.3f} s per batch, first batch {r['first_batch_s']:.1f} s)")
  return '\n'.join(lines)


def _grid(header, body):
  widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
  fmt = lambda row: '  '.join(str(x).rjust(w) for x, w in zip(row, widths))
  return [fmt(header), fmt(['-' * w for w in widths])] + [fmt(row) for row in body]


def main(argv=None) -> dict:
  """Runs the benchmark; returns (and writes to --out) the report."""
  args = parse_args(argv)
  if args.pipeline:
    rows = [bench_pipeline(args)]
  else:
    rows = [bench_train(name, batch, args) for name, batch in parse_rows(args.rows, args.batch)]
  report = {'environment': environment(), 'settings': settings(args), 'rows': rows}
  print(table(report), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
