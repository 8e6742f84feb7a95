"""Embedded procedural 3D volumes: CT-like abdomens (Hounsfield units) and MRI-like heads.

The volumetric counterpart of :mod:`medfm_jax.data.phantoms`, with the same labels and captions:
``modality`` indexes ``phantoms.MODALITIES`` (only 'ct' and 'mri' are drawn), ``finding`` indexes
``phantoms.FINDINGS``, the caption is the 2D sentence ("Abdominal CT with a small lesion in the
upper left."). Each volume also has a label map of :data:`STRUCTURES`: two anatomical structures
per modality plus the lesion(s) of the finding (label 3; 'none' has none).

Shapes are soft-edged ellipsoids evaluated as quadratic forms over the 10 monomials of a cached
coordinate grid (one matmul); anatomy gets a random 3D pose (rotation, anisotropic scale, shift),
per-shape jitter and contrast (T1- / T2-like MRI), MRI a smooth multiplicative bias field, both
noise. A record is a pure function of ``(seed, split, index)``.

Array layout and frame: volumes are ``[D, H, W]`` = ``(z, y, x)`` in the canonical frame of the
volume sources (``medfm_jax.data.volumes``): +x patient left, +y posterior, +z superior (DICOM's
LPS, axis order reversed), so ``vol[k]`` is an axial slice shown in radiological convention.
Normalised coordinates are in [-1, 1]; caption locations refer to the axial (x, y) plane, as in 2D.
"""
from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np

from medfm_jax.data import phantoms

MODALITIES_3D = ("ct", "mri")               # drawn uniformly; indices into phantoms.MODALITIES
STRUCTURES = {"ct": ("background", "liver", "kidneys", "lesion"),
              "mri": ("background", "white_matter", "ventricles", "lesion")}
NUM_CLASSES = 4
LESION = 3
# Field of view (mm) along (z, y, x): spacing = fov / shape.
FOV_MM = {"ct": (320.0, 360.0, 360.0), "mri": (200.0, 220.0, 220.0)}
SPLIT_SIZES = {"train": 10_000, "val": 500, "test": 500}
AIR_HU = -1000.0


def _as_shape(size) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in np.broadcast_to(np.asarray(size), (3,)))
  if min(shape) < 8:
    raise ValueError(f"phantoms3d: volume size must be >= 8 along every axis, got {shape}")
  return shape


@functools.lru_cache(maxsize=16)
def _grid(shape: tuple[int, int, int]) -> np.ndarray:
  """[10, D*H*W] monomials xx, yy, zz, xy, xz, yz, x, y, z, 1 of voxel centres in [-1, 1]."""
  axes = [((np.arange(n, dtype=np.float32) * 2 + 1) / n - 1) for n in shape]
  z, y, x = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
  grid = np.stack([x * x, y * y, z * z, x * y, x * z, y * z, x, y, z, np.ones_like(x)])
  grid = grid.astype(np.float32)
  grid.setflags(write=False)
  return grid


@functools.lru_cache(maxsize=16)
def _smooth_basis(n: int, k: int = 5) -> np.ndarray:
  """[n, k] Gaussian RBF basis along one axis (a separable smooth random field)."""
  c = (np.arange(n, dtype=np.float32) * 2 + 1) / n - 1
  mu = np.linspace(-1.2, 1.2, k, dtype=np.float32)
  b = np.exp(-((c[:, None] - mu[None, :]) ** 2) / (2 * 0.4 ** 2))
  b = (b / b.sum(1, keepdims=True) * np.sqrt(k / 2)).astype(np.float32)
  b.setflags(write=False)
  return b


def _rotation(angles) -> np.ndarray:
  """Rotation about x, then y, then z by ``angles`` (radians) acting on (x, y, z) vectors."""
  ax, ay, az = angles
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


