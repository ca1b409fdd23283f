"""Do a run's concept patches carry its classes? Nearest-centroid accuracy of patch embeddings.

  python -m concept_jax.separation --workdir RUN [--workdir RUN2 ...] [--split test --num_images 500]

For each run: num_images images spread over the split (evaluation transform), the nine concept boxes
its search picks (as `concept_jax.visualize` finds them: the key encoder where the run keeps one, the
true labels, the run's search settings or Concept-Tuning's defaults), each box cropped to the run's
patch size (Concept-Tuning's default for other methods) and embedded by the run's own backbone in
evaluation mode (pooled layer4 features, L2-normalised), as is the whole image. Separation is the
accuracy of nearest-centroid classification (cosine) under 2-fold cross-validation over the images
(centroids from the even-numbered images score the odd-numbered ones, and the reverse): 100 / C is
chance, and a slot whose patches fall on black background scores about that. Printed per run: the
whole image, the mean over the nine slots, the best slot, and the share of boxes that touch the digit
(a patch with any pixel above 10% of the brightest value).
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from concept_jax import methods, visualize
from concept_jax.concepts import crop
from concept_jax.data import pipeline
from concept_jax.data.normalize import normalize


def centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
  """Nearest-centroid (cosine) accuracy in %, 2-fold over even / odd rows; features (N, D)."""
  f = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  folds = np.arange(len(f)) % 2
  classes = np.unique(labels)
  correct = 0
  for fit in (0, 1):
    known = [c for c in classes if np.any((folds == fit) & (labels == c))]
    centroids = np.stack([f[(folds == fit) & (labels == c)].mean(0) for c in known])
    scored = folds != fit
    predicted = np.asarray(known)[np.argmax(f[scored] @ centroids.T, -1)]
    correct += int(np.sum(predicted == labels[scored]))
  return 100.0 * correct / len(f)


def embeddings(method, variables, images, boxes, patch_size: int, rng):
  """(whole (k, D), patches (k, 9, D), patch peak intensity (k, 9)) for uint8 images (k, S, S, 3)."""
  x = normalize(images)
  features = lambda batch: method.apply(variables['params'], variables['batch_stats'], batch, rng,
                                        train=False, heads=False)[0]['features']
  patches = crop.crop_patches(x, boxes, patch_size)                        # (k, 9, s, s, 3)
  k, n = patches.shape[:2]
  per_patch = features(patches.reshape(k * n, *patches.shape[2:])).reshape(k, n, -1)
  raw = crop.crop_patches(images.astype(jnp.float32), boxes, patch_size)   # for the touch test
  return features(x), per_patch, jnp.max(raw, axis=(2, 3, 4))


def separation(workdir: str, split: str = 'test', num_images: int = 500) -> dict:
  """{'run', 'image', 'slots' (9,), 'mean_slot', 'best_slot', 'touch'} accuracies in %."""
  config, state = visualize.load_run(workdir)
  info = pipeline.dataset_info(config.data)
  sizes = {'test': info.num_test, 'val': info.num_val, 'train': info.num_train}
  if split not in sizes:
    raise ValueError(f"--split must be one of {sorted(sizes)}, got {split!r}.")
  images, labels = visualize.read_images(config.data, split, visualize.spread(sizes[split], num_images),
                                         config.image_size)
  method = methods.get(config.method.name)(config, info.num_classes)
  rng = jax.random.key(0)
  search_params = state['method'].get('key_params', state['params'])
  boxes = jax.jit(lambda p, b, x, y: visualize.concept_boxes(method, p, b, x, y, rng))(
      search_params, state['batch_stats'], images, labels)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  patch_size = visualize.search_settings(config.method).patch_size
  whole, patches, peak = jax.device_get(jax.jit(
      lambda v, x, b: embeddings(method, v, x, b, patch_size, rng))(variables, images, boxes))
  slots = np.array([centroid_accuracy(patches[:, s], labels) for s in range(patches.shape[1])])
  touch = 100.0 * np.mean(peak > 0.1 * images.max())
  return {'run': workdir, 'image': centroid_accuracy(whole, labels), 'slots': slots,
          'mean_slot': float(slots.mean()), 'best_slot': float(slots.max()), 'touch': float(touch),
          'chance': 100.0 / info.num_classes}


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m concept_jax.separation', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', action='append', required=True, help="a run's workdir (repeatable)")
  parser.add_argument('--split', default='test', help='test, val or train')
  parser.add_argument('--num_images', type=int, default=500)
  args = parser.parse_args(argv)
  print('| run | whole image | mean of 9 slots | best slot | boxes touching the digit |\n|---|---:|---:|---:|---:|')
  try:
    for workdir in args.workdir:
      r = separation(workdir, args.split, args.num_images)
      print(f"| {workdir} | {r['image']:.1f} | {r['mean_slot']:.1f} | {r['best_slot']:.1f} | "
            f"{r['touch']:.0f}% |", flush=True)
  except (ValueError, FileNotFoundError) as e:  # their messages say the fix
    sys.exit(f'concept_jax.separation: error: {e}')


if __name__ == '__main__':
  main()
