"""Benchmark settings: presets, command-line flags, rows, and the run config of a row."""
import argparse

from concept_jax import methods

# Shapes of the official CUB recipe (../shared/docs/reference.md), and a CI-sized stand-in.
PRESETS = {
    'cub': dict(depth=50, width=64, stem='imagenet', image_size=224, batch=48, classes=200,
                queue_size=40, confusing=199, patch_size=64, ib_dim=512, dtype='bfloat16', steps=20,
                warmup=3, rows='concept_tuning,erm,erm:128,concept_loss'),
    'cpu': dict(depth=18, width=8, stem='imagenet', image_size=64, batch=8, classes=10, queue_size=4,
                confusing=5, patch_size=32, ib_dim=16, dtype='float32', steps=3, warmup=1,
                rows='concept_tuning,erm,concept_loss'),
    # configs/negative_transfer.py's runs (README "Does it work?"), the steps `make demo` times.
    'negative_transfer': dict(depth=10, width=16, stem='small', image_size=32, batch=32, classes=5,
                              queue_size=8, confusing=4, patch_size=16, ib_dim=32, dtype='float32',
                              steps=30, warmup=3, rows='concept_tuning,erm'),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m concept_jax.bench', description=_cli_doc(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=sorted(PRESETS), default='cub',
                 help='default shapes; every flag below overrides its preset value')
  p.add_argument('--rows', help="comma-separated 'method[:batch]', e.g. 'concept_tuning,erm:128'")
  p.add_argument('--depth', type=int, help='ResNet depth (0 = the test-only tiny variant)')
  p.add_argument('--width', type=int, help='ResNet stem width (64 for a real ResNet)')
  p.add_argument('--stem', choices=('imagenet', 'small'),
                 help="ResNet stem: 'small' is 3x3 stride 1 without max pool (CIFAR-style)")
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
  p.add_argument('--profile', default='',
                 help='also trace 3 steps of each row with jax.profiler into PROFILE/<row> '
                      '(open with TensorBoard or XProf)')
  p.add_argument('--pipeline', action='store_true',
                 help='measure the tf.data input pipeline instead of the train step (needs TensorFlow)')
  p.add_argument('--pipeline_method', default='concept_tuning', help='whose views the pipeline makes')
  p.add_argument('--pipeline_batches', type=int, default=10, help='timed pipeline batches')
  p.add_argument('--pipeline_warmup', type=int, default=2, help='untimed pipeline batches first')
  p.add_argument('--pipeline_data', default='synthetic',
                 help="'synthetic', 'jpeg' (generated CUB-sized JPEG files) or a prepared data set name")
  p.add_argument('--pipeline_data_dir', default='', help='tfds data_dir of a prepared data set')
  p.add_argument('--pipeline_manual_dir', default='', help='manual_dir of a prepared data set')
  p.add_argument('--pipeline_source_size', type=int, default=64,
                 help="side of the generated 'synthetic' source images (the data set's default: 64)")
  p.add_argument('--pipeline_jpeg_images', type=int, default=240,
                 help="training images written for --pipeline_data=jpeg (spread over --classes)")
  p.add_argument('--soak', action='store_true',
                 help='run the trainer for --soak_steps tiny steps and report its host memory (RSS) '
                      'over them instead (needs TensorFlow)')
  p.add_argument('--soak_steps', type=int, default=2000, help='steps of the --soak run')
  p.add_argument('--out', default='bench.json', help="JSON results ('' writes none)")
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.soak_steps < 40:
    p.error(f'--soak_steps must be >= 40 (4 evaluations, a log every 10 steps); got {args.soak_steps}.')
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
    known = methods.names() + ('concept_loss',)
    if name not in known:
      raise ValueError(f"--rows item {item!r}: unknown row {name!r}; rows are {', '.join(known)}, "
                       "each with an optional ':batch'.")
    try:
      rows.append((name, int(batch) if batch else default_batch))
    except ValueError:
      raise ValueError(f"--rows item {item!r}: the batch after ':' must be an integer, "
                       f"e.g. 'erm:128'.") from None
  if not rows:
    raise ValueError("--rows is empty; give e.g. 'concept_tuning,erm:128'.")
  return rows


def make_config(method: str, batch: int, args):
  """The base recipe (concept_jax/recipes.py) with the benchmark's shapes; synthetic data, no weights."""
  try:
    from concept_jax import recipes
  except ImportError as e:
    raise ImportError(
        f'{e}. The configs need ml_collections (concept_jax.recipes imports it). On a machine '
        'without it: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl '
        '&& export PYTHONPATH=/tmp/site (see launch/gpu_bench.sh).'
    ) from e
  c = recipes.base_config()
  c.seed = args.seed
  c.method = recipes.method_config(method)
  c.data.name = 'synthetic'
  c.data.synthetic.num_classes = args.classes
  c.data.synthetic.image_size = args.pipeline_source_size
  c.image_size = args.image_size
  c.model.update(depth=args.depth, width=args.width, stem=args.stem, dtype=args.dtype,
                 ib_dim=args.ib_dim)
  c.batch_size = batch
  c.pretrained.path = ''
  # Whichever of these the method has (queues, confusing classes, patches) take the benchmark's values.
  for key in ('queue_size', 'confusing', 'patch_size'):
    if key in c.method:
      c.method[key] = getattr(args, key)
  if 'confusing' in c.method:  # at most every other class, as the concept_loss row takes it
    c.method.confusing = min(args.confusing, args.classes - 1)
  if methods.get(method).uses_source_head:  # LwF, Co-Tuning: ImageNet's 1,000-way head, as recipes have
    c.model.source_classes = 1000
  return c


def settings(args) -> dict:
  keys = ('preset', 'depth', 'width', 'stem', 'image_size', 'batch', 'classes', 'queue_size',
          'confusing', 'patch_size', 'ib_dim', 'dtype', 'steps', 'warmup', 'seed', 'profile')
  if args.soak:
    return {k: getattr(args, k) for k in ('soak_steps', 'seed')}
  if args.pipeline:
    keys = ('preset', 'image_size', 'batch', 'classes', 'seed', 'pipeline_method', 'pipeline_batches',
            'pipeline_warmup', 'pipeline_data', 'pipeline_data_dir', 'pipeline_manual_dir',
            'pipeline_source_size', 'pipeline_jpeg_images')
  else:
    keys += ('rows',)
  return {k: getattr(args, k) for k in keys}


def _cli_doc():
  from concept_jax import bench  # the package docstring is the command's help
  return bench.__doc__