class _Shapes:
  """Ellipsoids (centre (x, y, z), semi-axes, rotation angles) with intensity deltas and labels."""

  def __init__(self):
    self.centres, self.axes, self.rots, self.values, self.labels = [], [], [], [], []

  def add(self, centre, axes, value, angles=(0.0, 0.0, 0.0), label: int = 0) -> None:
    self.centres.append(np.asarray(centre, np.float64))
    self.axes.append(np.asarray(axes, np.float64))
    self.rots.append(_rotation(angles))
    self.values.append(float(value))
    self.labels.append(int(label))

  def __len__(self):
    return len(self.values)


def _quadrics(shapes: _Shapes, affine: np.ndarray, shift: np.ndarray, mapped: bool):
  """Per ellipsoid: the quadratic form ``M`` and centre, optionally mapped by ``x -> A x + t``."""
  m = np.stack([r @ np.diag(1 / a ** 2) @ r.T for r, a in zip(shapes.rots, shapes.axes)])
  c = np.stack(shapes.centres)
  if mapped:
    inv = np.linalg.inv(affine)
    m = inv.T @ m @ inv
    c = c @ affine.T + shift
  return m, c


def _render(anatomy: _Shapes, lesions: _Shapes, affine, shift, shape):
  """-> (summed intensity deltas [N], label map [N] uint8): soft masks ``clip((1 - q) s, 0, 1)``
  of ``q = (p - c)^T M (p - c)`` with an edge ramp about one voxel wide; a voxel's label is that of
  the last listed ellipsoid whose soft mask is >= 0.5 there (lesions last), and every labelled
  ellipsoid labels at least the voxel nearest its centre (in its own metric)."""
  parts = [_quadrics(anatomy, affine, shift, True)]
  if len(lesions):
    parts.append(_quadrics(lesions, affine, shift, False))
  m = np.concatenate([p[0] for p in parts])
  c = np.concatenate([p[1] for p in parts])
  mc = np.einsum("nij,nj->ni", m, c)
  coeffs = np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], 2 * m[:, 0, 1], 2 * m[:, 0, 2],
                     2 * m[:, 1, 2], -2 * mc[:, 0], -2 * mc[:, 1], -2 * mc[:, 2],
                     np.einsum("ni,ni->n", c, mc)], 1).astype(np.float32)
  # Edge sharpness: half the smallest axis in voxels (the largest eigenvalue of M is 1/a_min^2).
  max_eig = np.linalg.eigvalsh(m)[:, -1]
  sharp = np.maximum(min(shape) / 2 / np.sqrt(max_eig), 1.0).astype(np.float32)
  q = coeffs @ _grid(tuple(shape))
  labels = np.asarray(anatomy.labels + lesions.labels)
  nearest = {i: int(np.argmin(q[i])) for i in np.flatnonzero(labels)}
  masks = np.subtract(1, q, out=q)
  masks *= sharp[:, None]
  np.clip(masks, 0, 1, out=masks)
  values = np.asarray(anatomy.values + lesions.values, np.float32)
  label_map = np.zeros(masks.shape[1], np.uint8)
  for i, centre in nearest.items():   # sub-voxel shapes still label their nearest voxel
    label_map[masks[i] >= 0.5] = labels[i]
    label_map[centre] = labels[i]
  return values @ masks, label_map


# ----------------------------------------------------------------------------
# Anatomy: (shapes, lesion regions (centre, semi-axes) in the canonical frame, p(bright lesion),
# lesion contrast unit, calcification contrast range).


