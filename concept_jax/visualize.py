"""Concept pictures: the nine boxes a run's concept search picks on a few images, with predictions.

  python -m concept_jax.visualize --workdir runs/negative_transfer/s0_sr15_concept_tuning_spurious \
      [--split test --num_images 16 --out DIR]

Reads the run's latest checkpoint and the config saved with it, rebuilds its method and model, and
takes num_images images spread evenly over the split, with the evaluation transform. The boxes are
concept_jax.concepts.search.concept_boxes computed as Concept-Tuning computes them in training: the
encoder in train mode (BatchNorm statistics of the batch of pictured images), the true labels, the
search settings of config.method. A Concept-Tuning run uses its key encoder (the method state's
'key_params'); any other method its own parameters and head with Concept-Tuning's default search
settings, so that an ERM run's "concepts" can be set beside a Concept-Tuning run's.

Under each image: the true class, the run's prediction (main head, eval mode) and whether it is right,
and the source model's prediction (its own head and class names) when config.pretrained.path is a
concept_jax workdir, 'n/a' otherwise (ImageNet weights, scratch). Boxes are numbered by slot 1..9
(concept k = 0..8 of the search is slot k + 1); slots that found the same box share one label.

Written to OUT (default WORKDIR/concepts): <split>_<index>.png per image (index: its position in the
split) and concepts_grid.png with all of them. Small images are enlarged (nearest neighbour) to about
256 px before drawing.
"""
import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from concept_jax import checkpoint, methods, recipes
from concept_jax.concepts import search
from concept_jax.data import pipeline
from concept_jax.data.normalize import normalize

DISPLAY_SIZE = 256  # pixels an image is enlarged to (about), for boxes and numbers to be legible
# One colour per slot (matplotlib's tab10 without grey), readable on black and on photographs.
SLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))
_CAPTION_LINES = 3


def load_run(workdir: str):
  """(config, state) of the latest checkpoint under workdir; state as host numpy arrays. Config
  fields the code gained since the run was made have their defaults (the run had their behaviour)."""
  saved = checkpoint.load_meta(workdir)['config']
  config = recipes.base_config()
  config.method = recipes.method_config(saved['method']['name'])
  config.update(saved)
  return config, checkpoint.load_state(workdir)


def spread(n: int, k: int) -> np.ndarray:
  """min(k, n) distinct indices spread evenly over range(n), first and last included."""
  return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(int))


def read_images(data_config, split: str, indices, image_size: int):
  """The split's examples at `indices` (ascending), eval transform: (uint8 (k, S, S, 3), int (k,))."""
  wanted, images, labels = set(int(i) for i in indices), [], []
  batch_size = 64
  for step, batch in enumerate(pipeline.eval_batches(data_config, split, batch_size=batch_size,
                                                     image_size=image_size)):
    for row in np.flatnonzero(batch['mask']):
      if step * batch_size + row in wanted:
        images.append(batch['image'][row])
        labels.append(batch['label'][row])
    if len(images) == len(wanted):
      break
  return np.stack(images), np.asarray(labels, np.int32)


def search_settings(method_config) -> ml_collections.ConfigDict:
  """config.method when it holds concept-search settings (Concept-Tuning), else Concept-Tuning's
  defaults."""
  if 'num_concepts' in method_config:
    return method_config
  return methods.get('concept_tuning').default_config()


def concept_boxes(method, params, batch_stats, images, labels, rng) -> jax.Array:
  """(k, 9, 4) boxes (x1, y1, x2, y2) in pixels of images (k, S, S, 3) uint8, as Concept-Tuning's
  `concepts` finds them (its key encoder is `params` for a Concept-Tuning run)."""
  m = search_settings(method.config.method)
  out, _ = method.apply(params, batch_stats, normalize(images), rng, train=True)
  boxes, _ = search.concept_boxes(
      out['feature_map'], out['logits'], labels, params['head']['kernel'],
      # Only the three most confusing classes shape the boxes; the rest of the list is not needed.
      num_confusing=3, num_concepts=m.num_concepts, concept_step=m.concept_step or None,
      channels_per_concept=m.channels_per_concept or None, stride=method.model.stride,
      image_size=images.shape[1], box_anchor=m.box_anchor)
  return boxes


def predictions(method, variables, images, rng) -> jax.Array:
  """(k,) argmax of the main head, evaluation mode."""
  return jnp.argmax(method.eval_logits(variables, normalize(images), rng)['main'], -1)


def source_predictions(pretrained_path: str, images) -> list[str] | None:
  """Class names the source model (a concept_jax workdir) predicts for images; None for any other
  starting point."""
  if not pretrained_path or not os.path.isdir(pretrained_path):
    return None
  config, state = load_run(pretrained_path)
  names = pipeline.dataset_info(config.data).class_names
  method = methods.get(config.method.name)(config, state['params']['head']['kernel'].shape[1])
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  predicted = jax.jit(lambda v, x: predictions(method, v, x, jax.random.key(0)))(variables, images)
  return [names[int(c)] for c in predicted]


# ---------------------------------------------------------------- drawing

def display_scale(image_size: int) -> int:
  return max(1, round(DISPLAY_SIZE / image_size))


def box_pixels(boxes, scale: int, image_size: int) -> np.ndarray:
  """Boxes (N, 4) in image pixels [0, image_size] -> int (N, 4) corners on the enlarged image,
  inclusive (PIL's rectangle), inside [0, image_size * scale - 1] and with x1 <= x2, y1 <= y2."""
  last = image_size * scale - 1
  boxes = np.asarray(boxes, np.float64) * scale
  starts = np.clip(np.floor(boxes[:, :2]), 0, last)
  ends = np.clip(np.ceil(boxes[:, 2:]) - 1, starts, last)
  return np.concatenate([starts, ends], axis=1).astype(int)


