"""Embedded procedural medical-like dataset: no files, no network.

Four modalities (abdominal CT slice, brain MRI, chest X-ray, H&E histology) and
six findings (none, single / multiple / elongated lesion, calcification,
ring-enhancing lesion), each record with a one-sentence caption. Every image is
drawn from its own RNG seeded by ``(seed, split, index)``, so a record is the
same on every call, process and machine, and splits never share images.

Shapes are soft-edged ellipses evaluated all at once as quadratic forms over a
cached coordinate grid (one matmul), so images render at any resolution
directly; anatomy is varied per image by a random affine transform, per-shape
jitter, contrast (e.g. T1 vs T2 MRI), gamma, bias field and noise, so that
findings are visible but not linearly separable on raw pixels.

Coordinates are normalised to [-1, 1], x to the right and y downwards; caption
locations ("upper left", ...) refer to image coordinates.
"""
from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np

MODALITIES = ("ct", "mri", "cxr", "histology")
FINDINGS = ("none", "single_lesion", "multiple_lesions", "elongated_lesion",
            "calcification", "ring_enhancing")
SPLITS = {"train": 0, "val": 1, "test": 2}
# Binary masks of ``render_phantom(..., with_masks=True)`` (channels of ``masks``): every lesion of
# the finding; the body outline (CT body, MRI head, CXR thorax, histology tissue without lumens);
# one organ per modality (CT liver, MRI brain, CXR lungs, histology nuclei).
MASK_CLASSES = ("lesion", "body", "organ")
SPLIT_SIZES = {"train": 100_000, "val": 2_000, "test": 2_000}
# Labels every record carries besides modality / finding, read off its rendered lesion mask
# (:func:`lesion_labels`); -1 = not defined for the record (no lesion), dropped by the evaluations.
LESION_LABELS = {
    "lesion_present": ("absent", "present"),
    "lesion_location": ("upper left", "upper right", "lower left", "lower right"),
    "lesion_size": ("small", "medium", "large"),
}
# lesion_size: total lesion area as a fraction of the image; the terciles at 32 px (test split).
SIZE_CUTS = (0.007, 0.012)

MODALITY_NAMES = {"ct": "Abdominal CT", "mri": "Brain MRI", "cxr": "Chest X-ray",
                  "histology": "H&E histology patch"}
_LOCATIONS = (("upper left", "upper middle", "upper right"),
              ("middle left", "center", "middle right"),
              ("lower left", "lower middle", "lower right"))