def _ct(rng: np.random.Generator):
  s, u = _Shapes(), rng.uniform
  a, b = u(0.78, 0.92), u(0.55, 0.7)
  fat = u(0.05, 0.11)
  fat_hu, soft = u(-120, -80), u(30, 50)
  s.add((0, 0.02, 0), (a, b, 1.6), fat_hu - AIR_HU)                              # body: fat
  s.add((0, 0.02, 0), (a - fat, b - fat, 1.6), soft - fat_hu)                    # viscera
  s.add((-0.38 + u(-.05, .05), -0.12 + u(-.05, .05), 0.15 + u(-.1, .1)),
        (u(.25, .34), u(.19, .27), u(.4, .55)), u(15, 30), (0, 0, u(-0.4, 0.1)), label=1)  # liver
  s.add((0.45 + u(-.04, .04), -0.1 + u(-.05, .05), 0.25 + u(-.1, .1)),
        (u(.1, .16), u(.07, .11), u(.15, .25)), u(5, 20), (0, 0, u(0.3, 0.9)))     # spleen
  kidney = u(110, 160)
  for side in (-1, 1):
    s.add((side * 0.33 + u(-.03, .03), 0.28 + u(-.03, .03), -0.2 + u(-.08, .08)),
          (u(.1, .13), u(.07, .09), u(.22, .3)), kidney, (0, 0, side * u(0.6, 1.1)), label=2)
  for _ in range(rng.integers(1, 5)):                                            # bowel gas
    p = (u(-0.25, 0.45), u(-0.3, 0.2), u(-0.6, 0.4))
    r = u(0.03, 0.08)
    s.add(p, (r, r * u(0.6, 1.0), r * u(0.8, 2.0)), -soft - u(750, 900), (0, 0, u(0, np.pi)))
  bone = u(400, 700)
  s.add((0, 0.38, 0), (u(.09, .12), u(.075, .095), 1.7), bone - soft)            # vertebral column
  s.add((0, 0.38, 0), (0.033, 0.028, 1.7), 20 - bone)                            # spinal canal
  s.add((0.06, 0.22, 0), (0.045, 0.045, 1.7), u(120, 220))                       # aorta
  s.add((-0.09, 0.2, 0), (0.05, 0.035, 1.7), u(60, 140))                         # IVC
  regions = [((-0.38, -0.12, 0.15), (0.2, 0.15, 0.3)), ((0.05, -0.05, -0.1), (0.3, 0.2, 0.5))]
  return s, regions, 0.35, 100.0, (600.0, 900.0)


def _mri(rng: np.random.Generator):
  s, u = _Shapes(), rng.uniform
  if rng.random() < 0.5:   # T1-like: CSF dark, white matter bright
    scalp, skull, csf, gm, wm = u(.45, .6), u(.05, .12), u(.08, .18), u(.4, .5), u(.6, .7)
  else:                    # T2-like: CSF bright, white matter darker than grey
    scalp, skull, csf, gm, wm = u(.35, .5), u(.04, .1), u(.8, .95), u(.5, .6), u(.33, .43)
  a, b, c = u(0.64, 0.76), u(0.8, 0.92), u(0.75, 0.88)
  t1, t2, t3 = u(.04, .06), u(.07, .09), u(.095, .115)
  s.add((0, 0, 0), (a, b, c), scalp)
  s.add((0, 0, 0), (a - t1, b - t1, c - t1), skull - scalp)
  s.add((0, 0, 0), (a - t2, b - t2, c - t2), csf - skull)
  s.add((0, 0, 0), (a - t3, b - t3, c - t3), gm - csf)
  ia, ib, ic = a - t3, b - t3, c - t3
  for side in (-1, 1):
    s.add((side * ia * 0.5, 0.02, 0.05), (ia * u(.36, .42), ib * u(.66, .74), ic * u(.55, .65)),
          wm - gm, (0, 0, side * u(-.08, .08)), label=1)                           # white matter
  for side in (-1, 1):                                                           # lateral ventricles
    s.add((side * u(.08, .1), -0.05, 0.1), (u(.05, .07), u(.16, .22), u(.14, .2)), csf - wm,
          (u(-.1, .1), 0, side * u(.15, .35)), label=2)
    s.add((side * 0.17, 0.12, -0.05), (u(.05, .07), u(.07, .1), u(.06, .09)), (gm - wm) * 0.7)
  s.add((0, 0, 0.1), (0.012, ib - 0.04, ic * 0.7), csf - gm)                      # falx
  regions = [((side * ia * 0.5, 0.0, 0.05), (ia * 0.3, ib * 0.55, ic * 0.45)) for side in (-1, 1)]
  return s, regions, 0.5, 0.3, (0.5, 0.8)


_ANATOMY = {"ct": _ct, "mri": _mri}


