"""Optimizer: optax AdamW (or SGD) with linear warmup + cosine, decay only on kernels, trainable masks."""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.peft import freeze

TRAIN, FROZEN = "train", "frozen"
OPTIMIZERS = ("adamw", "sgd")                 # optim.name
LR_SCALINGS = ("linear", "sqrt", "none")     # lr_scaling
GRAD_CLIP_MODES = ("global", "per_param")    # grad_clip_mode


def effective_lr(config) -> float:
  """Base lr scaled by the global batch: ``linear`` x B/256 (MAE, DINO), ``sqrt`` x sqrt(B/1024) (DINOv2)."""
  rule = config.lr_scaling
  if rule == "linear":
    return config.lr * config.batch_size / 256
  if rule == "sqrt":
    return config.lr * math.sqrt(config.batch_size / 1024)
  if rule == "none":
    return config.lr
  raise ValueError(f"lr_scaling={rule!r}: allowed {LR_SCALINGS}")


SCHEDULE_KEYS = ("peak_lr", "warmup_steps", "total_steps", "min_lr", "weight_decay", "weight_decay_end")


def schedule_values(config) -> dict[str, np.float32]:
  """The numbers the lr and weight-decay schedules read (keys ``SCHEDULE_KEYS``). The jitted
  train step takes them as an argument rather than as constants of its program, so runs that
  differ only in lr, warmup, length or weight decay (a sweep over them, a resumed run given more
  steps) share one compiled step."""
  end = config.get("weight_decay_end", None)
  values = {"peak_lr": effective_lr(config), "warmup_steps": min(config.warmup_steps, config.total_steps),
            "total_steps": config.total_steps, "min_lr": config.min_lr,
            "weight_decay": config.weight_decay,
            "weight_decay_end": config.weight_decay if end is None else end}
  return {k: np.float32(v) for k, v in values.items()}


def _values(config, schedule):
  return schedule_values(config) if schedule is None else schedule


def lr_schedule(config, schedule=None) -> optax.Schedule:
  """0 -> peak linearly over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``
  (optax's ``warmup_cosine_decay_schedule``, written on ``schedule``'s numbers: the config's by
  default, or a traced step's arguments)."""
  v = _values(config, schedule)
  peak, warmup, end = v["peak_lr"], v["warmup_steps"], v["min_lr"]

  def lr(count):
    step = jnp.asarray(count, jnp.float32)
    frac = jnp.clip((step - warmup) / jnp.maximum(v["total_steps"] - warmup, 1.0), 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, peak * step / jnp.maximum(warmup, 1.0), cosine)
  return lr


