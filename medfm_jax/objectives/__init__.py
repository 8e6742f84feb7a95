"""Objective registry: ``config.objective.name`` -> Objective class."""
from __future__ import annotations

from medfm_jax.objectives.base import Objective

_REGISTRY = {
    "mae": "medfm_jax.objectives.mae:MaeObjective",
    "dino": "medfm_jax.objectives.dino:DinoObjective",
    "supervised": "medfm_jax.objectives.supervised:SupervisedObjective",
    "clip": "medfm_jax.objectives.clip:ClipObjective",     # CLIP, SigLIP, LiT (objective.loss)
    "flava": "medfm_jax.objectives.flava:FlavaObjective",
}


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(config) -> Objective:
  """Instantiates the objective named by ``config.objective.name``."""
  import importlib  # pylint: disable=g-import-not-at-top
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f"objective.name={name!r}: allowed {names()}")
  module, cls = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
