"""The input-pipeline row: four-view samples/s of pipeline.train_batches on this CPU (needs TensorFlow)."""
import os
import time

import numpy as np

from concept_jax.bench.settings import make_config
from concept_jax.runtime import cpu_count


def bench_pipeline(args) -> dict:
  """Samples/s of pipeline.train_batches (all of the method's views) on --pipeline_data."""
  import tempfile
  config = make_config(args.pipeline_method, args.batch, args)
  with tempfile.TemporaryDirectory(prefix='concept_jax_bench_') as tmp:
    source = _select_source(config.data, args, tmp)
    return _time_pipeline(args, config, source)


def _select_source(data, args, tmp):
  """Points the data config at --pipeline_data ('jpeg' files go under tmp); returns a description."""
  from concept_jax.data import pipeline
  if args.pipeline_data == 'synthetic':
    return f'synthetic, generated {args.pipeline_source_size} px'
  if args.pipeline_data == 'jpeg':
    from concept_jax.data import prepare
    root = os.path.join(tmp, 'images')
    write_jpeg_folder(root, args.pipeline_jpeg_images, min(args.classes, args.pipeline_jpeg_images),
                      args.seed)
    data.update(name='image_folder', data_dir=os.path.join(tmp, 'tfds'), manual_dir=root)
    prepare.prepare(data.name, data.data_dir, data.manual_dir)
    return f'{args.pipeline_jpeg_images} generated JPEG files, 500 x 375 / 375 x 500'
  data.update(name=args.pipeline_data, data_dir=args.pipeline_data_dir,
              manual_dir=args.pipeline_manual_dir)
  info = pipeline.dataset_info(data)
  return f'{args.pipeline_data} ({info.num_train} training images)'


def write_jpeg_folder(root, num_images, num_classes, seed):
  """root/{train,test}/cNNN/*.jpg: num_images training images (one test image per class) shaped like
  CUB's photographs: 500 x 375 or 375 x 500, smooth colour fields plus sensor-like noise, quality 90."""
  from concept_jax.data.builders import common
  tf = common.import_tf()
  rng = np.random.default_rng(seed)
  for split, count in (('train', num_images), ('test', num_classes)):
    for i in range(count):
      h, w = (375, 500) if i % 2 else (500, 375)
      y, x = np.mgrid[0:h, 0:w].astype(np.float32)
      f = rng.uniform(10, 60, 3)
      field = np.stack([np.sin(x / f[0]), np.cos(y / f[1]), np.sin((x + y) / f[2])], -1)
      pixels = 127 + 100 * field + rng.normal(0, 12, (h, w, 3))
      folder = os.path.join(root, split, f'c{i % num_classes:03d}')
      os.makedirs(folder, exist_ok=True)
      jpeg = tf.io.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=90)
      tf.io.write_file(os.path.join(folder, f'{i}.jpg'), jpeg)


def _time_pipeline(args, config, source):
  from concept_jax import methods
  from concept_jax.data import pipeline

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
      'views': len(method.views), 'image_size': args.image_size, 'source': source,
      'batch_shape': list(last['images'].shape), 'first_batch_s': first_s,
      'timed_batches': args.pipeline_batches, 'elapsed_s': elapsed,
      'samples_per_s': samples / elapsed, 'batch_s': elapsed / args.pipeline_batches,
      'images_per_s': samples * len(method.views) / elapsed, 'host_cpus': cpu_count(),
  }
