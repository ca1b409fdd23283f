"""Class separation of concept-patch embeddings (concept_jax/separation.py). Its run on a real
Concept-Tuning run is in test_visualize.py, whose trained runs (conftest.concept_runs) it shares: a
session fixture is trained once per test process, and the suite gives each file to one."""
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
