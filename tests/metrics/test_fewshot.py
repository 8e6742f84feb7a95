"""Few-shot support sampling and the nearest-centroid classifier (SimpleShot CL2N) against a
float64 loop written from the paper's definition, with negative controls."""
import numpy as np
import pytest

from medfm_jax.metrics import fewshot


def test_sample_shots():
  y = np.repeat(np.arange(3), 20)
  idx = fewshot.sample_shots(y, 5, 3, seed=0)
  assert len(set(idx)) == 15 and np.all(np.bincount(y[idx]) == 5)
  assert not np.array_equal(idx, fewshot.sample_shots(y, 5, 3, seed=1))
  with pytest.raises(ValueError, match="fewshot.shots=30: class 0 has 20 examples"):
    fewshot.sample_shots(y, 30, 3, seed=0)
  with pytest.raises(ValueError, match="probe.labels_per_class=30: class 0 has 20"):
    fewshot.sample_shots(y, 30, 3, seed=0, field="probe.labels_per_class")


def reference_predictions(support, support_y, query, centre, classes):
  """Nearest centroid, one query at a time: centre, L2-normalise, average per class, argmin of the
  Euclidean distance."""
  unit = lambda v: (v - centre) / np.linalg.norm(v - centre)
  centroids = [np.mean([unit(s) for s, y in zip(support, support_y) if y == c], 0)
               for c in range(classes)]
  return np.array([np.argmin([np.sum((unit(q) - m) ** 2) for m in centroids]) for q in query])


def test_centroid_scores_match_reference():
  rng = np.random.default_rng(0)
  support, support_y = rng.standard_normal((12, 6)) + 3, np.repeat(np.arange(4), 3)
  query, centre = rng.standard_normal((50, 6)) + 3, rng.standard_normal(6) + 3
  scores = fewshot.centroid_scores(support, support_y, query, 4, centre)
  want = reference_predictions(support, support_y, query, centre, 4)
  np.testing.assert_array_equal(scores.argmax(-1), want)
  # The scores are minus the squared distances up to the query's constant |q|^2 = 1.
  unit = fewshot.centred_unit(query, centre)
  cents = np.stack([fewshot.centred_unit(support[support_y == c], centre).mean(0) for c in range(4)])
  dist = ((unit[:, None] - cents[None]) ** 2).sum(-1)
  np.testing.assert_allclose(scores, 1 - dist, atol=1e-12)
  # Negative control: without centring (a large shared offset) the prediction changes.
  assert not np.array_equal(fewshot.centroid_scores(support, support_y, query, 4,
                                                    np.zeros(6)).argmax(-1), want)


def test_centroid_accuracy_separates_clusters_not_noise():
  """1-shot on 4 Gaussian clusters 4 sigma apart is near perfect; the same labels on features
  that do not depend on them stay near chance (0.25)."""
  rng = np.random.default_rng(1)
  centers = rng.standard_normal((4, 8)) * 4
  pool_y, query_y = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
  pool, query = centers[pool_y] + rng.standard_normal((400, 8)), centers[query_y] + rng.standard_normal((200, 8))
  accs = fewshot.centroid_accuracy(pool, pool_y, query, query_y, 4, shots=1, episodes=20)
  assert accs.shape == (20,) and accs.mean() > 0.9, accs
  noise = fewshot.centroid_accuracy(rng.standard_normal((400, 8)), pool_y, query, query_y, 4,
                                    shots=1, episodes=20)
  assert abs(noise.mean() - 0.25) < 0.1, noise.mean()
  # Episodes draw different supports (seed = episode), and more shots help.
  assert len(set(accs.round(6))) > 1
  assert fewshot.centroid_accuracy(pool, pool_y, query, query_y, 4, 10, 20).mean() >= accs.mean()
