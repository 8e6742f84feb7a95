"""3D volumes: ``data.volume`` (:class:`VolumeSpec`) and the per-record numpy transforms the grain
workers run on them (intensity normalisation, foreground-biased random crops, flips, intensity
jitter, resampling to a target spacing, reorientation to the canonical frame).

Volumes are ``[D, H, W, C]`` float arrays (label maps ``[D, H, W]`` ints) in the canonical frame:
array axes (z, y, x) with +x patient left, +y posterior, +z superior, i.e. DICOM's LPS with the
axis order reversed; ``vol[k]`` is an axial slice in radiological display convention. Spacings
are (z, y, x) in mm.

Intensity schemes (``data.volume.intensity``):

* ``ct``: clip to the HU window ``ct_window`` (``ct_clip='window'``) or to the ``percentiles`` of
  the foreground (``ct_clip='percentile'``; foreground = voxels above ``ct_window[0]``), then
  z-score over the foreground;
* ``mr``: per-volume z-score over the foreground (voxels > 0; all voxels when none);
* ``auto``: ``ct`` for records whose modality name is CT, ``mr`` otherwise; ``none``: unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

INTENSITY = ("auto", "ct", "mr", "none")
CT_CLIPS = ("window", "percentile")


def _triple(raw, field: str, cast=int) -> tuple:
  values = tuple(cast(v) for v in np.broadcast_to(np.asarray(raw), (3,)).tolist()) if raw is not None else ()
  if len(values) != 3 or min(values) <= 0:
    raise ValueError(f"{field}={raw!r}: expected a positive number or three (z, y, x)")
  return values


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
  """``config.data.volume``: 3D crops instead of 2D images (see the module docstring)."""
  size: tuple[int, int, int] = (32, 32, 32)     # (D, H, W) crop fed to the model
  spacing: tuple[float, ...] = ()                # target (z, y, x) mm; () = keep the file's
  intensity: str = "auto"
  ct_clip: str = "window"
  ct_window: tuple[float, float] = (-200.0, 300.0)   # HU (abdominal soft tissue)
  percentiles: tuple[float, float] = (0.5, 99.5)
  foreground_prob: float = 0.33                  # crops centred on a labelled voxel (needs labels)
  jitter: tuple[float, float] = (0.1, 0.1)       # intensity x U(1 +- s) + U(+- t), after the z-score
  labels: bool = False                           # batches carry ``label_map`` int32 [D, H, W]
  phantom_size: tuple[int, int, int] = ()        # source 'phantoms': rendered size (() = size)
  train_volumes: int = 0                         # few-shot: the first N train volumes (0 = all)

  @classmethod
  def from_config(cls, raw) -> "VolumeSpec":
    get = raw.get
    spacing = get("spacing") or ()
    spec = cls(
        size=_triple(get("size", cls.size), "data.volume.size"),
        spacing=_triple(spacing, "data.volume.spacing", float) if spacing else (),
        intensity=get("intensity", cls.intensity), ct_clip=get("ct_clip", cls.ct_clip),
        ct_window=tuple(float(v) for v in get("ct_window", cls.ct_window)),
        percentiles=tuple(float(v) for v in get("percentiles", cls.percentiles)),
        foreground_prob=float(get("foreground_prob", cls.foreground_prob)),
        jitter=tuple(float(v) for v in get("jitter", cls.jitter)),
        labels=bool(get("labels", cls.labels)), train_volumes=int(get("train_volumes", 0) or 0),
        phantom_size=_triple(get("phantom_size"), "data.volume.phantom_size") if get("phantom_size") else ())
    if spec.intensity not in INTENSITY:
      raise ValueError(f"data.volume.intensity={spec.intensity!r}: allowed {INTENSITY}")
    if spec.ct_clip not in CT_CLIPS:
      raise ValueError(f"data.volume.ct_clip={spec.ct_clip!r}: allowed {CT_CLIPS}")
    lo, hi = spec.ct_window
    if not lo < hi:
      raise ValueError(f"data.volume.ct_window={spec.ct_window}: need low < high (HU)")
    plo, phi = spec.percentiles
    if not 0 <= plo < phi <= 100:
      raise ValueError(f"data.volume.percentiles={spec.percentiles}: need 0 <= low < high <= 100")
    if not 0 <= spec.foreground_prob <= 1:
      raise ValueError(f"data.volume.foreground_prob={spec.foreground_prob}: allowed [0, 1]")
    if spec.train_volumes < 0:
      raise ValueError(f"data.volume.train_volumes={spec.train_volumes}: must be >= 0 (0 = all)")
    if len(spec.jitter) != 2 or min(spec.jitter) < 0:
      raise ValueError(f"data.volume.jitter={spec.jitter}: expected (scale, shift) >= 0")
    return spec

  @property
  def source_size(self) -> tuple[int, int, int]:
    return self.phantom_size or self.size


# ----------------------------------------------------------------------------
# Intensities.


def scheme_for(intensity: str, modality_name: str) -> str:
  """The scheme applied to a record: ``auto`` -> 'ct' for CT records, else 'mr'."""
  if intensity != "auto":
    return intensity
  return "ct" if str(modality_name).strip().lower() == "ct" else "mr"


def _zscore(x: np.ndarray, fg: np.ndarray) -> np.ndarray:
  values = x[fg] if fg.any() else x
  return ((x - values.mean()) / max(float(values.std()), 1e-6)).astype(np.float32)


def normalize_intensity(volume: np.ndarray, scheme: str, spec: VolumeSpec) -> np.ndarray:
  """``volume [D, H, W, C]`` float -> normalised float32 by ``scheme`` (see module docstring)."""
  x = np.asarray(volume, np.float32)
  if scheme == "none":
    return x
  if scheme == "ct":
    fg = x > spec.ct_window[0]
    if spec.ct_clip == "window":
      lo, hi = spec.ct_window
    else:
      lo, hi = np.percentile(x[fg] if fg.any() else x, spec.percentiles)
    x = np.clip(x, lo, hi)
    return _zscore(x, fg)
  if scheme == "mr":
    return _zscore(x, x > 0)
  raise ValueError(f"data.volume.intensity scheme {scheme!r}: allowed {INTENSITY}")


def intensity_jitter(x: np.ndarray, rng: np.random.Generator, jitter: tuple[float, float]) -> np.ndarray:
  """``x * U(1 - s, 1 + s) + U(-t, t)`` (one draw per volume; both draws always taken)."""
  s, t = jitter
  scale, shift = rng.uniform(1 - s, 1 + s), rng.uniform(-t, t)
  return (x * scale + shift).astype(np.float32)


# ----------------------------------------------------------------------------
# Crops and flips.


def _pad_to(x: np.ndarray, size: Sequence[int], value) -> tuple[np.ndarray, list[int]]:
  """Pads the first three axes symmetrically up to ``size``; returns the padded array and the
  offset added before each axis."""
  pads = [max(0, s - n) for s, n in zip(size, x.shape[:3])]
  before = [p // 2 for p in pads]
  if any(pads):
    widths = [(b, p - b) for b, p in zip(before, pads)] + [(0, 0)] * (x.ndim - 3)
    x = np.pad(x, widths, constant_values=value)
  return x, before


def random_crop(volume: np.ndarray, label_map: np.ndarray | None, size: Sequence[int],
                rng: np.random.Generator, foreground_prob: float = 0.0):
  """A ``size`` crop of ``volume [D, H, W, C]`` (and its label map), padded (image: its minimum,
  labels: 0) where the volume is smaller. With probability ``foreground_prob`` (and a label map
  with any voxel > 0) the crop is centred on a random voxel of a foreground class drawn uniformly
  among those present (nnU-Net's oversampling: small structures get as many crops as large ones),
  clamped inside the volume; else placed uniformly. Draws the same random numbers either way."""
  volume, before = _pad_to(volume, size, float(volume.min()))
  if label_map is not None:
    label_map, _ = _pad_to(label_map, size, 0)
  want_fg, pick, corner = rng.random() < foreground_prob, rng.random(), rng.random(3)
  limits = [n - s for n, s in zip(volume.shape[:3], size)]
  start = [int(c * (m + 1)) for c, m in zip(corner, limits)]
  if want_fg and label_map is not None:
    classes = np.flatnonzero(np.bincount(label_map.ravel())[1:]) + 1
    if classes.size:
      cls = classes[min(int(pick * classes.size), classes.size - 1)]
      fg = np.flatnonzero(label_map == cls)
      frac = pick * classes.size - int(pick * classes.size)   # the rest of pick draws the voxel
      centre = np.unravel_index(fg[min(int(frac * fg.size), fg.size - 1)], label_map.shape)
      start = [int(np.clip(c - s // 2, 0, m)) for c, s, m in zip(centre, size, limits)]
  window = tuple(slice(b, b + s) for b, s in zip(start, size))
  return volume[window], None if label_map is None else label_map[window]


def center_crop(volume: np.ndarray, label_map: np.ndarray | None, size: Sequence[int]):
  """The centred ``size`` crop (padded like :func:`random_crop`)."""
  volume, _ = _pad_to(volume, size, float(volume.min()))
  if label_map is not None:
    label_map, _ = _pad_to(label_map, size, 0)
  start = [(n - s) // 2 for n, s in zip(volume.shape[:3], size)]
  window = tuple(slice(b, b + s) for b, s in zip(start, size))
  return volume[window], None if label_map is None else label_map[window]


def random_flips(volume: np.ndarray, label_map: np.ndarray | None, rng: np.random.Generator):
  """Flips each of the three spatial axes with probability 1/2 (image and labels alike)."""
  axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
  if not axes:
    return volume, label_map
  return (np.flip(volume, axes), None if label_map is None else np.flip(label_map, axes))


# ----------------------------------------------------------------------------
# Geometry: resampling and orientation.


def resample(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float],
             order: int) -> np.ndarray:
  """Resamples ``volume [D, H, W(, C)]`` from ``spacing`` to ``target`` spacing (mm, z y x):
  ``order=1`` trilinear (images), ``order=0`` nearest (label maps). Voxel centres are aligned on
  the volume's first corner (the field of view is kept, the size rounded)."""
  spacing, target = np.asarray(spacing, np.float64), np.asarray(target, np.float64)
  if np.allclose(spacing, target):
    return volume
  shape = np.maximum(np.rint(np.asarray(volume.shape[:3]) * spacing / target), 1).astype(int)
  # Output voxel i sits at (i + 0.5) * target - 0.5 * spacing in input-voxel-0 units / spacing.
  coords = [((np.arange(n) + 0.5) * t / s - 0.5) for n, t, s in zip(shape, target, spacing)]
  grid = np.meshgrid(*coords, indexing="ij")
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  (heavy; every CLI process imports this module)
  def one(x):
    return ndimage.map_coordinates(x, grid, order=order, mode="nearest")
  if volume.ndim == 4:
    return np.stack([one(volume[..., c]) for c in range(volume.shape[-1])], -1).astype(volume.dtype)
  return one(volume).astype(volume.dtype)


def orientation(affine: np.ndarray) -> list[tuple[int, int]]:
  """For each array axis of a volume whose ``affine`` maps (i, j, k, 1) to LPS mm: the (world
  axis, sign) it runs along (the world axis with the largest component, each used once)."""
  m = np.abs(np.asarray(affine, np.float64)[:3, :3])
  out, used = [None] * 3, set()
  for axis in np.argsort(-m.max(0)):        # most clear-cut array axes first
    world = next(int(w) for w in np.argsort(-m[:, axis]) if int(w) not in used)
    used.add(world)
    out[int(axis)] = (world, 1 if affine[world, axis] >= 0 else -1)
  return out


def to_canonical(volume: np.ndarray, affine: np.ndarray, spacing: Sequence[float] | None = None):
  """Reorders and flips the first three axes of ``volume`` (voxel -> LPS ``affine``) into the
  canonical (z, y, x) = (S, P, L) frame; returns it and the (z, y, x) spacing."""
  ornt = orientation(affine)
  lengths = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
  # canonical array axis c (0: z = world 2, 1: y = world 1, 2: x = world 0) <- source axis
  src = [next(a for a, (w, _) in enumerate(ornt) if w == 2 - c) for c in range(3)]
  x = np.transpose(volume, src + list(range(3, volume.ndim)))
  flips = tuple(c for c in range(3) if ornt[src[c]][1] < 0)
  if flips:
    x = np.flip(x, flips)
  spacing = tuple(float(lengths[a]) for a in src) if spacing is None else tuple(spacing[a] for a in src)
  return np.ascontiguousarray(x), spacing


RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class VolumeTransform:
  """The per-record volume work of the train (``train=True``: random crop, flips, jitter) and eval
  (centre crop) pipelines: normalise, crop, augment; -> ``{'image': float32 [D, H, W, C]}`` (+
  ``'label_map'`` int32 [D, H, W] when ``spec.labels``)."""
  spec: VolumeSpec
  modality_names: tuple[str, ...]
  flip: bool = True
  train: bool = True

  def __call__(self, record: dict[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    spec = self.spec
    modality = int(record.get("modality", 0))
    name = self.modality_names[modality] if 0 <= modality < len(self.modality_names) else ""
    image = normalize_intensity(record["image"], scheme_for(spec.intensity, name), spec)
    label_map = record.get("label_map") if spec.labels else None
    if spec.labels and label_map is None:
      raise ValueError("data.volume.labels=True but the record has no label map (manifest column "
                       "'label_map', or source 'phantoms')")
    if self.train:
      image, label_map = random_crop(image, label_map, spec.size, rng, spec.foreground_prob)
      if self.flip:
        image, label_map = random_flips(image, label_map, rng)
      image = intensity_jitter(image, rng, spec.jitter)
    else:
      image, label_map = center_crop(image, label_map, spec.size)
    out = {"image": np.ascontiguousarray(image, np.float32)}
    if label_map is not None:
      out["label_map"] = np.ascontiguousarray(label_map, np.int32)
    return out