# Optical densities (R, G, B) of haematoxylin and eosin (Ruifrok & Johnston).
_OD_H = np.array([0.65, 0.70, 0.29], np.float32)
_OD_E = np.array([0.07, 0.99, 0.11], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------
# Geometry.


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns ([6, size*size] monomials x^2, xy, y^2, x, y, 1; [size] centres)."""
  c = ((np.arange(size, dtype=np.float32) * 2 + 1) / size - 1).astype(np.float32)
  y, x = np.meshgrid(c, c, indexing="ij")
  x, y = x.ravel(), y.ravel()
  grid = np.stack([x * x, x * y, y * y, x, y, np.ones_like(x)]).astype(np.float32)
  grid.setflags(write=False)
  c.setflags(write=False)
  return grid, c


@functools.lru_cache(maxsize=32)
def _smooth_basis(size: int, n: int = 6) -> np.ndarray:
  """[size, n] Gaussian RBF basis: B @ G @ B.T is a smooth random field."""
  _, c = _grid(size)
  mu = np.linspace(-1.2, 1.2, n, dtype=np.float32)
  b = np.exp(-((c[:, None] - mu[None, :]) ** 2) / (2 * 0.35 ** 2))
  b /= b.sum(axis=1, keepdims=True)
  b = (b * np.sqrt(n / 2)).astype(np.float32)  # field std ~ 1
  b.setflags(write=False)
  return b


class _Shapes:
  """Accumulates ellipses (cx, cy, a, b, theta) with per-map intensity deltas.

  ``tag`` names the mask an ellipse belongs to ("body", "organ", "-body" to cut it out of the body,
  or the lesion instance number); it does not change the image.
  """

  def __init__(self, num_maps: int = 1):
    self.num_maps = num_maps
    self.rows: list[tuple[float, ...]] = []  # cx, cy, a, b, theta, *values
    self.tags: list[str | int | None] = []

  def add(self, cx, cy, a, b, theta, value, tag: str | int | None = None) -> None:
    value = tuple(value) if isinstance(value, tuple) else (value,) * self.num_maps
    self.rows.append((cx, cy, a, b, theta, *value))
    self.tags.append(tag)


def _render_shapes(anatomy: _Shapes, lesions: _Shapes, affine: np.ndarray, shift: np.ndarray,
                   size: int, return_masks: bool = False):
  """Sums soft-edged ellipse masks times their values -> [num_maps, size*size] (and, with
  ``return_masks``, each ellipse's soft mask [n, size*size]).

  ``anatomy`` is mapped by ``x -> affine @ x + shift``; ``lesions`` are in
  image coordinates already. Each ellipse is the quadratic form
  ``(p - c)^T M (p - c) <= 1`` with ``M = R diag(a^-2, b^-2) R^T``, evaluated
  over the grid monomials in one matmul.
  """
  n_anat = len(anatomy.rows)
  rows = np.array(anatomy.rows + lesions.rows, np.float64)           # [n, 5 + maps]
  cx, cy, a, b, th = rows[:, :5].T
  cos, sin = np.cos(th), np.sin(th)
  ia, ib = 1 / (a * a), 1 / (b * b)
  m = np.empty((len(rows), 2, 2))
  m[:, 0, 0] = ia * cos * cos + ib * sin * sin
  m[:, 0, 1] = m[:, 1, 0] = (ia - ib) * cos * sin
  m[:, 1, 1] = ia * sin * sin + ib * cos * cos
  centre = rows[:, :2].copy()
  inv = np.linalg.inv(affine)
  m[:n_anat] = inv.T @ m[:n_anat] @ inv                              # A^-T M A^-1
  centre[:n_anat] = centre[:n_anat] @ affine.T + shift
  m11, m12, m22 = m[:, 0, 0], m[:, 0, 1], m[:, 1, 1]
  x0, y0 = centre[:, 0], centre[:, 1]
  coeffs = np.empty((len(rows), 6), np.float32)
  coeffs[:, 0], coeffs[:, 1], coeffs[:, 2] = m11, 2 * m12, m22
  coeffs[:, 3] = -2 * (m11 * x0 + m12 * y0)
  coeffs[:, 4] = -2 * (m12 * x0 + m22 * y0)
  coeffs[:, 5] = m11 * x0 * x0 + 2 * m12 * x0 * y0 + m22 * y0 * y0
  half_tr = (m11 + m22) / 2
  max_eig = half_tr + np.sqrt(np.maximum(half_tr ** 2 - (m11 * m22 - m12 ** 2), 0))
  # Edge ramp about half a pixel wide; sub-pixel shapes fade instead of vanishing.
  sharp = np.maximum(size / 2 / np.sqrt(max_eig), 1.0).astype(np.float32)
  grid, _ = _grid(size)
  masks = 1 - coeffs @ grid
  masks *= sharp[:, None]
  np.clip(masks, 0, 1, out=masks)
  maps = rows[:, 5:].T.astype(np.float32) @ masks
  return (maps, masks) if return_masks else maps


def _sample_in(rng: np.random.Generator, region: tuple[float, float, float, float]) -> np.ndarray:
  """Uniform point inside the ellipse (cx, cy, a, b), kept off its rim."""
  cx, cy, a, b = region
  r = 0.85 * np.sqrt(rng.random())
  phi = rng.uniform(0, 2 * np.pi)
  return np.array([cx + a * r * np.cos(phi), cy + b * r * np.sin(phi)])


# ----------------------------------------------------------------------------
# Anatomy. Each returns (shapes, lesion regions (canonical frame), lesion sign
# probability of being brighter than the tissue).


def _ct(rng: np.random.Generator):
  s = _Shapes()
  u = rng.uniform
  a, b = u(0.78, 0.92), u(0.55, 0.7)
  fat = u(0.04, 0.11)
  v_fat = u(0.22, 0.34)
  s.add(0, 0.02, a, b, 0, v_fat, tag="body")                       # body (fat)
  s.add(0, 0.02, a - fat, b - fat, 0, u(0.2, 0.3))                  # muscle / viscera
  s.add(-0.38 + u(-.05, .05), -0.12 + u(-.05, .05), u(.25, .34), u(.19, .27),
        u(-0.4, 0.1), u(0.04, 0.12), tag="organ")                   # liver
  s.add(0.45 + u(-.04, .04), -0.1 + u(-.05, .05), u(.1, .16), u(.07, .11),
        u(0.3, 0.9), u(0.03, 0.09))                                 # spleen
  kv = u(0.07, 0.15)
  for side in (-1, 1):                                              # kidneys
    s.add(side * 0.33 + u(-.03, .03), 0.28 + u(-.03, .03), u(.08, .11), u(.05, .07),
          side * u(0.6, 1.1), kv)
  for _ in range(rng.integers(1, 5)):                               # bowel gas
    p = _sample_in(rng, (0.1, -0.05, 0.35, 0.25))
    r = u(0.03, 0.08)
    s.add(p[0], p[1], r, r * u(0.6, 1.0), u(0, np.pi), -u(0.35, 0.5))
  bone = u(0.3, 0.45)
  s.add(0, 0.38, u(.09, .12), u(.075, .095), 0, bone)               # vertebral body
  s.add(0, 0.53, 0.07, 0.055, 0, bone * 0.8)                        # posterior arch
  s.add(0, 0.53, 0.033, 0.028, 0, -bone * 0.8 - 0.1)                # spinal canal
  s.add(0.06, 0.22, 0.045, 0.045, 0, u(0.05, 0.2))                  # aorta
  s.add(-0.09, 0.2, 0.05, 0.035, 0, u(0.03, 0.12))                  # IVC
  regions = [(0.0, -0.05, a - fat - 0.2, b - fat - 0.25)]
  return s, regions, 0.35


def _mri(rng: np.random.Generator):
  s = _Shapes()
  u = rng.uniform
  if rng.random() < 0.5:   # T1-like: CSF dark, white matter bright
    scalp, skull, csf, gm, wm = u(.45, .6), u(.05, .12), u(.08, .18), u(.4, .5), u(.6, .7)
  else:                    # T2-like: CSF bright, white matter darker than gray
    scalp, skull, csf, gm, wm = u(.35, .5), u(.04, .1), u(.8, .95), u(.5, .6), u(.33, .43)
  a, b = u(0.64, 0.76), u(0.8, 0.92)
  t1, t2, t3 = u(.04, .06), u(.07, .09), u(.095, .115)
  s.add(0, 0, a, b, 0, scalp, tag="body")                             # head
  s.add(0, 0, a - t1, b - t1, 0, skull - scalp)
  s.add(0, 0, a - t2, b - t2, 0, csf - skull)
  s.add(0, 0, a - t3, b - t3, 0, gm - csf, tag="organ")               # brain
  ia, ib = a - t3, b - t3
  for side in (-1, 1):
    s.add(side * ia * 0.52, 0.02, ia * u(.38, .44), ib * u(.68, .76), side * u(-.08, .08), wm - gm)
    s.add(side * u(.06, .08), -0.05, u(.03, .05), u(.13, .19), side * u(.15, .35), csf - wm)
    s.add(side * 0.17, 0.12, u(.05, .07), u(.07, .1), 0, (gm - wm) * 0.7)  # basal ganglia
  s.add(0, 0, 0.012, ib - 0.04, 0, csf - gm)                          # falx
  regions = [(side * ia * 0.5, 0.0, ia * 0.35, ib * 0.6) for side in (-1, 1)]
  return s, regions, 0.5


def _cxr(rng: np.random.Generator):
  s = _Shapes()
  u = rng.uniform
  s.add(0, 0.1, u(0.9, 1.0), 1.15, 0, u(0.35, 0.45), tag="body")     # thorax soft tissue
  s.add(0, 0.97, 0.95, u(0.3, 0.4), 0, u(0.1, 0.2))                 # abdomen below diaphragm
  lung_v = -u(0.2, 0.3)
  la, lb = u(0.23, 0.3), u(0.48, 0.6)
  regions = []
  for side in (-1, 1):
    cx, cy = side * u(0.36, 0.42), -0.05 + u(-0.04, 0.04)
    s.add(cx, cy, la, lb, -side * u(0.04, 0.12), lung_v, tag="organ")      # lungs
    regions.append((cx, cy, la * 0.8, lb * 0.8))
  s.add(0, 0, u(.08, .11), 0.95, 0, u(0.1, 0.18))                   # spine / mediastinum
  s.add(0.1 + u(-.05, .05), 0.3 + u(-.04, .04), u(.26, .34), u(.2, .26),
        -u(0.2, 0.4), u(0.18, 0.3))                                 # heart
  rib_v, rib_w, tilt = u(0.05, 0.11), u(0.014, 0.024), u(0.15, 0.35)
  for side in (-1, 1):
    for i in range(6):                                              # posterior ribs
      s.add(side * 0.36, -0.6 + 0.19 * i + u(-.02, .02), 0.33, rib_w, side * tilt, rib_v)
    s.add(side * 0.3, -0.7, 0.28, 0.028, -side * 0.2, rib_v * 1.3)   # clavicle
  return s, regions, 0.8


def _histology(rng: np.random.Generator):
  s = _Shapes(num_maps=2)  # (haematoxylin, eosin) stain concentrations
  u = rng.uniform
  e_base = u(0.7, 1.3)
  s.add(0, 0, 3.0, 3.0, 0, (0.0, e_base), tag="body")               # stroma everywhere
  for _ in range(rng.integers(0, 4)):                               # lumens / fat
    p = rng.uniform(-1, 1, 2)
    r = u(0.08, 0.25)
    s.add(p[0], p[1], r, r * u(0.5, 1.0), u(0, np.pi), (-0.05, -e_base), tag="-body")
  return s, [(0.0, 0.0, 0.8, 0.8)], 1.0


_ANATOMY = {"ct": _ct, "mri": _mri, "cxr": _cxr, "histology": _histology}


def _nuclei(rng: np.random.Generator, size: int) -> np.ndarray:
  """Haematoxylin of randomly placed nuclei via separable Gaussians [size*size]."""
  _, c = _grid(size)
  n = int(rng.integers(50, 130))
  pos = rng.uniform(-1.05, 1.05, (2, n)).astype(np.float32)
  sig = rng.uniform(0.025, 0.045, (2, n)).astype(np.float32)
  amp = rng.uniform(0.7, 1.1, n).astype(np.float32)
  gx = np.exp(-((c[None, :] - pos[0][:, None]) / sig[0][:, None]) ** 2 / 2)
  gy = np.exp(-((c[None, :] - pos[1][:, None]) / sig[1][:, None]) ** 2 / 2)
  field = (gy * amp[:, None]).T @ gx
  return np.clip(field * 2.0 - 0.5, 0, 1.2).ravel()


# ----------------------------------------------------------------------------
# Findings.


def _size_word(radius: float) -> str:
  return "small" if radius < 0.08 else "medium" if radius < 0.13 else "large"


def _location_word(p: np.ndarray) -> str:
  col = int(np.clip(np.floor((p[0] + 1) * 1.5), 0, 2))
  row = int(np.clip(np.floor((p[1] + 1) * 1.5), 0, 2))
  return _LOCATIONS[row][col]


def _lesions(rng: np.random.Generator, finding: str, modality: str, regions,
             p_bright: float, affine: np.ndarray, shift: np.ndarray) -> tuple[_Shapes, str]:
  """Lesion ellipses in image coordinates and the caption phrase.

  Sizes and contrasts are large enough for small models to pick findings up within a few epochs
  at 64 px (at radii 0.02-0.26 and contrast 0.15-0.35 a 3-conv stem + max-pool probe stayed at
  chance; now 0.51 test accuracy after 3 epochs), while a linear model on raw pixels stays at
  chance (0.18 at 64 px): radii 0.03-0.05 (bright calcifications) to 0.3, contrast 0.25-0.5.
  """
  histo = modality == "histology"
  s = _Shapes(num_maps=2 if histo else 1)
  u = rng.uniform
  if finding == "none":
    return s, "no focal finding"

  def centre():
    region = regions[rng.integers(len(regions))]
    return affine @ _sample_in(rng, region) + shift

  def value(mag, bright=None):
    bright = rng.random() < p_bright if bright is None else bright
    if histo:  # denser / paler nuclear staining; eosin drops where cells pack
      return (mag * 3.0, -mag) if bright else (-mag * 1.5, mag)
    return mag if bright else -mag

  if finding == "single_lesion":
    p, r = centre(), u(0.09, 0.2)
    s.add(p[0], p[1], r, r * u(0.75, 1.0), u(0, np.pi), value(u(0.25, 0.45)), tag=1)
    return s, f"a {_size_word(r)} lesion in the {_location_word(p)}"
  if finding == "multiple_lesions":
    k, mag, bright = int(rng.integers(3, 6)), u(0.25, 0.45), rng.random() < p_bright
    ps, rs = [], []
    for i in range(k):
      p, r = centre(), u(0.05, 0.1)
      s.add(p[0], p[1], r, r * u(0.75, 1.0), u(0, np.pi), value(mag, bright), tag=i + 1)
      ps.append(p)
      rs.append(r)
    size, where = _size_word(float(np.mean(rs))), _location_word(np.mean(ps, 0))
    return s, f"multiple {size} lesions in the {where}"
  if finding == "elongated_lesion":
    p, a = centre(), u(0.18, 0.3)
    s.add(p[0], p[1], a, a / u(2.5, 4.0), u(0, np.pi), value(u(0.25, 0.45)), tag=1)
    return s, f"an elongated {_size_word(a)} lesion in the {_location_word(p)}"
  if finding == "calcification":
    p, k = centre(), int(rng.integers(1, 4))
    for i in range(k):
      q = p + (rng.uniform(-0.07, 0.07, 2) if i else 0)
      r = u(0.03, 0.05)
      s.add(q[0], q[1], r, r * u(0.7, 1.0), u(0, np.pi),
            (u(2.5, 3.5), -0.3) if histo else u(0.7, 1.0), tag=1)
    noun = "a small calcification" if k == 1 else "small calcifications"
    return s, f"{noun} in the {_location_word(p)}"
  if finding == "ring_enhancing":
    p, r = centre(), u(0.11, 0.2)
    wall, aspect, th = r * u(0.28, 0.4), u(0.8, 1.0), u(0, np.pi)
    rim, core = u(0.35, 0.5), u(0.05, 0.2)
    if histo:
      s.add(p[0], p[1], r, r * aspect, th, (rim * 2.5, -rim), tag=1)
      s.add(p[0], p[1], r - wall, (r - wall) * aspect, th, (-rim * 2.5 - 0.3, rim), tag=1)
    else:
      s.add(p[0], p[1], r, r * aspect, th, rim, tag=1)
      s.add(p[0], p[1], r - wall, (r - wall) * aspect, th, -rim - core, tag=1)
    return s, f"a {_size_word(r)} ring-enhancing lesion in the {_location_word(p)}"
  raise ValueError(f"unknown finding {finding!r}; allowed: {', '.join(FINDINGS)}")


# ----------------------------------------------------------------------------
# Rendering.


def _rng(seed: Sequence[int], stream: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*seed, stream])))


def render_phantom(modality: int, finding: int, seed: int | Sequence[int],
                   image_size: int = 64, channels: int = 1, with_masks: bool = False,
                   lesion_scale: float = 1.0):
  """Renders one phantom -> (uint8 [H, W, channels], caption), plus with ``with_masks`` a dict
  ``masks`` uint8 [H, W, len(MASK_CLASSES)] (0/1 per :data:`MASK_CLASSES`) and ``lesion_ids``
  uint8 [H, W] (0 outside lesions, else the lesion's number 1..k; a calcification cluster is one).

  Anatomy, noise and contrast come from ``seed`` alone and lesions from a
  separate stream, so two findings with the same seed share the same anatomy.
  Masks are the ellipses' interiors at the half-way level of their soft edge. ``lesion_scale``
  multiplies every lesion's axes (the benchmark's 32-px images use 2; the caption keeps the
  unscaled size word).
  """
  image, caption, inside, tags, nuclei = _render(modality, finding, seed, image_size, channels,
                                                 lesion_scale)
  if not with_masks:
    return image, caption
  return image, caption, _masks(inside, tags, nuclei, image_size)


def _render(modality: int, finding: int, seed, image_size: int, channels: int,
            lesion_scale: float = 1.0):
  """-> (image, caption, per-ellipse interiors bool [n, size*size], their tags, nuclei or None)."""
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  seed = tuple(int(x) for x in np.atleast_1d(seed))
  mod_name, finding_name = MODALITIES[modality], FINDINGS[finding]
  rng = _rng(seed, 1)
  u = rng.uniform
  shapes, regions, p_bright = _ANATOMY[mod_name](rng)
  # Random pose / habitus: rotation, anisotropic scale, shift.
  phi = u(-0.3, 0.3) if mod_name != "histology" else u(0, 2 * np.pi)
  scale, aspect = u(0.85, 1.08), u(0.9, 1.1)
  rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
  affine = rot @ np.diag([scale * aspect, scale / aspect])
  shift = rng.uniform(-0.07, 0.07, 2)
  bias_g = rng.standard_normal((6, 6)).astype(np.float32)
  gain, offset, gamma = u(0.75, 1.2), u(-0.08, 0.08), u(0.8, 1.25)
  noise_std = u(0.01, 0.05)
  noise = rng.standard_normal((3 if mod_name == "histology" else 1, image_size * image_size),
                              dtype=np.float32)
  lesions, phrase = _lesions(_rng(seed, 2), finding_name, mod_name, regions, p_bright,
                             affine, shift)
  if lesion_scale != 1.0:   # every lesion ellipse's axes (centres and intensities kept)
    lesions.rows = [(cx, cy, a * lesion_scale, b * lesion_scale, *rest)
                    for cx, cy, a, b, *rest in lesions.rows]
  maps, soft = _render_shapes(shapes, lesions, affine, shift, image_size, return_masks=True)
  basis = _smooth_basis(image_size)
  field = (basis @ bias_g @ basis.T).ravel()

  nuclei = None
  if mod_name == "histology":
    nuclei = _nuclei(rng, image_size)
    h = maps[0] + nuclei * u(0.6, 1.0)
    e = maps[1] * (1 + 0.2 * field)
    od_h = _OD_H * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    od_e = _OD_E * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    strength = u(0.8, 1.3)
    rgb = np.exp(-strength * (od_h[:, None] * np.maximum(h, 0)[None]
                              + od_e[:, None] * np.maximum(e, 0)[None]))
    img = rgb * (0.85 + 0.3 * (gain - 0.75)) + offset * 0.5 + noise * noise_std * 0.5
    if channels == 1:
      img = _LUMA @ img
  else:
    img = maps[0] * (1 + 0.12 * field)
    img = img * gain + offset
    np.clip(img, 0, 1, out=img)
    img = img ** gamma + noise[0] * noise_std
  img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
  img = img.reshape(-1, image_size, image_size)
  if img.shape[0] != channels:
    img = np.repeat(img, channels, axis=0)
  caption = f"{MODALITY_NAMES[mod_name]} with {phrase}."
  image = np.ascontiguousarray(img.transpose(1, 2, 0))
  return image, caption, soft >= 0.5, shapes.tags + lesions.tags, nuclei


def _lesion_ids(inside: np.ndarray, tags: list, size: int) -> np.ndarray:
  """uint8 [size*size]: 0 outside lesions, else the lesion number (later ellipses win overlaps)."""
  ids = np.zeros(size * size, np.uint8)
  for i, t in enumerate(tags):
    if isinstance(t, int):
      ids[inside[i]] = t
  return ids


def lesion_labels(ids: np.ndarray, lesion_scale: float = 1.0) -> dict[str, np.int32]:
  """The :data:`LESION_LABELS` of a lesion-id map ``[H, W]`` (what the rendered pixels show, at the
  rendered size): presence; the image quadrant (row-major) of the centroid of the largest lesion;
  the size class of the total lesion area (fraction of the image, cut at
  :data:`SIZE_CUTS`). Location and size are -1 (unlabelled) without lesion pixels."""
  ids = np.asarray(ids)
  size = ids.shape[0]
  area = np.bincount(ids.ravel(), minlength=2)[1:]
  if not area.any():
    return {"lesion_present": np.int32(0), "lesion_location": np.int32(-1),
            "lesion_size": np.int32(-1)}
  rows, cols = np.nonzero(ids == int(area.argmax()) + 1)
  half = lambda v: int(v.mean() > (size - 1) / 2)
  fraction = area.sum() / ids.size
  return {"lesion_present": np.int32(1), "lesion_location": np.int32(half(rows) * 2 + half(cols)),
          "lesion_size": np.int32(np.searchsorted(np.multiply(SIZE_CUTS, lesion_scale ** 2), fraction,
                                                   side="right"))}


def _masks(inside: np.ndarray, tags: list, nuclei: np.ndarray | None, size: int) -> dict[str, np.ndarray]:
  """Per-ellipse interiors ``[n, size*size]`` and their tags -> ``masks`` / ``lesion_ids`` (see render_phantom)."""
  def union(tag):
    rows = [i for i, t in enumerate(tags) if t == tag]
    return inside[rows].any(axis=0) if rows else np.zeros(size * size, bool)
  body = union("body") & ~union("-body")
  organ = nuclei > 0.5 if nuclei is not None else union("organ")
  ids = _lesion_ids(inside, tags, size)
  masks = np.stack([ids > 0, body, organ], axis=-1).astype(np.uint8)
  return {"masks": masks.reshape(size, size, len(MASK_CLASSES)), "lesion_ids": ids.reshape(size, size)}


class PhantomSource:
  """Random-access source of phantom records (grain RandomAccessDataSource).

  Records: ``image`` uint8 [H, W, C], ``modality`` int32, ``finding`` int32, the
  :data:`LESION_LABELS` int32 (-1 = undefined), ``caption`` str, ``index`` int64; with ``masks=True`` also ``masks`` uint8 [H, W, 3] and
  ``lesion_ids`` uint8 [H, W] (:func:`render_phantom`). Record ``i`` of a split is a pure function
  of ``(seed, split, i)``; modality and finding are drawn uniformly.
  """

  extra_labels = tuple(LESION_LABELS)   # label keys besides modality / finding

  def __init__(self, split: str = "train", image_size: int = 64, channels: int = 1,
               seed: int = 0, num_examples: int | None = None, masks: bool = False,
               lesion_scale: float = 1.0):
    if split not in SPLITS:
      raise ValueError(f"phantoms: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if channels not in (1, 3):
      raise ValueError(f"phantoms: channels must be 1 or 3, got {channels}")
    if image_size < 8:
      raise ValueError(f"phantoms: image_size must be >= 8, got {image_size}")
    self.split, self.image_size, self.channels = split, int(image_size), int(channels)
    self.seed = int(seed)
    self.masks = bool(masks)
    self.lesion_scale = float(lesion_scale)
    self.num_examples = int(SPLIT_SIZES[split] if num_examples is None else num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"phantoms[{self.split}]: index {index} out of range "
                       f"[0, {self.num_examples})")
    key = (self.seed, SPLITS[self.split], index)
    labels = _rng(key, 0)
    modality = int(labels.integers(len(MODALITIES)))
    finding = int(labels.integers(len(FINDINGS)))
    image, caption, inside, tags, nuclei = _render(modality, finding, key, self.image_size,
                                                   self.channels, self.lesion_scale)
    size = self.image_size
    record = {"image": image, "modality": np.int32(modality), "finding": np.int32(finding),
              "caption": caption, "index": np.int64(index),
              **lesion_labels(_lesion_ids(inside, tags, size).reshape(size, size), self.lesion_scale)}
    return {**record, **_masks(inside, tags, nuclei, size)} if self.masks else record

  def __repr__(self) -> str:
    return (f"PhantomSource(split={self.split!r}, image_size={self.image_size}, "
            f"channels={self.channels}, seed={self.seed}, num_examples={self.num_examples}"
            f"{', masks=True' if self.masks else ''}"
            f"{f', lesion_scale={self.lesion_scale}' if self.lesion_scale != 1 else ''})")


def benchmark_phantoms(image_size: int = 64, channels: int = 1, n: int = 2000) -> float:
  """Images per second rendering ``n`` records on the calling thread."""
  source = PhantomSource("train", image_size=image_size, channels=channels)
  source[0]  # warm the grid caches
  start = time.perf_counter()
  for i in range(n):
    source[i]
  return n / (time.perf_counter() - start)