def _font(size: int):
  return ImageFont.load_default(size=size)


def _fit(draw, text: str, font, width: int) -> str:
  """text, shortened with '..' until it fits in `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + '..', font=font) > width:
    text = text[:-1]
  return text + '..'


def draw_panel(image, boxes, caption: list[str]) -> Image.Image:
  """uint8 (S, S, 3) image, (9, 4) boxes in its pixels, caption lines -> the enlarged picture with
  numbered boxes (slot 1 drawn last, on top) and the caption below."""
  size = image.shape[0]
  scale = display_scale(size)
  picture = Image.fromarray(np.asarray(image)).resize((size * scale, size * scale), Image.NEAREST)
  width = max(picture.width, DISPLAY_SIZE)
  font, line = _font(13), 16
  panel = Image.new('RGB', (width, picture.height + _CAPTION_LINES * line + 6), 'white')
  panel.paste(picture, ((width - picture.width) // 2, 0))
  draw = ImageDraw.Draw(panel)
  corners = box_pixels(boxes, scale, size) + [(width - picture.width) // 2, 0] * 2
  slots = {}
  for k, corner in enumerate(corners):
    slots.setdefault(tuple(corner), []).append(k)
  for corner, ks in reversed(list(slots.items())):
    colour = SLOT_COLOURS[ks[0] % len(SLOT_COLOURS)]
    draw.rectangle(corner, outline=colour, width=max(1, scale // 3))
    label = ','.join(str(k + 1) for k in ks)
    x, y = corner[0] + 1, corner[1] + 1
    draw.rectangle(draw.textbbox((x, y), label, font=font), fill=colour)
    draw.text((x, y), label, fill='white', font=font)
  for i, text in enumerate(caption[:_CAPTION_LINES]):
    draw.text((4, picture.height + 3 + i * line), _fit(draw, text, font, width - 8), fill='black',
              font=font)
  return panel


def grid(panels: list[Image.Image], columns: int = 0) -> Image.Image:
  """Panels side by side, `columns` per row (0: about square)."""
  columns = columns or math.ceil(math.sqrt(len(panels)))
  rows = math.ceil(len(panels) / columns)
  w, h = max(p.width for p in panels), max(p.height for p in panels)
  out = Image.new('RGB', (columns * w + (columns - 1) * 4, rows * h + (rows - 1) * 4), 'white')
  for i, p in enumerate(panels):
    out.paste(p, ((i % columns) * (w + 4), (i // columns) * (h + 4)))
  return out


# ---------------------------------------------------------------- the command

def visualize(workdir: str, split: str = 'test', num_images: int = 16, out: str = '') -> list[dict]:
  """Writes the pictures; returns one record per image: {'path', 'index', 'label', 'prediction',
  'source_prediction' (None: n/a), 'boxes' (9, 4) in image pixels}."""
  config, state = load_run(workdir)
  info = pipeline.dataset_info(config.data)
  sizes = {'test': info.num_test, 'val': info.num_val, 'train': info.num_train}
  if split not in sizes:
    raise ValueError(f"--split must be one of {sorted(sizes)}, got {split!r}.")
  if num_images < 1:
    raise ValueError(f'--num_images must be at least 1, got {num_images}.')
  indices = spread(sizes[split], num_images)
  images, labels = read_images(config.data, split, indices, config.image_size)

  method = methods.get(config.method.name)(config, info.num_classes)
  # The concept search's encoder: the key encoder where the method keeps one (Concept-Tuning).
  search_params = state['method'].get('key_params', state['params'])
  rng = jax.random.key(0)
  boxes = jax.jit(lambda p, b, x, y: concept_boxes(method, p, b, x, y, rng))(
      search_params, state['batch_stats'], images, labels)
  predicted = jax.jit(lambda v, x: predictions(method, v, x, rng))(
      {'params': state['params'], 'batch_stats': state['batch_stats']}, images)
  source = source_predictions(config.pretrained.path, images)
  boxes, predicted = np.asarray(boxes), np.asarray(predicted)

  out = out or os.path.join(workdir, 'concepts')
  os.makedirs(out, exist_ok=True)
  names = info.class_names
  records, panels = [], []
  for i, index in enumerate(indices):
    right = 'right' if predicted[i] == labels[i] else 'wrong'
    caption = [f'{split} #{index}, true: {names[labels[i]]}',
               f'{config.method.name}: {names[predicted[i]]} ({right})',
               f'source: {"n/a" if source is None else source[i]}']
    panels.append(draw_panel(images[i], boxes[i], caption))
    path = os.path.join(out, f'{split}_{index}.png')
    panels[-1].save(path)
    records.append({'path': path, 'index': int(index), 'label': names[labels[i]],
                    'prediction': names[predicted[i]], 'source_prediction': None if source is None
                    else source[i], 'boxes': boxes[i]})
  grid(panels).save(os.path.join(out, 'concepts_grid.png'))
  print(f'Wrote {len(records)} pictures and concepts_grid.png to {out}')
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m concept_jax.visualize', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help="a run's workdir (python -m concept_jax.main)")
  parser.add_argument('--split', default='test', help='test, val or train')
  parser.add_argument('--num_images', type=int, default=16)
  parser.add_argument('--out', default='', help='output folder (default WORKDIR/concepts)')
  args = parser.parse_args(argv)
  try:
    visualize(args.workdir, args.split, args.num_images, args.out)
  except (ValueError, FileNotFoundError) as e:  # their messages say the fix
    sys.exit(f'concept_jax.visualize: error: {e}')


if __name__ == '__main__':
  main()
