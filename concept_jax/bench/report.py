"""The benchmark report: environment, a printed table, JSON."""
import datetime
import platform
import sys

import jax

from concept_jax.runtime import cpu_count


def environment() -> dict:
  import flax
  import optax
  device = jax.devices()[0]
  return {
      'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'process_count': jax.process_count(),
      'jax': jax.__version__, 'jaxlib': getattr(jax.lib, '__version__', None) or _jaxlib_version(),
      'flax': flax.__version__, 'optax': optax.__version__, 'python': platform.python_version(),
      'host': platform.node(), 'host_cpus': cpu_count(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(['python -m concept_jax.bench'] + sys.argv[1:]),
  }


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:
    return None


def _fmt_tflops(x):
  return 'n/a' if x is None else f'{x:.3g}'


def _fmt_bytes(b):
  return 'n/a' if b is None else f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'


def table(report: dict) -> str:
  env, s = report['environment'], report['settings']
  lines = [f"{env['device_kind']} ({env['platform']} x{env['device_count']}), jax {env['jax']}, "
           f"{env['date']}"]
  train_rows = [r for r in report['rows'] if r['kind'] not in ('pipeline', 'soak')]
  if train_rows:
    lines.append(f"ResNet-{s['depth']} width {s['width']}, {s['image_size']} px, {s['classes']} "
                 f"classes, {s['dtype']}; CT K {s['queue_size']}, confusing {s['confusing']}, "
                 f"patch {s['patch_size']}; {s['warmup']} warm-up + {s['steps']} timed steps")
    header = ('method', 'batch', 'median s', 'p90 s', 'img/s', 'TFLOP/s', 'init s', 'lower s',
              'compile s', 'first s', 'peak mem')
    body = [(r['method'], r['batch'], f"{r['step_median_s']:.4f}", f"{r['step_p90_s']:.4f}",
             f"{r['images_per_s']:.1f}", _fmt_tflops(r['xla_tflops_per_s']), f"{r['init_s']:.1f}",
             f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", f"{r['first_step_s']:.2f}",
             _fmt_bytes(r['peak_memory_bytes'])) for r in train_rows]
    lines += _grid(header, body)
    lines.append('peak mem: ' + '; '.join(sorted({r['memory_source'] for r in train_rows})))
    lines.append("TFLOP/s: XLA's static FLOP count of one step / median step time (a while loop's "
                 "body counts once, so Concept-Tuning's Sinkhorn loop is undercounted)")
    for r in train_rows:
      if 'sinkhorn_iters' in r['last_step_metrics']:
        problems = f", {r['sinkhorn_problems']:,} OT problems" if 'sinkhorn_problems' in r else ''
        lines.append(f"{r['method']} (batch {r['batch']}): Sinkhorn ran "
                     f"{r['last_step_metrics']['sinkhorn_iters']:.0f} iterations in the last step"
                     f"{problems}")
  for r in report['rows']:
    if r['kind'] == 'pipeline':
      lines.append(f"pipeline ({r['method']} views, {r['views']} x {r['image_size']} px, batch "
                   f"{r['batch']}, {r['source']}, {r['host_cpus']} CPUs): "
                   f"{r['samples_per_s']:.1f} samples/s ({r['images_per_s']:.1f} views/s, "
                   f"{r['batch_s']:.3f} s per batch, first batch {r['first_batch_s']:.1f} s)")
    if r['kind'] == 'soak':
      between = r['rss_growth_between_events_mib']
      lines.append(f"soak ({r['steps']} {r['method']} steps, test-only ResNet, {r['image_size']} px, batch "
                   f"{r['batch']}, {r['wall_s']:.0f} s): host RSS {r['rss_start_mib']:.0f} MiB at step "
                   f"{r['rss_start_step']} -> {r['rss_end_mib']:.0f} MiB at step {r['steps']} "
                   f"({r['rss_growth_mib']:+.1f} MiB, with an evaluation and a checkpoint every "
                   f"{r['events_every']} steps; training steps alone between them: at most "
                   f"{'n/a' if between is None else f'{between:+.1f} MiB'})")
  return '\n'.join(lines)


def _grid(header, body):
  widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
  fmt = lambda row: '  '.join(str(x).rjust(w) for x, w in zip(row, widths))
  return [fmt(header), fmt(['-' * w for w in widths])] + [fmt(row) for row in body]
