"""Segmentation examples with SAM prompts, made in the input workers (numpy only).

A record with masks (phantoms with ``masks=True``: ``masks`` [H, W, 3] per
:data:`~medfm_jax.data.phantoms.MASK_CLASSES` and ``lesion_ids`` [H, W]) becomes one target: a class
is drawn from ``classes`` among those present (a lesion instance at random when the class is
'lesion'), then its prompts:

- a box around the target, each side pushed out by a random 0..``jitter`` pixels (MedSAM: up to
  20 px at 1024 px; ``jitter`` is given at 1024 px and scaled to the image size);
- ``num_points`` points drawn uniformly inside the target (label 1) and ``num_neg_points`` outside
  it (label 0), as pixel coordinates ``(x, y)``.

Correction points from the error region of a prediction are drawn on the device, in the
objective's interaction rounds (:func:`medfm_jax.objectives.sam.correction_points`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from medfm_jax.data import phantoms


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """``config.data.segment``: targets and prompts of segmentation examples."""
  classes: tuple[str, ...] = ("lesion",)
  jitter: float = 20.0          # max box expansion per side, in pixels at 1024 px
  num_points: int = 1
  num_neg_points: int = 0
  train_examples: int = 0       # few-shot: train on the first N images of the train split (0 = all)

  @classmethod
  def from_config(cls, raw) -> "PromptSpec":
    raw = dict(raw or {})
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"data.segment has unknown fields {sorted(unknown)}; allowed: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    spec = cls(classes=tuple(raw.get("classes", cls.classes)), jitter=float(raw.get("jitter", cls.jitter)),
               num_points=int(raw.get("num_points", cls.num_points)),
               num_neg_points=int(raw.get("num_neg_points", cls.num_neg_points)),
               train_examples=int(raw.get("train_examples", cls.train_examples) or 0))
    bad = [c for c in spec.classes if c not in phantoms.MASK_CLASSES]
    if bad or not spec.classes:
      raise ValueError(f"data.segment.classes={spec.classes}: each must be one of {phantoms.MASK_CLASSES}")
    if spec.jitter < 0 or spec.num_points < 0 or spec.num_neg_points < 0:
      raise ValueError("data.segment.jitter, num_points and num_neg_points must be >= 0")
    if spec.train_examples < 0:
      raise ValueError(f"data.segment.train_examples={spec.train_examples}: must be >= 0 (0 = the whole train split)")
    return spec

  @property
  def num_prompt_points(self) -> int:
    return self.num_points + self.num_neg_points


def box_from_mask(mask: np.ndarray, rng: np.random.Generator, jitter_px: int) -> np.ndarray:
  """``(x0, y0, x1, y1)`` float32 pixel box of the nonzero pixels of ``mask [H, W]``, each side
  moved outwards by a random ``0..jitter_px`` pixels and clipped to the image (MedSAM's rule)."""
  h, w = mask.shape
  ys, xs = np.nonzero(mask)
  if not len(xs):
    raise ValueError("box_from_mask: empty mask")
  shift = rng.integers(0, int(jitter_px) + 1, 4)
  return np.array([max(xs.min() - shift[0], 0), max(ys.min() - shift[1], 0),
                   min(xs.max() + shift[2], w - 1), min(ys.max() + shift[3], h - 1)], np.float32)


def sample_points(mask: np.ndarray, rng: np.random.Generator, num_pos: int, num_neg: int):
  """``(points float32 [num_pos + num_neg, 2] as (x, y), labels int32)``: uniform pixels inside
  ``mask`` (label 1) then outside it (label 0); a side without pixels repeats the other's first."""
  inside = np.flatnonzero(mask.reshape(-1))
  outside = np.flatnonzero(mask.reshape(-1) == 0)
  pick = lambda pool, n: rng.choice(pool, n) if len(pool) else np.full(n, inside[0] if len(inside) else 0)
  flat = np.concatenate([pick(inside, num_pos), pick(outside, num_neg)]).astype(np.int64)
  w = mask.shape[1]
  points = np.stack([flat % w, flat // w], axis=-1).astype(np.float32)
  return points, np.array([1] * num_pos + [0] * num_neg, np.int32)


def choose_target(record: dict, rng: np.random.Generator, classes: tuple[str, ...]) -> tuple[np.ndarray, int]:
  """``(binary mask uint8 [H, W], class index into MASK_CLASSES)``: a random class of ``classes``
  present in the record (a random lesion instance for 'lesion'); the body when none is present."""
  masks = record["masks"]
  present = [phantoms.MASK_CLASSES.index(c) for c in classes if masks[..., phantoms.MASK_CLASSES.index(c)].any()]
  if not present:
    present = [phantoms.MASK_CLASSES.index("body")]
  k = int(present[rng.integers(len(present))])
  if phantoms.MASK_CLASSES[k] == "lesion" and "lesion_ids" in record:
    ids = np.unique(record["lesion_ids"])
    ids = ids[ids > 0]
    return (record["lesion_ids"] == ids[rng.integers(len(ids))]).astype(np.uint8), k
  return masks[..., k].astype(np.uint8), k


def make_example(record: dict, rng: np.random.Generator, spec: PromptSpec, image_size: int) -> dict[str, np.ndarray]:
  """``target`` float32 [H, W] (0/1), ``target_class`` int32, ``box`` float32 [4], ``points``
  float32 [P, 2], ``point_labels`` int32 [P] of a record whose masks are at ``image_size``."""
  target, k = choose_target(record, rng, spec.classes)
  jitter = int(round(spec.jitter * image_size / 1024))
  points, labels = sample_points(target, rng, spec.num_points, spec.num_neg_points)
  return {"target": target.astype(np.float32), "target_class": np.int32(k),
          "box": box_from_mask(target, rng, jitter), "points": points, "point_labels": labels}
