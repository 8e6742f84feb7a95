"""Block-wise patch masks for iBOT / DINOv2 (the BEiT masking generator), per example in numpy.

DINOv2's collator masks exactly ``int(mask_probability * n)`` of the ``n`` global crops of a batch,
with ratios stratified over ``[r_min, r_max]``. Here each global crop decides on its own (masked
with probability ``probability``, ratio uniform in ``[r_min, r_max]``): the same marginal
distribution, but computed in the grain workers per example, so masks depend only on the example
seed (not on the batch, the process count or the mesh) and the iterator stays checkpointable.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PatchMaskSpec:
  """``grid`` patches per side; DINOv2 defaults (probability 0.5, ratio 0.1-0.5, blocks >= 4
  patches, aspect 0.3-3.3, at most half of the patches in one block)."""
  grid: int
  probability: float = 0.5
  ratio: tuple[float, float] = (0.1, 0.5)
  min_block: int = 4
  min_aspect: float = 0.3

  @classmethod
  def from_config(cls, cfg, global_size: int) -> "PatchMaskSpec":
    """From ``data.patch_masks`` (patch_size, probability, ratio) and the global crop size."""
    patch = int(cfg.patch_size)
    if patch <= 0 or global_size % patch:
      raise ValueError(f"data.patch_masks.patch_size={patch} must divide the global crop size "
                       f"{global_size}")
    lo, hi = (float(r) for r in cfg.ratio)
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"data.patch_masks.ratio={tuple(cfg.ratio)} must satisfy 0 <= lo <= hi <= 1")
    if not 0.0 <= float(cfg.probability) <= 1.0:
      raise ValueError(f"data.patch_masks.probability={cfg.probability} must be in [0, 1]")
    return cls(global_size // patch, float(cfg.probability), (lo, hi))

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


def _add_block(mask: np.ndarray, rng: np.random.Generator, budget: int, min_block: int,
               log_aspect: tuple[float, float]) -> int:
  """Masks one random rectangle of at most ``budget`` new patches; returns how many it added."""
  h_grid, w_grid = mask.shape
  for _ in range(10):
    area = min_block + (budget - min_block) * rng.random()   # budget may be < min_block
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if w < w_grid and h < h_grid:
      top = int(rng.integers(0, h_grid - h + 1))
      left = int(rng.integers(0, w_grid - w + 1))
      window = mask[top:top + h, left:left + w]
      new = h * w - int(window.sum())
      if 0 < new <= budget:
        window[...] = True
        return new
  return 0


def block_mask(rng: np.random.Generator, grid: int, num_masked: int, min_block: int = 4,
               min_aspect: float = 0.3, max_block: int | None = None) -> np.ndarray:
  """``[grid*grid]`` bool mask of about ``num_masked`` patches made of rectangles (never more).

  Rectangles of area ``U(min_block, remaining)`` and aspect ``exp(U(log a, -log a))`` are added
  until the count is reached or ten placements in a row fail; ``max_block`` caps one rectangle
  (DINOv2: half of the patches).
  """
  mask = np.zeros((grid, grid), bool)
  max_block = max_block or (grid * grid) // 2
  log_aspect = (math.log(min_aspect), -math.log(min_aspect))
  count = 0
  while count < num_masked:
    added = _add_block(mask, rng, min(num_masked - count, max_block), min_block, log_aspect)
    if added == 0:
      break
    count += added
  return mask.reshape(-1)


def view_masks(rng: np.random.Generator, spec: PatchMaskSpec, num_views: int) -> np.ndarray:
  """``[num_views, grid*grid]`` masks for one example's global crops: each view is masked with
  probability ``spec.probability``, then by a ``U(spec.ratio)`` fraction of its patches."""
  out = np.zeros((num_views, spec.num_patches), bool)
  for v in range(num_views):
    if rng.uniform() < spec.probability:
      n = int(spec.num_patches * rng.uniform(*spec.ratio))
      out[v] = block_mask(rng, spec.grid, n, spec.min_block, spec.min_aspect)
  return out