def decay_mask(params) -> Any:
  """True for matmul kernels (leaves named ``kernel``); biases, norms, tokens and embeddings of
  position get no weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def weight_decay_schedule(config, schedule=None) -> Any:
  """``weight_decay`` (the number itself), or, when the config sets a different
  ``weight_decay_end``, a cosine from it to that over ``total_steps`` (DINO: 0.04 -> 0.4). Whether
  it is scheduled comes from the config (it decides the optimizer state's structure), the numbers
  from ``schedule`` (the config's by default)."""
  start, end = config.weight_decay, config.get("weight_decay_end", None)
  if end is None or end == start:
    return start if schedule is None else schedule["weight_decay"]
  v = _values(config, schedule)

  def wd(count):
    frac = jnp.clip(count / jnp.maximum(v["total_steps"], 1.0), 0.0, 1.0)
    return v["weight_decay_end"] + (v["weight_decay"] - v["weight_decay_end"]) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return wd


def clip_per_param(max_norm: float) -> optax.GradientTransformation:
  """Clips each parameter tensor's gradient to norm ``max_norm`` independently (DINO's
  ``clip_gradients``: scale by ``max_norm / (norm + 1e-6)`` when that is < 1)."""
  def update_fn(updates, state, params=None):
    del params
    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def freeze_until(mask: Callable[[Any], Any], steps: int) -> optax.GradientTransformation:
  """Zeroes the final updates of the leaves where ``mask(params)`` is True for the first ``steps``
  optimizer steps: no update and no weight decay (DINO's frozen last layer). Adam moments of those
  leaves still accumulate, unlike PyTorch where their grads are None."""
  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("freeze_until needs params in update()")
    frozen = state.count < steps
    updates = jax.tree.map(lambda m, u: jnp.where(frozen & m, jnp.zeros_like(u), u), mask(params), updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
  return optax.GradientTransformation(init_fn, update_fn)


def _on_arrays(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """``fn(params)`` for the trees optax derives from params (masks, labels), evaluated on the
  arrays when the params carry logical names (``train.state.named_init`` runs ``tx.init`` on
  named params so the optimizer state keeps their names), its result named alike."""
  return lambda params: mesh_lib.box_like(params, fn(mesh_lib.unbox(params)))


class Optimizer(NamedTuple):
  """An optax transformation (``init``, ``update``) that can be rebuilt around other schedule
  numbers: ``with_schedule(values)`` is the same optimizer on ``values`` (``SCHEDULE_KEYS``; the
  train step's traced arguments), with the same state structure."""
  init: Callable[..., Any]
  update: Callable[..., Any]
  with_schedule: Callable[[dict], "Optimizer"]


def make_optimizer(config, trainable: Callable[[Any], Any] | None = None, *,
                   lr_multipliers: Callable[[Any], Any] | None = None,
                   frozen_for_steps: tuple[Callable[[Any], Any], int] | None = None,
                   schedule: dict | None = None) -> Optimizer:
  """AdamW (``optim.name='adamw'``: decoupled weight decay) or SGD (``'sgd'``: L2 weight decay,
  ``optim.momentum``), with warmup + cosine lr; weight decay (optionally scheduled) on kernels only.

  ``config.grad_clip`` clips by global norm (``grad_clip_mode='global'``) or per parameter tensor
  (``'per_param'``). ``trainable(params) -> tree of bool``: frozen leaves get no update, no weight
  decay and no optimizer state. ``lr_multipliers(params) -> tree of floats`` scales each leaf's
  step (layer-wise lr decay). ``frozen_for_steps=(mask_fn, n)`` holds masked leaves still for the
  first n steps. ``schedule``: the numbers of the lr and weight-decay schedules
  (:func:`schedule_values`; default the config's).
  """
  tx = _transformation(config, trainable, lr_multipliers, frozen_for_steps, schedule)
  rebuild = lambda values: make_optimizer(config, trainable, lr_multipliers=lr_multipliers,
                                          frozen_for_steps=frozen_for_steps, schedule=values)
  return Optimizer(tx.init, tx.update, rebuild)


def _transformation(config, trainable, lr_multipliers, frozen_for_steps, schedule):
  o = config.optim
  chain = []
  if config.grad_clip and config.grad_clip > 0:
    mode = config.get("grad_clip_mode", "global")
    if mode not in GRAD_CLIP_MODES:
      raise ValueError(f"grad_clip_mode={mode!r}: allowed {GRAD_CLIP_MODES}")
    chain.append(optax.clip_by_global_norm(config.grad_clip) if mode == "global"
                 else clip_per_param(config.grad_clip))
  name = o.get("name", "adamw")
  if name == "adamw":
    chain.append(optax.adamw(lr_schedule(config, schedule), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=weight_decay_schedule(config, schedule), mask=_on_arrays(decay_mask)))
  elif name == "sgd":   # PyTorch SGD: L2 on kernels added to the gradient, then momentum
    chain += [optax.add_decayed_weights(weight_decay_schedule(config, schedule), mask=_on_arrays(decay_mask)),
              optax.sgd(lr_schedule(config, schedule), momentum=o.get("momentum", 0.0) or None)]
  else:
    raise ValueError(f"optim.name={name!r}: allowed {OPTIMIZERS}")
  if lr_multipliers is not None:
    chain.append(freeze.scale_by_tree(lr_multipliers))
  if frozen_for_steps is not None:
    chain.append(freeze_until(*frozen_for_steps))
  tx = optax.chain(*chain)
  if trainable is None:
    return tx
  labels = _on_arrays(lambda params: jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable(params)))
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)
