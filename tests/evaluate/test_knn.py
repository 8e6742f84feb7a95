"""kNN evaluator against an independent NumPy implementation of DINO's protocol."""
import numpy as np
import pytest

from medfm_jax.evaluate import knn


def numpy_knn(train, train_y, test, classes, k, t):
  """Class scores of DINO's weighted kNN vote in float64 (also the reference of the kNN values
  in tests/evaluate/test_protocols.py and tests/objectives/test_dino.py)."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  scores = np.zeros((len(test), classes))
  for i, x in enumerate(test):
    sims = train @ x
    for j in np.argsort(-sims, kind="stable")[:k]:
      scores[i, train_y[j]] += np.exp(sims[j] / t)
  return scores


def test_matches_numpy_reference():
  rng = np.random.default_rng(0)
  train, test = rng.standard_normal((300, 16)), rng.standard_normal((70, 16))
  train_y = rng.integers(0, 5, 300)
  got = knn.knn_predict(train, train_y, test, 5, k=20, temperature=0.07, chunk=32)
  want = numpy_knn(train, train_y, test, 5, 20, 0.07)
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_separable_clusters_are_classified_and_k_checked():
  rng = np.random.default_rng(1)
  centers = rng.standard_normal((3, 8)) * 5
  y_train, y_test = rng.integers(0, 3, 200), rng.integers(0, 3, 50)
  train = centers[y_train] + rng.standard_normal((200, 8))
  test = centers[y_test] + rng.standard_normal((50, 8))
  assert knn.knn_accuracy(train, y_train, test, y_test, 3) > 0.95
  assert knn.knn_accuracy(rng.standard_normal((200, 8)), y_train, test, y_test, 3) < 0.6
  with pytest.raises(ValueError, match="k=500"):
    knn.knn_predict(train, y_train, test, 3, k=500)
