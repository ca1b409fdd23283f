"""The soak row: host memory (RSS) of the whole trainer over many tiny steps (needs TensorFlow).

train.run itself runs (input pipeline, jitted step, logging, TensorBoard summaries, evaluations and
checkpoints every quarter), and every log record carries the process's RSS (`host_rss_mib` in
metrics.jsonl). A leak per step or per record shows as RSS growing with the step; the row reports the
figure, it does not judge it.
"""
import contextlib
import os
import tempfile
import time

import numpy as np


def soak_config(steps: int, seed: int):
  """ERM on 10 synthetic classes, the test-only ResNet, 32 px, batch 8: a few ms per step on a CPU."""
  from concept_jax import recipes
  c = recipes.tiny(recipes.base_config())
  c.seed = seed
  c.data.synthetic.update(num_classes=10, image_size=32)
  c.image_size = 32
  c.model.depth = 0
  c.epochs, c.iters_per_epoch = 4, max(1, steps // 4)
  c.log_every, c.checkpoint_every = 10, c.iters_per_epoch
  return c


def bench_soak(args) -> dict:
  """Runs args.soak_steps steps; reports RSS after the first tenth (compilation, first batches) and at
  the end, and the largest growth over a quarter's training steps alone (no evaluation or checkpoint
  between its first and last log record)."""
  import json
  from concept_jax import train
  config = soak_config(args.soak_steps, args.seed)
  with tempfile.TemporaryDirectory(prefix='concept_jax_soak_') as workdir:
    t = time.perf_counter()
    with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):
      train.run(config, workdir)
    wall = time.perf_counter() - t
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rss = {r['step']: r['host_rss_mib'] for r in map(json.loads, f) if 'host_rss_mib' in r}
  steps = sorted(rss)
  start = next(s for s in steps if s >= steps[-1] / 10)
  quarter = config.iters_per_epoch
  within = [rss[(q + 1) * quarter] - rss[q * quarter + config.log_every] for q in range(config.epochs)
            if (q + 1) * quarter in rss and q * quarter + config.log_every in rss]
  return {'kind': 'soak', 'method': 'erm', 'steps': steps[-1], 'batch': config.batch_size,
          'image_size': config.image_size, 'wall_s': wall, 'events_every': quarter,
          'rss_start_step': start, 'rss_start_mib': rss[start], 'rss_end_mib': rss[steps[-1]],
          'rss_growth_mib': rss[steps[-1]] - rss[start], 'rss_peak_mib': max(rss.values()),
          'rss_growth_between_events_mib': float(np.max(within)) if within else None,
          'rss_mib_by_step': rss}
