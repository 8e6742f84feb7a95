"""Orbax checkpoints: async save of the train state + data-iterator state, auto-resume, resharding
restore (a checkpoint written on one mesh restores onto any other), partial restore of params.

Layout: ``WORKDIR/checkpoints/<step>/{state, data, meta}``. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save never leaves a readable partial step.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(ValueError):
  """A checkpoint path or content a user supplied cannot be used."""


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for train states (every process takes part)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, meta: dict | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    _check_matches(os.path.join(self.directory, str(step), "state"), abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}


def _check_matches(state_dir: str, abstract_state) -> None:
  """Raises CheckpointError naming missing/unexpected keys and shape mismatches, before reading."""
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = _shapes_by_path(ckptr.metadata(state_dir).item_metadata.tree)
  wanted = _shapes_by_path(abstract_state)
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  mismatched = sorted(f"{k} {stored[k]} != {wanted[k]}" for k in set(wanted) & set(stored)
                      if stored[k] != wanted[k])
  if missing or unexpected or mismatched:
    parts = [f"{name}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
             for name, items in (("missing", missing), ("unexpected", unexpected),
                                 ("shape mismatch (stored != config)", mismatched)) if items]
    raise CheckpointError(f"checkpoint {os.path.dirname(state_dir)} does not fit this config's train "
                          f"state (changed model/optimizer config? use a new --workdir): {'; '.join(parts)}")


def resolve_checkpoint_dir(path: str) -> str:
  """A workdir, its ``checkpoints`` dir, or one step dir -> the step's ``state`` directory."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "state")):
      return os.path.join(candidate, "state")
    steps = [d for d in os.listdir(candidate) if d.isdigit()] if os.path.isdir(candidate) else []
    if steps:
      return os.path.join(candidate, max(steps, key=int), "state")
  raise CheckpointError(f"init_from={path!r}: no checkpoint found; expected a workdir, its "
                        "'checkpoints' directory, or a checkpoints/<step> directory")


def restore_params(path: str, abstract_params: Any | None = None) -> Any:
  """Loads the ``params`` subtree of a train-state checkpoint: as host numpy arrays (any saving
  topology), or onto the shardings of ``abstract_params`` (ShapeDtypeStructs)."""
  state_dir = resolve_checkpoint_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    if abstract_params is None:
      tree = ckptr.metadata(state_dir).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    else:
      target = {"params": abstract_params}
      restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]
