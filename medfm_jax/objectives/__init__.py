"""Objectives by name: ``config.objective.name`` -> an :class:`Objective` subclass.

Two spellings, and no list to edit:

* a built-in short name ``'X'``: the class declaring ``name = 'X'`` in ``medfm_jax/objectives/X.py``
  (mae, dino, clip, flava, supervised);
* an import path ``'package.module:ClassName'``: an objective defined anywhere importable (another
  project, a test). The name is saved with the config in every checkpoint, so
  ``python -m medfm_jax.evaluate`` imports the same class again (the module must be importable
  there too).

Everything else about an objective is declared on its class (see :mod:`.base`): its config checks
(``check_config``), where its checkpoints keep the image encoder (``image_encoders``) and whether
it has a text tower (``image_text``).
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from medfm_jax.errors import ConfigError
from medfm_jax.objectives.base import EncoderLoader, Objective

_IMPORT_PATH = "an import path 'package.module:ClassName'"


def _declared(module, name: str) -> type[Objective] | None:
  """The Objective subclass defined in ``module`` whose ``name`` is ``name``, if any."""
  for value in vars(module).values():
    if (isinstance(value, type) and issubclass(value, Objective) and value.__module__ == module.__name__
        and value.__dict__.get("name") == name):
      return value
  return None


def names() -> list[str]:
  """Short names of the built-in objectives (imports every module of this package)."""
  found = []
  for info in pkgutil.iter_modules(__path__):
    if _declared(importlib.import_module(f"{__name__}.{info.name}"), info.name) is not None:
      found.append(info.name)
  return sorted(found)


def resolve(name: str) -> type[Objective]:
  """The class ``objective.name`` names (a built-in short name or an import path); raises a
  one-line :class:`ConfigError` naming the field otherwise."""
  if isinstance(name, str) and ":" in name:
    module_name, _, attr = name.partition(":")
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ConfigError(f"objective.name={name!r}: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
      raise ConfigError(f"objective.name={name!r}: {module_name}.{attr} is not a subclass of "
                        "medfm_jax.objectives.base.Objective")
    return cls
  if isinstance(name, str) and name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}"):
    cls = _declared(importlib.import_module(f"{__name__}.{name}"), name)
    if cls is not None:
      return cls
  raise ConfigError(f"objective.name={name!r}: allowed {names()} or {_IMPORT_PATH}")


def build(config, encoder_loader: EncoderLoader | None = None) -> Objective:
  """Checks the objective's own fields and instantiates it. ``encoder_loader``: restores pretrained
  image encoders (``init_from``, LiT); the trainer passes ``train.restore.pretrained_encoder``."""
  cls = resolve(config.objective.get("name"))
  cls.check_config(config)
  return cls(config, encoder_loader=encoder_loader)
