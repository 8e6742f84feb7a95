"""In-training evaluation of an encoder's frozen features on labelled images, for any objective with
an image encoder: weighted kNN (DINO's monitor, k=20, T=0.07) and nearest-centroid few-shot
accuracy (``metrics.fewshot``, :data:`SHOTS` per class, :data:`EPISODES` support draws) of each
label of ``over_split.LABELS``.

The bank is the first ``bank_examples`` records of the train split (all of it when smaller), the
queries the first ``data.eval_examples`` of the eval split. Evaluated at step 0 too, every run
carries its own random-init baseline: the few-shot scores are where pretraining shows first
(docs/benchmark.md).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from absl import logging

from medfm_jax.data import phantoms, pipeline
from medfm_jax.metrics import fewshot, knn, over_split

SHOTS = (1, 10)       # labelled images per class of a few-shot episode
EPISODES = 50         # support draws averaged per score (seeds 0..49)
NUM_CLASSES = {"finding": len(phantoms.FINDINGS), "modality": len(phantoms.MODALITIES)}


def frozen_feature_metrics(data, mesh, embed: Callable, bank_examples: int,
                           shots=SHOTS, episodes: int = EPISODES) -> dict[str, float]:
  """``{knn_LABEL_acc, fewshotK_LABEL_acc}`` for the labels of ``over_split.LABELS``.

  ``embed(images) -> features [b, d]``: jitted with replicated outputs. The bank is cut to the
  train split's size; the classes of a label are the phantoms' (other sources: the largest label
  seen + 1). A few-shot score is left out (one log line) when a class has fewer than K images in
  the bank.
  """
  run = lambda split, n, source=None: over_split.map_over_split(
      data, mesh, lambda batch: embed(batch["image"]), split, n, data.eval_batch_size,
      source=source)
  train = pipeline.make_source(data, data.train_split)   # built once: its size cuts the bank
  bank_x, bank_y = run(data.train_split, min(bank_examples, len(train)), train)
  query_x, query_y = run(data.eval_split, data.eval_examples)
  out = {}
  for name in over_split.LABELS:
    seen = int(max(bank_y[name].max(), query_y[name].max())) + 1
    classes = NUM_CLASSES[name] if data.source == "phantoms" else seen
    out[f"knn_{name}_acc"] = knn.knn_accuracy(bank_x, bank_y[name], query_x, query_y[name],
                                              classes, k=min(20, len(bank_x)))
    counts = np.bincount(bank_y[name], minlength=classes)
    for k in shots:
      if counts.min() < k:
        logging.warning("few-shot %s: a class has %d of the %d bank images it needs (%d-shot); "
                        "raise objective.knn_train_examples", name, counts.min(), k, k)
        continue
      out[f"fewshot{k}_{name}_acc"] = float(fewshot.centroid_accuracy(
          bank_x, bank_y[name], query_x, query_y[name], classes, k, episodes).mean())
  return out
