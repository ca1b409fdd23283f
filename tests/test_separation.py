"""Class separation of concept-patch embeddings (concept_jax/separation.py)."""
import numpy as np
import pytest

from concept_jax import separation


def test_centroid_accuracy_on_hand_made_features():
  labels = np.repeat([0, 1, 2], 4)
  apart = np.eye(3)[labels] + 0.01 * np.arange(12)[:, None]
  assert separation.centroid_accuracy(apart, labels) == 100.0
  # Identical features: every row goes to the first class, one third are right.
  assert separation.centroid_accuracy(np.ones((12, 3)), labels) == pytest.approx(100 / 3)
  # Classes swapped between the folds: the centroids of one fold misname every row of the other.
  folds = np.arange(12) % 2
  swapped = np.eye(3)[np.where(folds == 0, labels, (labels + 1) % 3)]
  assert separation.centroid_accuracy(swapped, labels) == 0.0


def test_a_concept_tuning_run_is_scored_per_slot(concept_runs, capsys):
  result = separation.separation(str(concept_runs / 'ct'), num_images=12)
  assert result['slots'].shape == (9,)
  assert np.all((result['slots'] >= 0) & (result['slots'] <= 100))
  assert result['best_slot'] == result['slots'].max() and 0 <= result['touch'] <= 100
  separation.main(['--workdir', str(concept_runs / 'ct'), '--workdir', str(concept_runs / 'source'),
                   '--num_images', '12'])
  assert capsys.readouterr().out.count(f'| {concept_runs}/') == 2   # the ERM source scored as well
