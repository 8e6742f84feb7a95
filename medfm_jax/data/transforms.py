"""Per-record numpy image transforms (run inside grain workers).

Images are ``[H, W, C]`` arrays (uint8 or float). Resizing is separable
bilinear interpolation with a triangle filter widened when downscaling
(antialiasing, as PIL's ``BILINEAR``), done as two small matmuls.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _resize_matrix(in_size: int, out_size: int, start: float = 0.0,
                   length: float | None = None) -> np.ndarray:
  """[out_size, in_size] weights resampling source window [start, start+length)."""
  length = float(in_size if length is None else length)
  step = length / out_size
  support = max(step, 1.0)  # widen the triangle filter when downscaling
  centres = start + (np.arange(out_size) + 0.5) * step - 0.5   # in source pixel units
  src = np.arange(in_size)
  w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
  # Crop-then-resize semantics: never read pixels outside the window.
  w[:, (src < math.floor(start)) | (src >= math.ceil(start + length))] = 0.0
  total = w.sum(axis=1, keepdims=True)
  # Windows entirely outside the image (cannot happen for valid crops) fall
  # back to the nearest pixel.
  empty = total[:, 0] == 0
  if empty.any():
    w[empty, np.clip(np.rint(centres[empty]).astype(int), 0, in_size - 1)] = 1.0
    total = w.sum(axis=1, keepdims=True)
  return (w / total).astype(np.float32)


def _resample(image: np.ndarray, out_size: int,
              box: tuple[float, float, float, float]) -> np.ndarray:
  """Resizes the window ``box = (top, left, height, width)`` to ``out_size``^2."""
  top, left, h, w = box
  wy = _resize_matrix(image.shape[0], out_size, top, h)
  wx = _resize_matrix(image.shape[1], out_size, left, w)
  x = image.astype(np.float32)
  out = np.tensordot(wy, x, axes=(1, 0))                            # [out, W, C]
  out = np.tensordot(wx, out, axes=(1, 1)).transpose(1, 0, 2)       # [out, out, C]
  if image.dtype == np.uint8:
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
  return out.astype(image.dtype, copy=False)


def crop_box(height: int, width: int, rng: np.random.Generator,
             scale: Sequence[float] = (0.2, 1.0),
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: central crop with the aspect ratio clamped into ``ratio``.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, out_size: int,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Random area/aspect crop resized to ``[out_size, out_size, C]`` (same dtype)."""
  box = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return _resample(image, out_size, box)


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal flip with probability ``p`` (note: swaps caption left/right)."""
  return image[:, ::-1] if rng.random() < p else image


def center_resize(image: np.ndarray, out_size: int) -> np.ndarray:
  """Central square crop resized to ``[out_size, out_size, C]`` (eval transform)."""
  h, w = image.shape[:2]
  side = min(h, w)
  if h == w == out_size:
    return image
  return _resample(image, out_size, ((h - side) / 2, (w - side) / 2, side, side))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., C] -> float32 ``(x / 255 - mean) / std``; mean/std of length 1 or C."""
  channels = image.shape[-1]
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  for name, v in (("mean", mean), ("std", std)):
    if v.size not in (1, channels):
      raise ValueError(f"data.{name} has {v.size} values; expected 1 or {channels} "
                       "(one per channel)")
  scale = 1.0 / (255.0 * std)
  return image.astype(np.float32) * scale - mean / std
