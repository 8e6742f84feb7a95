"""Classifiers on frozen features: linear probe (BatchNorm without affine -> linear, MAE's
protocol) and ridge regression for few-shot evaluation (support sampling and the nearest-centroid
classifier: ``metrics.fewshot``); the linear segmentation probe (the same linear layer on every
patch token, logits upsampled bilinearly to the pixels).

BatchNorm without affine is applied with the statistics of the whole (fixed) train feature set:
the limit of MAE's running statistics, as the features never change during probing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adam", "sgd")   # probe.optimizer


def batchnorm_stats(x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """(mean, 1/sqrt(var + eps)) per feature (biased variance, as BatchNorm)."""
  x = np.asarray(x, np.float64)
  return x.mean(0), 1.0 / np.sqrt(x.var(0) + eps)


def normalize(x: np.ndarray, stats) -> np.ndarray:
  mean, inv_std = stats
  return ((np.asarray(x, np.float64) - mean) * inv_std).astype(np.float32)


def _minibatch_epochs(loss_fn, params, x, y, key, tx, batch_size: int, epochs: int):
  """``epochs`` passes of ``tx`` over shuffled minibatches of ``(x, y)`` (each epoch a fresh
  permutation from ``key``; the remainder of an epoch is dropped), all inside one ``lax.scan``."""
  n = x.shape[0]
  steps_per_epoch = max(n // batch_size, 1)

  def epoch(carry, e):
    perm = jax.random.permutation(jax.random.fold_in(key, e + 1), n)[:steps_per_epoch * batch_size]
    def step(c, idx):
      p, opt = c
      grads = jax.grad(loss_fn)(p, x[idx], y[idx])
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    return jax.lax.scan(step, carry, perm.reshape(steps_per_epoch, -1))[0], None

  return jax.lax.scan(epoch, (params, tx.init(params)), jnp.arange(epochs))[0][0]


@functools.partial(jax.jit, static_argnames=("num_classes", "tx", "batch_size", "epochs"))
def _fit(x, y, key, *, num_classes: int, tx, batch_size: int, epochs: int, init_std: float):
  d = x.shape[1]
  params = {"w": init_std * jax.random.normal(jax.random.fold_in(key, 0), (d, num_classes)),
            "b": jnp.zeros((num_classes,))}

  def loss_fn(p, xb, yb):
    logits = xb @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  return _minibatch_epochs(loss_fn, params, x, y, key, tx, batch_size, epochs)


def train_linear(x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, batch_size: int,
                 lr: float, optimizer: str = "adam", weight_decay: float = 0.0, seed: int = 0,
                 init_std: float = 0.01) -> dict:
  """Softmax regression ``{w [d, C], b [C]}`` on (normalised) features with minibatch Adam or SGD
  (momentum 0.9), cosine lr decay over all steps, decoupled weight decay on ``w``."""
  n = len(x)
  batch_size = min(batch_size, n)
  steps = epochs * max(n // batch_size, 1)
  schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
  decay_w = lambda p: {"w": True, "b": False}
  if optimizer == "adam":
    tx = optax.adamw(schedule, weight_decay=weight_decay, mask=decay_w)
  elif optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_w),
                     optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f"probe.optimizer={optimizer!r}: allowed {OPTIMIZERS}")
  params = _fit(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jax.random.PRNGKey(seed),
                num_classes=num_classes, tx=tx, batch_size=batch_size, epochs=epochs,
                init_std=init_std)
  return jax.tree.map(np.asarray, params)


def linear_scores(params: dict, x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32) @ params["w"] + params["b"]


def linear_probe(train_x, train_y, test_x, num_classes: int, cfg) -> np.ndarray:
  """BatchNorm (no affine, train statistics) -> linear layer trained on ``train_x``; returns the
  test logits ``[n_test, C]``. ``cfg``: epochs, batch_size, lr, optimizer, weight_decay, seed."""
  stats = batchnorm_stats(train_x)
  params = train_linear(normalize(train_x, stats), train_y, num_classes, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                        weight_decay=cfg.weight_decay, seed=cfg.seed)
  return linear_scores(params, normalize(test_x, stats))


def ridge_scores(train_x, train_y, test_x, num_classes: int, lam: float) -> np.ndarray:
  """One-hot ridge regression on standardised features (intercept unpenalised):
  ``W = (X^T X + lam I)^-1 X^T (Y - mean Y)``; returns test scores ``[n_test, C]``."""
  stats = batchnorm_stats(train_x)
  x = normalize(train_x, stats).astype(np.float64)
  t = normalize(test_x, stats).astype(np.float64)
  y = np.eye(num_classes)[np.asarray(train_y)]
  y_mean = y.mean(0)
  w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ (y - y_mean))
  return t @ w + y_mean


def seg_upsample(logits, size: int):
  """Patch logits ``[b, g, g, C]`` -> pixel logits ``[b, size, size, C]`` (bilinear)."""
  return jax.image.resize(logits, (logits.shape[0], size, size, logits.shape[-1]), "bilinear")


@functools.partial(jax.jit, static_argnames=("num_classes", "tx", "batch_size", "epochs"))
def _fit_seg(x, y, class_weights, key, *, num_classes: int, tx, batch_size: int, epochs: int):
  d = x.shape[-1]
  params = {"w": 0.01 * jax.random.normal(jax.random.fold_in(key, 0), (d, num_classes)),
            "b": jnp.zeros((num_classes,))}

  def loss_fn(p, xb, yb):
    logits = seg_upsample(xb @ p["w"] + p["b"], yb.shape[1])
    w = class_weights[yb]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, yb) * w).sum() / w.sum()

  return _minibatch_epochs(loss_fn, params, x, y, key, tx, batch_size, epochs)


def seg_probe(train_tokens, train_masks, test_tokens, num_classes: int, cfg,
              balanced: bool = True) -> np.ndarray:
  """Linear segmentation probe: BatchNorm (no affine, statistics of all train tokens) -> one linear
  layer per patch token ``[.., g, g, D] -> [.., g, g, C]`` -> bilinear upsampling to the mask size,
  trained with Adam (cosine lr, ``cfg`` as :func:`linear_probe`) on per-pixel cross-entropy,
  weighted by inverse class frequency of the train pixels with ``balanced``. Returns the predicted
  test label maps ``[n_test, H, W]``."""
  d = train_tokens.shape[-1]
  stats = batchnorm_stats(train_tokens.reshape(-1, d))
  x = normalize(train_tokens.reshape(-1, d), stats).reshape(train_tokens.shape)
  y = np.asarray(train_masks, np.int32)
  counts = np.bincount(y.ravel(), minlength=num_classes).astype(np.float64)
  weights = (counts.sum() / np.maximum(counts, 1) / num_classes) if balanced else np.ones(num_classes)
  batch_size = min(cfg.batch_size, len(x))
  steps = cfg.epochs * max(len(x) // batch_size, 1)
  tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, max(steps, 1)), weight_decay=cfg.weight_decay,
                   mask=lambda p: {"w": True, "b": False})
  params = _fit_seg(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weights, jnp.float32),
                    jax.random.PRNGKey(cfg.seed), num_classes=num_classes, tx=tx,
                    batch_size=batch_size, epochs=cfg.epochs)
  predict = jax.jit(lambda p, t: seg_upsample(t @ p["w"] + p["b"], y.shape[1]).argmax(-1))
  t = normalize(test_tokens.reshape(-1, d), stats).reshape(test_tokens.shape)
  return np.concatenate([np.asarray(predict(params, t[i:i + 256])) for i in range(0, len(t), 256)])
