"""Per-class sampling rates, nesting, validation hold-out and tllib image lists (numpy only)."""
import math

import numpy as np
import pytest

from concept_jax.data import splits

RATES = (15, 30, 50, 100)


def _labels():
  # Class sizes 1, 2, 7, 10, 30, 33 in a shuffled order (class ids deliberately not contiguous).
  sizes = {0: 1, 3: 2, 4: 7, 7: 10, 8: 30, 11: 33}
  labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
  return np.random.default_rng(0).permutation(labels), sizes


@pytest.mark.parametrize('rate', RATES)
def test_per_class_counts(rate):
  labels, sizes = _labels()
  train, val = splits.train_val_split(labels, rate=rate, split_seed=3)
  assert len(val) == 0
  for c, n in sizes.items():
    assert np.sum(labels[train] == c) == max(1, math.ceil(rate * n / 100))
  assert len(np.unique(train)) == len(train)


def test_ceil_is_exact_for_round_percentages():
  assert splits.num_kept(10, 30) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
  assert splits.num_kept(20, 15) == 3
  assert splits.num_kept(1, 15) == 1
  assert splits.num_kept(0, 15) == 0
  with pytest.raises(ValueError, match='percentage'):
    splits.num_kept(10, 0)


def test_rates_are_nested_and_deterministic():
  labels, _ = _labels()
  subsets = [set(splits.train_val_split(labels, rate=r, split_seed=5)[0]) for r in RATES]
  for small, big in zip(subsets, subsets[1:]):
    assert small <= big
  assert subsets[-1] == set(range(len(labels)))
  again = splits.train_val_split(labels, rate=30, split_seed=5)[0]
  np.testing.assert_array_equal(sorted(subsets[1]), again)
  other = splits.train_val_split(labels, rate=30, split_seed=6)[0]
  assert set(other) != subsets[1]


def test_validation_holdout():
  labels, sizes = _labels()
  for rate in RATES:
    kept = splits.train_val_split(labels, rate=rate, split_seed=1)[0]
    train, val = splits.train_val_split(labels, rate=rate, split_seed=1, val_fraction=0.2)
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), kept)
    for c in sizes:
      k = np.sum(labels[kept] == c)
      n_val = np.sum(labels[val] == c)
      assert n_val == (0 if k < 2 else min(k - 1, max(1, round(0.2 * k))))
      assert np.sum(labels[train] == c) >= 1
  # Training parts stay nested across rates.
  trains = [set(splits.train_val_split(labels, rate=r, split_seed=1, val_fraction=0.2)[0])
            for r in RATES]
  for small, big in zip(trains, trains[1:]):
    assert small <= big


def test_image_list_parsing_and_matching(tmp_path):
  path = tmp_path / 'train_15.txt'
  path.write_text('train/001.A/a_1.jpg 0\n\ntrain/002.B/b 2.jpg 1\nx/image_0001.jpg 2\n')
  entries = splits.read_image_list(path)
  assert entries == [('train/001.A/a_1.jpg', 0), ('train/002.B/b 2.jpg', 1), ('x/image_0001.jpg', 2)]
  names = np.array(['001.A/a_1.jpg', '001.A/a_2.jpg', '002.B/b 2.jpg', 'c1/image_0001.jpg',
                    'c2/image_0001.jpg'])
  labels = np.array([0, 0, 1, 1, 2])
  # 'image_0001' exists in two classes: the list's label picks the right one.
  np.testing.assert_array_equal(splits.select_by_image_list(names, labels, entries), [0, 2, 4])

  with pytest.raises(ValueError, match='match no training example'):
    splits.select_by_image_list(names, labels, [('train/zzz.jpg', 0)], source='L')
  with pytest.raises(ValueError, match='different label'):
    splits.select_by_image_list(names, labels, [('a_2.jpg', 1)], source='L')
  bad = tmp_path / 'bad.txt'
  bad.write_text('just_a_path.jpg\n')
  with pytest.raises(ValueError, match='bad.txt:1'):
    splits.read_image_list(bad)
