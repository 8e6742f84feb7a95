"""DINO / DINOv2 / iBOT loss terms and schedules as pure, jit-able float32 functions.

All functions see GLOBAL arrays: under ``jax.jit`` with ``NamedSharding`` inputs, a reduction over
the batch axis is already the reduction over every device and process (the role of
``dist.all_reduce`` in the PyTorch code), so no ``pmean``/``psum`` is needed anywhere.
Teacher-side quantities are wrapped in ``stop_gradient``.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def _f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def dino_cross_entropy(student_logits: Array, teacher_probs: Array, student_temp: float,
                       n_global: int) -> Array:
  """Mean over view pairs ``(i, j), j != i`` of ``mean_b -sum_k p_t[i] * log_softmax(s[j]/T_s)``.

  ``student_logits [n_views, b, K]`` (its first ``n_global`` views are the teacher's global crops),
  ``teacher_probs [n_global, b, K]`` (already centred/sharpened; gradient stopped here).
  """
  s = jax.nn.log_softmax(_f32(student_logits) / student_temp, axis=-1)
  p = jax.lax.stop_gradient(_f32(teacher_probs))
  n_views, b = s.shape[0], s.shape[1]
  if p.shape[0] != n_global or n_global > n_views:
    raise ValueError(f"teacher has {p.shape[0]} views, n_global={n_global}, student {n_views}")
  ce = -jnp.einsum("ibk,jbk->ij", p, s) / b                 # [n_global, n_views]
  valid = jnp.arange(n_global)[:, None] != jnp.arange(n_views)[None, :]
  n_pairs = n_global * n_views - n_global
  if n_pairs == 0:
    raise ValueError("dino loss needs at least one (teacher, other student view) pair")
  return jnp.sum(jnp.where(valid, ce, 0.0)) / n_pairs


def teacher_metrics(teacher_probs: Array, valid: Array | None = None) -> dict[str, Array]:
  """Collapse diagnostics for teacher probabilities ``[..., K]`` (all leading axes pooled).

  - ``teacher_entropy``: mean over samples of ``-sum_k p log p`` (-> 0: one-hot collapse).
  - ``teacher_kl_to_uniform``: ``KL(p_bar || U) = sum_k p_bar log p_bar + ln K`` with ``p_bar``
    the mean teacher distribution over batch and views (-> 0: uniform collapse).

  ``valid`` (the leading shape, bool) restricts both to its True rows (iBOT's masked patches).
  """
  p = jax.lax.stop_gradient(_f32(teacher_probs))
  k = p.shape[-1]
  p = p.reshape(-1, k)
  w = jnp.ones(p.shape[0]) if valid is None else _f32(jnp.asarray(valid).reshape(-1))
  w = w / jnp.maximum(jnp.sum(w), 1.0)
  plogp = lambda q: jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
  entropy = -jnp.sum(w * jnp.sum(plogp(p), axis=-1))
  p_bar = w @ p
  kl = jnp.sum(plogp(p_bar)) + math.log(k)
  return {"teacher_entropy": entropy, "teacher_kl_to_uniform": kl}


def dino_loss(student_logits: Array, teacher_logits: Array, center: Array, student_temp: float,
              teacher_temp: float | Array, n_global: int) -> tuple[Array, dict[str, Array]]:
  """DINO loss (``DINOLoss.forward``) with teacher probs ``softmax((t - center) / T_t)``.

  Args: ``student_logits [n_views, b, K]``, raw ``teacher_logits [n_global, b, K]``, ``center``
  broadcastable to ``[K]``. Returns ``(loss, metrics)``; metrics are ``teacher_metrics`` of the
  teacher probabilities plus ``loss_over_ln_k`` (-> 1 when collapsed).
  """
  t = jax.lax.stop_gradient(_f32(teacher_logits) - _f32(center))
  probs = jax.nn.softmax(t / teacher_temp, axis=-1)
  loss = dino_cross_entropy(student_logits, probs, student_temp, n_global)
  metrics = teacher_metrics(probs)
  metrics["loss_over_ln_k"] = jax.lax.stop_gradient(loss) / math.log(teacher_logits.shape[-1])
  return loss, metrics


def update_center(center: Array, teacher_logits: Array, momentum: float | Array = 0.9,
                  weights: Array | None = None) -> Array:
  """``center <- m * center + (1 - m) * mean(raw teacher logits)`` over all views and the batch.

  Under ``jax.jit`` with a batch sharded by ``NamedSharding`` the mean over the batch axis of the
  global array IS the global-batch mean across devices and processes (DINO's ``all_reduce``); no
  ``pmean`` is needed (only inside ``shard_map`` would one be). ``weights`` (the logits' leading
  shape, e.g. iBOT's masked-patch indicator) makes it a weighted mean; a batch of zero weight
  leaves the center unchanged. Returns ``center``'s shape.
  """
  t = jax.lax.stop_gradient(_f32(teacher_logits))
  t = t.reshape(-1, t.shape[-1])
  if weights is None:
    batch_mean = jnp.mean(t, axis=0)
  else:
    w = _f32(weights).reshape(-1)
    total = jnp.sum(w)
    batch_mean = jnp.where(total > 0, (w @ t) / jnp.maximum(total, 1e-12), _f32(center).reshape(-1))
  return momentum * _f32(center) + (1.0 - momentum) * batch_mean.reshape(jnp.shape(center))


def sinkhorn_knopp(teacher_logits: Array, teacher_temp: float | Array, n_iters: int = 3,
                   valid: Array | None = None) -> Array:
  """DINOv2 ``SinkhornKnoppTeacher``: ``[..., K]`` logits -> assignments, each row sums to 1.

  ``Q = exp(l / T)`` (as ``K x B``), ``Q /= sum(Q)``; ``n_iters`` x (each prototype row to ``1/K``,
  each sample column to ``1/B``); ``Q *= B``. ``B`` is the global batch (all leading axes of
  the global array, i.e. all devices). Computed in the log domain: every step is a division by a
  positive per-row/per-column/global factor, i.e. a logsumexp subtraction, so the result is the
  same as dinov2's but no ``exp`` can overflow or turn a whole row to 0/0 (as a mere global-max
  shift does at ``T = 0.04`` with logits ~50). ``valid`` (the leading shape, bool) restricts the
  samples to its True rows (iBOT's masked patches; ``B`` = their count); other rows return 0.
  """
  l = jax.lax.stop_gradient(_f32(teacher_logits))
  k = l.shape[-1]
  l = l.reshape(-1, k)
  if valid is None:
    log_b = math.log(l.shape[0])
    keep = lambda x: x
  else:
    v = jnp.asarray(valid, bool).reshape(-1, 1)
    log_b = jnp.log(jnp.maximum(jnp.sum(v), 1).astype(jnp.float32))
    keep = lambda x: jnp.where(v, x, -jnp.inf)
  log_q = keep(l / teacher_temp)
  log_q = log_q - jax.nn.logsumexp(log_q)
  for _ in range(n_iters):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - math.log(k)  # prototypes
    log_q = keep(log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - log_b)  # samples
  q = jnp.exp(log_q + log_b)
  if valid is not None:
    q = jnp.where(v, q, 0.0)
  return q.reshape(teacher_logits.shape)


def ibot_patch_loss(student_patch_logits: Array, teacher_patch_probs: Array, masks: Array,
                    student_temp: float) -> Array:
  """iBOT masked-patch loss (dinov2 ``iBOTPatchLoss.forward_masked`` with default weights).

  ``student_patch_logits [B, N, K]``, ``teacher_patch_probs [B, N, K]`` (centred/sharpened),
  ``masks [B, N]`` (True = masked in the student). Per image ``sum_masked CE / max(n_masked, 1)``,
  then summed and divided by ALL ``B`` images (dinov2 divides by ``masks.shape[0]``, unmasked
  images included: they contribute 0). A batch with no masked patch gives exactly 0.
  """
  s = jax.nn.log_softmax(_f32(student_patch_logits) / student_temp, axis=-1)
  p = jax.lax.stop_gradient(_f32(teacher_patch_probs))
  m = _f32(masks)
  ce = -jnp.sum(p * s, axis=-1)                                  # [B, N]
  per_image = jnp.sum(jnp.where(m > 0, ce, 0.0), axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  return jnp.sum(per_image) / m.shape[0]


def koleo_loss(x: Array, eps: float = 1e-8) -> Array:
  """KoLeo regulariser (dinov2 ``KoLeoLoss``): ``-mean_i log(||x_i - x_nn(i)|| + eps)``.

  ``x [B, d]`` is L2-normalised (``F.normalize`` eps ``eps``); the neighbour maximises the dot
  product with the diagonal excluded (set to -1); the distance is ``nn.PairwiseDistance``'s
  ``||x_i - x_j + eps||``. The set is the whole (global) batch given; dinov2 applies it per GPU
  and per global crop.
  """
  x = _f32(x)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  dots = jax.lax.stop_gradient(x @ x.T)
  n = x.shape[0]
  dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
  nn_idx = jnp.argmax(dots, axis=1)
  dist = jnp.linalg.norm(x - x[nn_idx] + eps, axis=-1)
  return -jnp.mean(jnp.log(dist + eps))


def teacher_temp_schedule(step: Any, warmup_steps: int, start: float = 0.04,
                          end: float = 0.07) -> Array:
  """Linear ``start -> end`` over ``warmup_steps`` steps (reaches ``end`` at ``warmup_steps``)."""
  if warmup_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.clip(_f32(step) / warmup_steps, 0.0, 1.0)
  return start + (end - start) * frac


def cosine_schedule(step: Any, total_steps: int, start: float, end: float) -> Array:
  """``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``, constant ``end`` after.

  DINO uses it per step for the EMA momentum (0.996 -> 1) and weight decay (0.04 -> 0.4).
  """
  frac = jnp.clip(_f32(step) / max(total_steps, 1), 0.0, 1.0)
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def collapse_warning(loss: Any, num_prototypes: int, tol: float = 0.05) -> bool:
  """True when ``|loss - ln K| <= tol * ln K`` (a loss pinned at ln K signals collapse). Host-side."""
  ln_k = math.log(num_prototypes)
  return bool(abs(float(loss) - ln_k) <= tol * ln_k)
