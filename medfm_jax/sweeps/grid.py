"""Grids of config overrides: :func:`product`, :func:`zip_` and stable point names.

A *point* is a dict of dotted config fields to values, e.g. ``{"objective.mask_ratio": 0.6}``.
A *factor* is either a dict of field -> list of values or a list of points::

  product({"objective.mask_ratio": [0.6, 0.9]}, {"model.decoder_depth": [1, 2]})   # 4 points
  zip_({"lr": [1e-3, 3e-4], "warmup_steps": [10, 50]})                           # 2 points
  product(zip_({"lr": [1e-3, 3e-4], "total_steps": [100, 300]}), seed=[0, 1])     # 4 points
"""
from __future__ import annotations

import hashlib
import itertools
import re

MAX_NAME = 120   # longer point names are cut and suffixed with a hash of the full name


class SweepError(ValueError):
  """A malformed sweep definition (bad factor, clashing fields, unknown config field...)."""


def _points(factor, combine) -> list[dict]:
  """A factor as a list of points; dict factors are combined with ``combine`` over their fields."""
  if isinstance(factor, dict):
    for key, values in factor.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f"sweep field {key!r}: expected a non-empty list of values, got {values!r}")
    return [dict(zip(factor, vs)) for vs in combine(*factor.values())]
  if isinstance(factor, (list, tuple)) and all(isinstance(p, dict) for p in factor):
    return [dict(p) for p in factor]
  raise SweepError(f"sweep factor {factor!r}: expected a dict of field -> values or a list of dicts")


def _merge(parts: tuple[dict, ...]) -> dict:
  out = {}
  for part in parts:
    clash = set(out) & set(part)
    if clash:
      raise SweepError(f"sweep fields {sorted(clash)} are set by two factors; each field may vary in one")
    out.update(part)
  return out


def _strict_zip(*lists):
  if len({len(x) for x in lists}) > 1:
    raise SweepError(f"zip_: factors have different lengths {[len(x) for x in lists]}; they must be equal")
  return zip(*lists)


def product(*factors, **fields) -> list[dict]:
  """Cartesian product of the factors (keyword arguments are one more dict factor); the last
  field varies fastest."""
  factors = factors + ((fields,) if fields else ())
  lists = [_points(f, itertools.product) for f in factors]
  return [_merge(parts) for parts in itertools.product(*lists)]


def zip_(*factors, **fields) -> list[dict]:
  """Element-wise combination of equally long factors (keyword arguments: one more dict factor)."""
  factors = factors + ((fields,) if fields else ())
  lists = [_points(f, _strict_zip) for f in factors]
  return [_merge(parts) for parts in _strict_zip(*lists)]


def format_value(value) -> str:
  """A value as it appears in point names and labels: ``0.6``, ``siglip``, ``true``, ``0.2-1.0``."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return "-".join(format_value(v) for v in value)
  if isinstance(value, float):
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.0e}"
  return str(value)


def short_keys(keys) -> dict[str, str]:
  """Each dotted field -> its shortest dotted suffix that is unique among ``keys``."""
  keys = list(dict.fromkeys(keys))
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
        break
    out[key] = suffix
  return out


def point_name(point: dict, keys=None) -> str:
  """Stable, file-system safe name of a point, e.g. ``mask_ratio=0.6,decoder_depth=2``.

  ``keys``: every field of the sweep (shortened consistently across points); default the point's.
  """
  short = short_keys(keys if keys is not None else point)
  return safe_name(",".join(f"{short[k]}={format_value(v)}" for k, v in point.items()) or "default")


def safe_name(text: str) -> str:
  """``text`` with characters outside ``[A-Za-z0-9._=,+-]`` replaced by ``_``; names over
  ``MAX_NAME`` characters are cut and suffixed with a hash of the full text (stable, unique)."""
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
  if len(name) > MAX_NAME:
    name = f"{name[:MAX_NAME - 11]}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
  return name


def base_arg(base: str, overrides: dict) -> str:
  """``"configs/mae.py:tiny"`` + ``{"total_steps": 4}`` -> ``"configs/mae.py:tiny,total_steps=4"``:
  how a sweep file passes its own ``VARIANT,k=v`` overrides on to its base config."""
  parts = []
  for key, value in overrides.items():
    if isinstance(value, (list, tuple, dict)) or (isinstance(value, str) and "," in value):
      raise SweepError(f"sweep argument {key}={value!r}: values with commas cannot be passed on; "
                       f"use --config.{key}=... on a single run or a point field instead")
    parts.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
  return ",".join([base, *parts])
