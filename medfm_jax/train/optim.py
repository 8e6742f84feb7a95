"""Optimizer: optax AdamW with linear warmup + cosine, decay only on kernels, trainable masks."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax

TRAIN, FROZEN = "train", "frozen"


def effective_lr(config) -> float:
  """Base lr scaled by the global batch: ``linear`` x B/256 (MAE, DINO), ``sqrt`` x sqrt(B/1024) (DINOv2)."""
  rule = config.lr_scaling
  if rule == "linear":
    return config.lr * config.batch_size / 256
  if rule == "sqrt":
    return config.lr * math.sqrt(config.batch_size / 1024)
  if rule == "none":
    return config.lr
  raise ValueError(f"lr_scaling={rule!r}: allowed 'linear', 'sqrt', 'none'")


def lr_schedule(config) -> optax.Schedule:
  """0 -> peak linearly over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``."""
  peak = effective_lr(config)
  warmup = min(config.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.min_lr)


def decay_mask(params) -> Any:
  """True for matmul kernels (leaves named ``kernel``); biases, norms, tokens and embeddings of
  position get no weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config, trainable: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """AdamW (+ global-norm clipping). ``trainable(params) -> tree of bool``: frozen leaves get no
  update, no weight decay and no optimizer state."""
  o = config.optim
  chain = []
  if config.grad_clip and config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip))
  chain.append(optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=config.weight_decay, mask=decay_mask))
  tx = optax.chain(*chain)
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable(params))
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)
