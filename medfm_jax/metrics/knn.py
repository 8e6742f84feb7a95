"""Weighted k-nearest-neighbour classification on frozen features (DINO's kNN protocol).

Features are L2-normalised; each test example takes its top-k cosine neighbours in the train bank,
which vote for their labels with weight ``exp(sim / T)`` (k=20, T=0.07 by default). The test set is
processed in chunks so that only ``[chunk, n_train]`` similarities exist at a time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames="k")
def _chunk_scores(test, bank, bank_onehot, temperature, k: int):
  sims = test @ bank.T                                           # [chunk, n_train]
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)                      # [chunk, k]
  return jnp.einsum("ck,ckl->cl", weights, bank_onehot[top_idx])  # class scores [chunk, classes]


def knn_predict(train_features, train_labels, test_features, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 256) -> np.ndarray:
  """Class scores ``[n_test, num_classes]`` of the weighted kNN vote (features need not be normalised)."""
  if k > len(train_features):
    raise ValueError(f"k={k} exceeds the {len(train_features)} train features")
  bank = l2_normalize(jnp.asarray(train_features, jnp.float32))
  onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes, dtype=jnp.float32)
  test = l2_normalize(jnp.asarray(test_features, jnp.float32))
  scores = [_chunk_scores(test[i:i + chunk], bank, onehot, jnp.float32(temperature), k)
            for i in range(0, len(test), chunk)]
  return np.asarray(jnp.concatenate(scores))


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
  """Top-1 accuracy of :func:`knn_predict`."""
  scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
  return float(np.mean(scores.argmax(-1) == np.asarray(test_labels)))
