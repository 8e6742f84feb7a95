"""The one run assembler: config + mesh (+ the shapes of a batch) -> objective, optimizer, the
abstract sharded train state and the jitted steps.

The trainer, the benchmark, the planner, feature extraction and the tests all build a run here,
so they compile the same step on the same shardings. Nothing is allocated until
:meth:`Assembly.init_state` / :meth:`Assembly.init_params`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from medfm_jax import objectives as objectives_lib
from medfm_jax.data import spec as data_spec
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.parallel import programs
from medfm_jax.train import optim, restore
from medfm_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Assembly:
  """One run's pieces. ``abstract_batch`` / ``abstract_state`` are ``ShapeDtypeStruct`` trees
  carrying their shardings; ``train_step(state, batch) -> (state, metrics)`` donates the state."""
  config: Any
  mesh: jax.sharding.Mesh
  data: data_spec.DataSpec          # config.data resolved once (train and eval pipelines' spec)
  objective: objectives_lib.Objective
  tx: Any
  abstract_batch: Any
  abstract_state: state_lib.TrainState
  train_step: Any
  eval_step: Any

  @property
  def state_shardings(self):
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  def init_state(self) -> state_lib.TrainState:
    """The initial train state, created directly in its shardings (no host-side full copy)."""
    init = programs.jit_once(lambda: mesh_lib.unbox(state_lib.named_init(
        self.objective, self.tx, self.config.seed, _one_example(self.abstract_batch))),
                   out_shardings=self.state_shardings)
    with mesh_lib.use_mesh(self.mesh):
      return init()

  def init_params(self):
    """The initial params alone (no optimizer state), in their shardings."""
    init = programs.jit_once(lambda: mesh_lib.unbox(self.objective.init(
        state_lib.init_keys(self.config.seed)[0], _one_example(self.abstract_batch))[0]),
                   out_shardings=self.state_shardings.params)
    with mesh_lib.use_mesh(self.mesh):
      return init()

  def lower(self):
    """The train step lowered on the abstract state and batch (for AOT compilation / planning)."""
    with mesh_lib.use_mesh(self.mesh):
      return self.train_step.lower(self.abstract_state, self.abstract_batch)


def _one_example(abstract_batch):
  """Zeros shaped like one row of the batch: initialisation needs shapes, not data or batch size."""
  return jax.tree.map(lambda a: jnp.zeros((1, *a.shape[1:]), a.dtype), abstract_batch)


def build_objective(config, encoder_loader=restore.pretrained_encoder):
  """The config's objective (with the train layer's encoder loader for ``init_from`` / LiT) and the
  optax transformation that trains it."""
  objective = objectives_lib.build(config, encoder_loader=encoder_loader)
  return objective, optim.make_optimizer(config, trainable_fn(objective), **objective.optimizer_kwargs())


def trainable_fn(objective):
  """``objective.trainable`` where the objective freezes something, else None (all trainable)."""
  base = objectives_lib.Objective.trainable
  return None if type(objective).trainable is base else objective.trainable


def assemble(config, mesh: jax.sharding.Mesh, batch=None) -> Assembly:
  """The run of ``config`` on ``mesh``. ``batch``: the abstract global batch (``ShapeDtypeStruct``
  tree); default: the train batch the data spec describes (``DataSpec.abstract_batch``). It is
  sharded over the batch axes either way."""
  data = data_spec.resolve(config.data)
  objective, tx = build_objective(config)
  if batch is None:   # the step sees train batches after pipeline.pop_skipped
    batch = {k: v for k, v in data.abstract_batch(config.batch_size).items() if k != data_spec.SKIPPED_KEY}
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=mesh_lib.batch_sharding(mesh, len(a.shape))), batch)
  example = _one_example(batch)   # on the default backend: the mesh's devices may be ones to
  with mesh_lib.use_mesh(mesh):   # compile for, not to run on (plan --topology)
    abstract_state = state_lib.state_shardings(objective, tx, config.seed, example, mesh)
  train_step = state_lib.jit_train_step(objective, tx, config, abstract_state)
  eval_step = jax.jit(state_lib.make_eval_step(objective))
  return Assembly(config, mesh, data, objective, tx, batch, abstract_state, train_step, eval_step)
