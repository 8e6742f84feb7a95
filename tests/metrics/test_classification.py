"""Classification metrics against hand-computed values and a brute-force pairwise AUROC."""
import itertools

import numpy as np
import pytest

from medfm_jax.metrics import classification as metrics


def _pairwise_auroc(scores, positive):
  pos, neg = scores[positive], scores[~positive]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def test_binary_auroc_hand_computed_with_ties():
  # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5, 0.5>0.1) -> 3.5/4
  assert metrics.binary_auroc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.875
  assert np.isnan(metrics.binary_auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_binary_auroc_matches_pairwise_reference():
  rng = np.random.default_rng(0)
  for _ in range(5):
    scores = rng.integers(0, 6, 40).astype(float)          # many ties
    positive = rng.random(40) < 0.4
    assert metrics.binary_auroc(scores, positive) == pytest.approx(_pairwise_auroc(scores, positive), abs=1e-12)


def test_classification_metrics_hand_computed():
  # 3 classes; labels [0,0,0,1,1,2]; predictions [0,0,1,1,1,0]
  scores = np.eye(3)[[0, 0, 1, 1, 1, 0]] * 2.0
  labels = np.array([0, 0, 0, 1, 1, 2])
  m = metrics.classification_metrics(scores, labels, ("a", "b", "c"))
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  rows = {r["class"]: r for r in m["per_class"]}
  assert rows["a"]["precision"] == pytest.approx(2 / 3) and rows["b"]["precision"] == pytest.approx(2 / 3)
  assert np.isnan(rows["c"]["precision"]) and rows["c"]["support"] == 1
  probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
  expected = np.mean([_pairwise_auroc(probs[:, c], labels == c) for c in range(3)])
  assert m["macro_auroc"] == pytest.approx(expected)


def test_perfect_and_inverted_scores():
  labels = np.array([0, 1, 2, 0, 1, 2])
  good = np.eye(3)[labels]
  assert metrics.classification_metrics(good, labels, "abc")["macro_auroc"] == 1.0
  assert metrics.classification_metrics(-good, labels, "abc")["macro_auroc"] == 0.0
  with pytest.raises(ValueError, match="scores"):
    metrics.classification_metrics(good[:, :2], labels, "abc")
