"""The interface between the one training loop and each pretraining objective.

The loop owns the optimizer, sharding, accumulation, checkpoints and logging; an objective owns
its model, its loss and its evaluation. Objective state that is not trained by gradients (EMA
teachers, centers, queues) lives in ``extra`` and is sharded like the params it mirrors.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


class Objective(abc.ABC):
  """One pretraining objective. Methods are traced inside ``jit``; keep them pure."""

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict) -> tuple[Any, Any]:
    """-> (params boxed with ``nn.Partitioned`` logical names, extra state)."""

  @abc.abstractmethod
  def loss(self, params, extra, batch: dict, rng: jax.Array, step) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """-> (scalar loss, (scalar metrics, new extra)). ``batch`` is one (micro)batch."""

  def after_update(self, params, extra, step):
    """Updates ``extra`` after the optimizer step (e.g. the EMA teacher). Default: unchanged."""
    del params, step
    return extra

  def trainable(self, params) -> Any | None:
    """Tree of bools marking trainable leaves, or None when everything trains."""
    del params
    return None

  def optimizer_kwargs(self) -> dict:
    """Extra keyword arguments for ``train.optim.make_optimizer`` (e.g. ``frozen_for_steps``)."""
    return {}

  def warnings(self, scalars: dict[str, float]) -> list[str]:
    """Host-side checks of logged training scalars (e.g. collapse); each string is logged."""
    del scalars
    return []

  def eval_metrics(self, params, extra, batch: dict, rng: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Held-out metrics as ``name -> (sum over valid rows, number of valid rows)``.

    ``batch['mask']`` marks real (non-padding) rows. Default: none.
    """
    del params, extra, batch, rng
    return {}

  def evaluate(self, params, extra, mesh, step: int) -> dict[str, float]:
    """Whole-dataset evaluations run at eval time (e.g. kNN on frozen features), called on every
    process inside the mesh context; returns scalars merged into the eval metrics. Default: none."""
    del params, extra, mesh, step
    return {}

  def eval_artifacts(self, params, extra, batch: dict, rng: jax.Array, workdir: str, step: int) -> None:
    """Writes eval images etc. Called on every process (it may run sharded computations);
    only process 0 may write files."""
    del params, extra, batch, rng, workdir, step


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-row ``values`` over rows where ``mask``, number of such rows)."""
  mask = mask.astype(jnp.float32)
  return (values * mask).sum(), mask.sum()
