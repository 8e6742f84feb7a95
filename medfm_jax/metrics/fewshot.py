"""Few-shot classification on frozen features: k-shot support sampling and the nearest-centroid
classifier (SimpleShot's "CL2N", Wang et al. 2019).

Nearest centroid: features are centred on the mean of an unlabelled pool (the feature bank the
support rows come from) and L2-normalised; each class is the mean of its normalised support rows,
and a query takes the class of the nearest centroid (Euclidean). Nothing is fitted, so one episode
costs a matrix product, and accuracy is averaged over many episodes (support draws), which is what
the spread of a 1-shot score needs.
"""
from __future__ import annotations

import numpy as np


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int,
                 field: str = "fewshot.shots") -> np.ndarray:
  """Indices of ``shots`` examples per class, drawn without replacement with ``seed``; ``field``
  names the config field in the error when a class has fewer."""
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(np.asarray(labels) == c)
    if len(idx) < shots:
      raise ValueError(f"{field}={shots}: class {c} has {len(idx)} examples in the feature pool; "
                       "raise features.train_examples")
    out.append(rng.choice(idx, shots, replace=False))
  return np.concatenate(out)


def centred_unit(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """Rows of ``x`` minus ``centre``, scaled to unit L2 norm (float64)."""
  x = np.asarray(x, np.float64) - centre
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid_scores(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray,
                    num_classes: int, centre: np.ndarray) -> np.ndarray:
  """Scores ``[n_query, num_classes]``: minus the squared distance of each centred, normalised
  query to each class centroid (the mean of that class's centred, normalised support rows)."""
  s, q = centred_unit(support_x, centre), centred_unit(query_x, centre)
  onehot = np.eye(num_classes)[np.asarray(support_y)]                # [n_support, C]
  centroids = (onehot.T @ s) / np.maximum(onehot.sum(0), 1)[:, None]  # [C, d]
  return 2 * q @ centroids.T - (centroids * centroids).sum(-1)        # |q|^2 = 1 drops out


def centroid_accuracy(pool_x: np.ndarray, pool_y: np.ndarray, query_x: np.ndarray,
                      query_y: np.ndarray, num_classes: int, shots: int, episodes: int,
                      field: str = "fewshot.shots") -> np.ndarray:
  """Per-episode accuracies ``[episodes]`` of the nearest-centroid classifier: episode ``e`` draws
  ``shots`` support rows per class from the labelled pool with :func:`sample_shots` (seed ``e``);
  the centre is the mean of the whole pool (labels unused)."""
  centre = np.asarray(pool_x, np.float64).mean(0)
  query_y = np.asarray(query_y)
  accs = []
  for seed in range(episodes):
    idx = sample_shots(pool_y, shots, num_classes, seed, field)
    scores = centroid_scores(pool_x[idx], np.asarray(pool_y)[idx], query_x, num_classes, centre)
    accs.append(np.mean(scores.argmax(-1) == query_y))
  return np.asarray(accs)
