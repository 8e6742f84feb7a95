"""Errors a user can cause through the config, shared by every layer (this module imports nothing).

The shared contract (``medfm_jax.config``) and each objective's own ``check_config`` raise
:class:`ConfigError` with one line naming the field and what is allowed.
"""
from __future__ import annotations


class ConfigError(ValueError):
  """A config value a user set is not allowed; the message names the field."""


def check(cond: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``cond``."""
  if not cond:
    raise ConfigError(message)
