"""Errors a user can cause through the config, shared by every layer (this module imports nothing).

The shared contract (``medfm_jax.config``) and each objective's own ``check_config`` raise
:class:`ConfigError` with one line naming the field and what is allowed.
"""
from __future__ import annotations

import contextlib


class ConfigError(ValueError):
  """A config value a user set is not allowed; the message names the field."""


def check(cond: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``cond``."""
  if not cond:
    raise ConfigError(message)


@contextlib.contextmanager
def config_errors():
  """Re-raises a ``ValueError`` from the block (a resolver or parser that names the field) as a
  one-line :class:`ConfigError`."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None
