"""Sweep files: ``configs/sweeps/NAME.py`` defines ``get_sweep(arg)``.

``get_sweep(arg)`` (``arg`` is what follows ``:`` in ``--config=configs/sweeps/NAME.py:VARIANT``)
returns either

* ``{"base": "configs/mae.py:tiny", "points": [override dicts]}``, or
* a list of override dicts, the base being the module-level ``BASE`` string.

The base is a training config (``python -m medfm_jax.main``) or an evaluation config under
``configs/eval/`` (it has a ``protocol`` field; points then run ``python -m medfm_jax.evaluate``).
Every point's fields are checked against the base config before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os

from medfm_jax.sweeps import grid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Sweep:
  source: str          # "configs/sweeps/NAME.py:VARIANT"
  base: str            # "configs/mae.py:tiny" (path resolvable from the cwd)
  kind: str            # 'train' | 'eval'
  points: list[dict]


def resolve_path(path: str) -> str:
  """``path`` as given when it exists from the cwd, else relative to the repository root."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  in_repo = os.path.join(REPO, path)
  return in_repo if os.path.exists(in_repo) else path


def _load_module(path: str, what: str):
  resolved = resolve_path(path)
  if not os.path.isfile(resolved):
    raise grid.SweepError(f"{what} {path!r} does not exist (paths are relative to the cwd or the repo root)")
  spec = importlib.util.spec_from_file_location(f"_medfm_cfg_{abs(hash(resolved))}", resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _split(config_arg: str) -> tuple[str, str | None]:
  path, _, arg = config_arg.partition(":")
  return path, (arg or None)


def load_config(config_arg: str):
  """The ConfigDict of ``"configs/X.py[:ARG]"`` (as ``--config=`` would build it)."""
  path, arg = _split(config_arg)
  module = _load_module(path, "config file")
  if not hasattr(module, "get_config"):
    raise grid.SweepError(f"config file {path!r} has no get_config(arg)")
  try:
    return module.get_config(arg)
  except ValueError as e:
    raise grid.SweepError(f"config {config_arg!r}: {e}") from None


def check_overrides(config, overrides: dict, where: str) -> None:
  """Applies ``overrides`` to a copy of ``config``: unknown fields or wrong types -> SweepError."""
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    try:
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      kind = "unknown field" if isinstance(e, (KeyError, AttributeError)) else f"bad value {value!r} ({e})"
      raise grid.SweepError(f"{where}: {key!r}: {kind}") from None


def load(config_arg: str) -> Sweep:
  """Loads and checks a sweep file; every point is applied to its base config."""
  path, arg = _split(config_arg)
  module = _load_module(path, "sweep file")
  if not hasattr(module, "get_sweep"):
    raise grid.SweepError(f"sweep file {path!r} has no get_sweep(arg)")
  try:
    out = module.get_sweep(arg)
  except ValueError as e:
    raise grid.SweepError(f"sweep {config_arg!r}: {e}") from None
  if isinstance(out, dict):
    if set(out) - {"base", "points"} or "base" not in out or "points" not in out:
      raise grid.SweepError(f"sweep {config_arg!r}: get_sweep must return {{'base': ..., 'points': [...]}} "
                            f"or a list of dicts with a module-level BASE; got keys {sorted(out)}")
    base, points = out["base"], out["points"]
  else:
    base, points = getattr(module, "BASE", None), out
    if not isinstance(base, str):
      raise grid.SweepError(f"sweep {config_arg!r}: get_sweep returned a list but the file defines no BASE string")
  if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
    raise grid.SweepError(f"sweep {config_arg!r}: points must be a non-empty list of override dicts")
  config = load_config(base)
  names = [grid.point_name(p, [k for q in points for k in q]) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise grid.SweepError(f"sweep {config_arg!r}: points repeat: {dupes}")
  for i, p in enumerate(points):
    check_overrides(config, p, f"sweep {config_arg!r} point {i} ({names[i]})")
  kind = "eval" if "protocol" in config else "train"
  return Sweep(source=config_arg, base=base, kind=kind, points=points)
