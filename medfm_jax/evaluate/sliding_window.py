"""Sliding-window inference over volumes with overlapping windows blended by a Gaussian (or flat)
importance map: the window grid, padding and weights of MONAI's ``sliding_window_inference``
(parity tested to 1e-5 in ``tests/interop/test_monai_parity.py``).

Windows of ``roi`` start every ``int(roi * (1 - overlap))`` voxels per axis (the whole axis when the
roi covers it), the last one shifted back to end at the border; volumes smaller than the roi are
zero-padded symmetrically first and the padding is cropped from the result. Each window's
prediction is weighted by ``exp(-x^2 / (2 (sigma_scale * roi)^2))`` per axis (x from the window
centre; weights clamped below at ``max(min weight, 1e-3)``) and the weighted sum is divided by the
summed weights.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

BLEND_MODES = ("gaussian", "constant")


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
  """Per-voxel window weights ``[*roi]`` float32."""
  if mode == "constant":
    return np.ones(tuple(roi), np.float32)
  if mode != "gaussian":
    raise ValueError(f"sliding window mode={mode!r}: allowed {BLEND_MODES}")
  weights = None
  for n in roi:
    x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
    g = np.exp(x ** 2 / np.float32(-2 * (n * sigma_scale) ** 2)).astype(np.float32)
    weights = g if weights is None else weights[..., None] * g
  return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
  """Start indices of the windows along one axis (``size >= roi``)."""
  step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
  num = math.ceil(size / step)
  count = next((d + 1 for d in range(num) if d * step + roi >= size), 1)
  return [i * step - max(i * step + roi - size, 0) for i in range(count)]


def sliding_window_inference(volumes, roi: Sequence[int], predictor: Callable, overlap: float = 0.5,
                             mode: str = "gaussian", sigma_scale: float = 0.125,
                             batch_size: int = 4) -> np.ndarray:
  """``volumes [b, D, H, W, c]`` -> blended predictions ``[b, D, H, W, k]`` float32, running
  ``predictor`` (``[n, *roi, c] -> [n, *roi, k]``, e.g. a jitted model apply) on batches of up to
  ``batch_size`` windows (the last batch is padded to ``batch_size`` by repeating a window, so a
  jitted predictor compiles once)."""
  volumes = np.asarray(volumes, np.float32)
  roi = tuple(int(r) for r in roi)
  if not 0 <= overlap < 1:
    raise ValueError(f"sliding window overlap={overlap}: allowed [0, 1)")
  spatial = volumes.shape[1:4]
  pads = [max(r - s, 0) for r, s in zip(roi, spatial)]
  if any(pads):
    volumes = np.pad(volumes, [(0, 0)] + [(p // 2, p - p // 2) for p in pads] + [(0, 0)])
  size = volumes.shape[1:4]
  starts = np.stack(np.meshgrid(*[window_starts(s, r, overlap) for s, r in zip(size, roi)],
                                indexing="ij"), -1).reshape(-1, 3)
  jobs = [(b, tuple(s)) for b in range(volumes.shape[0]) for s in starts]
  weights = importance_map(roi, mode, sigma_scale)[..., None]
  out = count = None
  for i in range(0, len(jobs), batch_size):
    chunk = jobs[i:i + batch_size]
    windows = [volumes[b, z:z + roi[0], y:y + roi[1], x:x + roi[2]] for b, (z, y, x) in chunk]
    windows += [windows[-1]] * (batch_size - len(windows))
    preds = np.asarray(predictor(np.stack(windows)), np.float32)
    if out is None:
      out = np.zeros((*volumes.shape[:4], preds.shape[-1]), np.float32)
      count = np.zeros((*volumes.shape[:4], 1), np.float32)
    for (b, (z, y, x)), p in zip(chunk, preds):
      out[b, z:z + roi[0], y:y + roi[1], x:x + roi[2]] += p * weights
      count[b, z:z + roi[0], y:y + roi[1], x:x + roi[2]] += weights
  out /= count
  crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
  return out[(slice(None), *crop)]
