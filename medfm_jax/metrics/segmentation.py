"""Segmentation metrics per structure: Dice, IoU and the 95th-percentile Hausdorff distance (3-D).

Both take integer label maps ``[D, H, W]`` (prediction and reference) and a class index; a class
absent from both maps gives NaN (left out of means). HD95 follows MONAI's
``compute_hausdorff_distance(percentile=95)``: surface voxels are those of the mask with a
6-connected neighbour outside it; the directed distances (in mm, with the voxel ``spacing``) from
each surface to the other mask's surface are taken at their 95th percentile and the larger of the
two directions is reported; a class present in only one of the maps gives ``inf``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def dice(pred: np.ndarray, target: np.ndarray, cls: int) -> float:
  """``2 |P & T| / (|P| + |T|)`` of class ``cls`` (NaN when absent from both)."""
  p, t = pred == cls, target == cls
  denom = int(p.sum()) + int(t.sum())
  return float("nan") if denom == 0 else 2.0 * float((p & t).sum()) / denom


def iou(pred: np.ndarray, target: np.ndarray, cls: int) -> float:
  """``|P & T| / |P | T|`` of class ``cls`` (NaN when absent from both)."""
  p, t = pred == cls, target == cls
  union = int((p | t).sum())
  return float("nan") if union == 0 else float((p & t).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  (heavy; most processes need no 3D metric)
  return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray, cls: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
  """95th-percentile symmetric Hausdorff distance (mm) of class ``cls``."""
  p, t = pred == cls, target == cls
  if not p.any() and not t.any():
    return float("nan")
  if not p.any() or not t.any():
    return float("inf")
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  (heavy; most processes need no 3D metric)
  sp, st = _surface(p), _surface(t)
  to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
  to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
  return float(max(np.percentile(to_t[sp], 95), np.percentile(to_p[st], 95)))


def per_structure(pred: np.ndarray, target: np.ndarray, names: Sequence[str],
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, dict[str, float]]:
  """``{name: {'dice', 'hd95'}}`` for every class but 0 (background)."""
  return {name: {"dice": dice(pred, target, c), "hd95": hd95(pred, target, c, spacing)}
          for c, name in enumerate(names) if c > 0}