def _lesions(rng: np.random.Generator, finding: str, regions, p_bright: float, scale: float,
             calcification: tuple[float, float], affine, shift) -> tuple[_Shapes, str]:
  """Lesion ellipsoids (label :data:`LESION`) in volume coordinates and the caption phrase; the
  finding kinds, size words and locations of the 2D phantoms (``phantoms._lesions``)."""
  s, u = _Shapes(), rng.uniform
  if finding == "none":
    return s, "no focal finding"

  def centre():
    c, ax = regions[rng.integers(len(regions))]
    r, d = 0.85 * np.cbrt(rng.random()), rng.standard_normal(3)
    return affine @ (np.asarray(c) + np.asarray(ax) * r * d / np.linalg.norm(d)) + shift

  def value(mag, bright=None):
    bright = rng.random() < p_bright if bright is None else bright
    return (mag if bright else -mag) * scale

  angles = lambda: rng.uniform(0, np.pi, 3)
  if finding == "single_lesion":
    p, r = centre(), u(0.09, 0.2)
    s.add(p, (r, r * u(0.75, 1.0), r * u(0.75, 1.0)), value(u(0.6, 1.0)), angles(), LESION)
    return s, f"a {phantoms._size_word(r)} lesion in the {phantoms._location_word(p)}"
  if finding == "multiple_lesions":
    k, mag, bright = int(rng.integers(3, 6)), u(0.6, 1.0), rng.random() < p_bright
    ps, rs = [], []
    for _ in range(k):
      p, r = centre(), u(0.05, 0.1)
      s.add(p, (r, r * u(0.75, 1.0), r * u(0.75, 1.0)), value(mag, bright), angles(), LESION)
      ps.append(p)
      rs.append(r)
    size, where = phantoms._size_word(float(np.mean(rs))), phantoms._location_word(np.mean(ps, 0))
    return s, f"multiple {size} lesions in the {where}"
  if finding == "elongated_lesion":
    p, a = centre(), u(0.18, 0.3)
    s.add(p, (a, a / u(2.5, 4.0), a / u(2.5, 4.0)), value(u(0.6, 1.0)), angles(), LESION)
    return s, f"an elongated {phantoms._size_word(a)} lesion in the {phantoms._location_word(p)}"
  if finding == "calcification":
    p, k = centre(), int(rng.integers(1, 4))
    for i in range(k):
      q = p + (rng.uniform(-0.07, 0.07, 3) if i else 0)
      r = u(0.03, 0.05)
      s.add(q, (r, r * u(0.7, 1.0), r * u(0.7, 1.0)), u(*calcification), angles(), LESION)
    noun = "a small calcification" if k == 1 else "small calcifications"
    return s, f"{noun} in the {phantoms._location_word(p)}"
  if finding == "ring_enhancing":
    p, r = centre(), u(0.11, 0.2)
    wall, aspect, th = r * u(0.28, 0.4), u(0.8, 1.0), angles()
    rim, core = u(0.8, 1.2), u(0.2, 0.5)
    s.add(p, (r, r * aspect, r * aspect), rim * scale, th, LESION)
    s.add(p, (r - wall, (r - wall) * aspect, (r - wall) * aspect), -(rim + core) * scale, th, LESION)
    return s, f"a {phantoms._size_word(r)} ring-enhancing lesion in the {phantoms._location_word(p)}"
  raise ValueError(f"unknown finding {finding!r}; allowed: {', '.join(phantoms.FINDINGS)}")


