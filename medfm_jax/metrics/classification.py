"""Classification metrics from class scores, in NumPy: accuracy, balanced accuracy, macro AUROC
(one-vs-rest, Mann-Whitney rank statistic with tied scores counted 1/2) and a per-class table."""
from __future__ import annotations

import numpy as np


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative) + 1/2 P(tie); NaN when one of
  the two groups is empty."""
  positive = np.asarray(positive, bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  from scipy import stats  # pylint: disable=g-import-not-at-top  (heavy; every CLI process imports this module)
  ranks = stats.rankdata(np.asarray(scores, np.float64))   # ties get their average rank
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _softmax(scores: np.ndarray) -> np.ndarray:
  z = scores - scores.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def classification_metrics(scores: np.ndarray, labels: np.ndarray,
                           class_names: tuple[str, ...] | list[str]) -> dict:
  """``scores [n, C]`` (logits or any monotone class scores), ``labels [n]`` -> dict with
  ``accuracy``, ``balanced_accuracy`` (mean recall over classes present), ``macro_auroc`` (mean
  one-vs-rest AUROC of the softmax probabilities over classes with positives and negatives),
  ``num_examples`` and ``per_class`` rows (name, support, recall, precision, auroc)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, np.int64)
  num_classes = len(class_names)
  if scores.ndim != 2 or scores.shape != (len(labels), num_classes):
    raise ValueError(f"scores {scores.shape} must be [n={len(labels)}, classes={num_classes}]")
  probs = _softmax(scores)
  pred = scores.argmax(-1)
  rows = []
  for c, name in enumerate(class_names):
    is_c = labels == c
    support = int(is_c.sum())
    predicted = int((pred == c).sum())
    hits = int((is_c & (pred == c)).sum())
    rows.append({"class": name, "support": support,
                 "recall": hits / support if support else float("nan"),
                 "precision": hits / predicted if predicted else float("nan"),
                 "auroc": binary_auroc(probs[:, c], is_c)})
  recalls = [r["recall"] for r in rows if r["support"]]
  aurocs = [r["auroc"] for r in rows if not np.isnan(r["auroc"])]
  return {"accuracy": float(np.mean(pred == labels)) if len(labels) else float("nan"),
          "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
          "macro_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
          "num_examples": int(len(labels)), "per_class": rows}
