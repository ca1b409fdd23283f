"""Per-class training subsets (sampling rates), validation hold-out and tllib image-list files.

The tllib benchmark trains on per-class random subsets of 15/30/50/100% of the training set. Its list
files are no longer downloadable, so the subsets are re-derived here, deterministically:

  for each class c (its id in the full data set, before any `classes` relabelling), shuffle that
  class's training indices (in the data set's canonical order) with
  `np.random.default_rng([split_seed, c]).permutation`, and keep the first ceil(rate * n_c / 100)
  of them (at least 1).

Every rate takes a prefix of the same per-class permutation, so the subsets are nested: 15% is a
subset of 30%, which is a subset of 50%, and so on.

The validation split (for honest model selection) is held out of the sampled subset, per class:
the last n_val of the class's kept prefix, n_val = max(1, round(val_fraction * k_c)) for a class with
k_c >= 2 kept examples (0 when val_fraction == 0, or k_c < 2; at least one training example always
stays). The training parts are then nested across rates too (k - n_val never decreases as k grows);
the validation parts are not.

All functions here are plain numpy; indices are positions in the caller's (canonical) example order.
"""
import math
import os

import numpy as np


def _check_rate(rate):
  if not 0 < rate <= 100:
    raise ValueError(f'sampling_rate must be a percentage in (0, 100] (e.g. 15, 30, 50, 100), '
                     f'got {rate}.')


def num_kept(n, rate):
  """How many of a class's n training examples a sampling rate (percent) keeps: ceil, at least 1."""
  _check_rate(rate)
  if n == 0:
    return 0
  # round() first so that float noise in rate * n / 100 (e.g. 0.3 * 10) cannot bump the ceiling.
  return max(1, math.ceil(round(rate * n / 100.0, 9)))


def class_permutation(indices, class_id, split_seed):
  """The fixed shuffle of one class's indices that every sampling rate takes a prefix of."""
  rng = np.random.default_rng([int(split_seed), int(class_id)])
  return np.asarray(indices)[rng.permutation(len(indices))]


def num_val(k, val_fraction):
  """Validation examples held out of a class with k kept examples (see module docstring)."""
  if not 0 <= val_fraction < 1:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}.')
  if val_fraction == 0 or k < 2:
    return 0
  return min(k - 1, max(1, int(round(val_fraction * k))))


def train_val_split(labels, *, rate=100, split_seed=0, val_fraction=0.0):
  """Per-class sampled training subset and validation hold-out.

  Args:
    labels: (N,) int class ids of the full training split (ids before any relabelling: they seed
      the per-class shuffles).
    rate: sampling rate in percent, (0, 100].
    split_seed: seed of the per-class shuffles.
    val_fraction: fraction of each class's kept examples held out for validation, [0, 1).
  Returns:
    (train, val): sorted int64 index arrays into `labels`, disjoint.
  """
  labels = np.asarray(labels)
  train, val = [], []
  for c in np.unique(labels):
    perm = class_permutation(np.flatnonzero(labels == c), c, split_seed)
    k = num_kept(len(perm), rate)
    v = num_val(k, val_fraction)
    train.append(perm[:k - v])
    val.append(perm[k - v:k])
  cat = lambda parts: np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(
      (0,), np.int64)
  return cat(train), cat(val)


def read_image_list(path):
  """Parses a tllib image-list file: one 'relative/path/name.jpg label' per line.

  Returns a list of (path, label) tuples; blank lines are skipped.
  """
  entries = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(maxsplit=1)
      if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
        raise ValueError(f'{path}:{lineno}: expected "<image path> <integer label>", got {line!r}.')
      entries.append((parts[0], int(parts[1])))
  return entries


def file_stem(path):
  """'train/001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg' -> 'Black_..._34'."""
  return os.path.splitext(os.path.basename(path.replace('\\', '/')))[0]


def select_by_image_list(names, labels, entries, *, source='image list'):
  """Indices of the examples named by a tllib list, matched by file name (without directory/ext).

  Args:
    names: (N,) file names (or ids) of the data set's training examples.
    labels: (N,) their class ids.
    entries: [(path, label)] as returned by `read_image_list`.
    source: what to call the list in error messages (its path).
  Returns:
    sorted int64 indices into names. A name shared by several examples (e.g. Caltech-101's
    'image_0001.jpg' in every class) is disambiguated by the list's label.
  Raises:
    ValueError naming the entries that match nothing, match ambiguously, or carry a label different
    from the data set's (the list was made for another data set or class order).
  """
  by_stem = {}
  for i, name in enumerate(names):
    by_stem.setdefault(file_stem(name), []).append(i)
  chosen, missing, ambiguous, mismatched = [], [], [], []
  for path, label in entries:
    cands = by_stem.get(file_stem(path), [])
    if len(cands) > 1:
      cands = [i for i in cands if labels[i] == label]
    if not cands:
      missing.append(path)
    elif len(cands) > 1:
      ambiguous.append(path)
    elif labels[cands[0]] != label:
      mismatched.append(f'{path} (list: {label}, data set: {labels[cands[0]]})')
    else:
      chosen.append(cands[0])
  problems = []
  for what, items in (('match no training example', missing), ('match several', ambiguous),
                      ('have a different label in the data set', mismatched)):
    if items:
      problems.append(f'{len(items)} entries {what}, e.g. {items[:5]}')
  if problems:
    raise ValueError(f'{source}: ' + '; '.join(problems) + '. Check that the list belongs to this '
                     'data set and its training split (tllib lists give "path label" per line).')
  return np.unique(np.asarray(chosen, np.int64))