def render_volume(modality: int, finding: int, seed: int | Sequence[int],
                  size: int | Sequence[int] = 32) -> tuple[np.ndarray, np.ndarray, str]:
  """Renders one volume -> (float32 [D, H, W] in HU (CT) or arbitrary MR units >= 0, label map
  uint8 [D, H, W] of ``STRUCTURES[modality]``, caption). ``modality`` indexes
  ``phantoms.MODALITIES`` ('ct' or 'mri'); anatomy comes from ``seed`` alone and lesions from a
  separate stream, so two findings with the same seed share the anatomy."""
  shape = _as_shape(size)
  name = phantoms.MODALITIES[modality]
  if name not in _ANATOMY:
    raise ValueError(f"phantoms3d: modality {name!r} has no volume; allowed {MODALITIES_3D}")
  seed = tuple(int(x) for x in np.atleast_1d(seed))
  rng = phantoms._rng(seed, 1)
  u = rng.uniform
  anatomy, regions, p_bright, lesion_scale, calcification = _ANATOMY[name](rng)
  rot = _rotation((u(-0.1, 0.1), u(-0.1, 0.1), u(-0.3, 0.3)))
  scale, aspect = u(0.85, 1.08), u(0.9, 1.1)
  affine = rot @ np.diag([scale * aspect, scale / aspect, scale])
  shift = rng.uniform(-0.07, 0.07, 3)
  lesions, phrase = _lesions(phantoms._rng(seed, 2), phantoms.FINDINGS[finding], regions,
                             p_bright, lesion_scale, calcification, affine, shift)
  values, label_map = _render(anatomy, lesions, affine, shift, shape)
  noise = rng.standard_normal(values.shape, dtype=np.float32)
  if name == "ct":
    image = AIR_HU + values + noise * u(5, 20)
  else:
    g = rng.standard_normal((5, 5, 5)).astype(np.float32)
    bz, by, bx = (_smooth_basis(n) for n in shape)
    field = np.einsum("ijk,zi,yj,xk->zyx", g, bz, by, bx).ravel()
    gain = u(300, 900)
    image = np.abs(values * (1 + 0.12 * field) * gain + noise * u(0.01, 0.04) * gain)
  caption = f"{phantoms.MODALITY_NAMES[name]} with {phrase}."
  return image.reshape(shape).astype(np.float32), label_map.reshape(shape), caption


def spacing_of(modality: int, size) -> np.ndarray:
  """Voxel spacing (mm) along (z, y, x) of a rendered volume of ``size``."""
  return (np.asarray(FOV_MM[phantoms.MODALITIES[modality]]) / np.asarray(_as_shape(size))).astype(np.float32)


class VolumePhantomSource:
  """Random-access source of 3D phantom records (grain RandomAccessDataSource).

  Records: ``image`` float32 [D, H, W, 1] (HU / MR units), ``label_map`` uint8 [D, H, W],
  ``spacing`` float32 [3] (mm, z y x), ``modality`` int32 (index into ``phantoms.MODALITIES``),
  ``finding`` int32, ``caption`` str, ``index`` int64; a pure function of ``(seed, split, i)``.
  """

  def __init__(self, split: str = "train", size: int | Sequence[int] = 32, seed: int = 0,
               num_examples: int | None = None):
    if split not in phantoms.SPLITS:
      raise ValueError(f"phantoms3d: unknown split {split!r}; allowed: {', '.join(phantoms.SPLITS)}")
    self.split, self.shape, self.seed = split, _as_shape(size), int(seed)
    self.num_examples = int(SPLIT_SIZES[split] if num_examples is None else num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"phantoms3d[{self.split}]: index {index} out of range [0, {self.num_examples})")
    key = (self.seed, phantoms.SPLITS[self.split], index, 3)   # 3: never a 2D phantom's stream
    labels = phantoms._rng(key, 0)
    modality = phantoms.MODALITIES.index(MODALITIES_3D[int(labels.integers(len(MODALITIES_3D)))])
    finding = int(labels.integers(len(phantoms.FINDINGS)))
    image, label_map, caption = render_volume(modality, finding, key, self.shape)
    return {"image": image[..., None], "label_map": label_map,
            "spacing": spacing_of(modality, self.shape), "modality": np.int32(modality),
            "finding": np.int32(finding), "caption": caption, "index": np.int64(index)}

  def __repr__(self) -> str:
    return (f"VolumePhantomSource(split={self.split!r}, size={self.shape}, seed={self.seed}, "
            f"num_examples={self.num_examples})")


def benchmark_volumes(size: int = 32, n: int = 50) -> float:
  """Volumes per second rendered on the calling thread."""
  source = VolumePhantomSource("train", size)
  source[0]
  start = time.perf_counter()
  for i in range(n):
    source[i]
  return n / (time.perf_counter() - start)
