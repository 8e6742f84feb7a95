"""Random-access sources of 3D volumes: NIfTI files and DICOM series, in folders or manifests.

Records are shaped like :class:`~medfm_jax.data.phantoms3d.VolumePhantomSource`'s::

  image      float32 [D, H, W, 1]  modality values (HU for CT), canonical frame, target spacing
  label_map  uint8 [D, H, W]       only when the entry has one (manifest column ``label_map``)
  spacing    float32 [3]           (z, y, x) mm after resampling
  label = finding int32, modality int32, caption, patient_id, path str, index int64
  skipped    int32                 only with on_error='skip'

Readers:

* NIfTI (``.nii``, ``.nii.gz``) through ``nibabel`` (the ``volume`` extra); its RAS affine is
  turned into LPS.
* DICOM series: every DICOM file of a series folder (or of a class folder) is read, files are
  grouped by SeriesInstanceUID, slices sorted by their ImagePositionPatient projected on the slice
  normal (the cross product of the ImageOrientationPatient cosines), the slice spacing taken from
  those positions (not SliceThickness; uneven spacing is an error) and RescaleSlope/Intercept
  applied per slice.

Then every volume is turned to the canonical frame (``volumes.to_canonical``: array (z, y, x) =
(S, P, L), i.e. LPS) and resampled to ``data.volume.spacing`` (trilinear; label maps nearest).

Layouts: ``data.source='folder'``: ``ROOT/<class>/<file.nii[.gz]>`` and
``ROOT/<class>/<series folder>/<DICOM files>`` (optional ``ROOT/<split>/<class>/...``);
``data.source='manifest'``: CSV/JSONL with ``path`` (a NIfTI file or a DICOM series folder) and
optional ``label_map`` (a NIfTI label map on the same grid), ``label``, ``caption``,
``patient_id``, ``modality``, ``split``. Bad files follow ``data.on_error`` like 2D sources.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import io
import json
import os
from typing import Sequence

import numpy as np
from absl import logging
from etils import epath

from medfm_jax import storage
from medfm_jax.data import decode, sources, volumes
from medfm_jax.data.decode import DataError
from medfm_jax.errors import ConfigError

NIFTI = (".nii", ".nii.gz")
# A volume's label map is its own column (the 2-D manifest's "mask" is a PNG per image).
VOLUME_MANIFEST_COLUMNS = (*(c for c in sources.MANIFEST_COLUMNS if c != "mask"), "label_map")


def is_nifti(path: str) -> bool:
  return str(path).lower().endswith(NIFTI)


@dataclasses.dataclass(frozen=True)
class VolumeEntry:
  """One volume: a NIfTI file or a DICOM series (folder + SeriesInstanceUID), with metadata."""
  path: str
  label: str = ""
  caption: str = ""
  patient_id: str = ""
  modality: str = ""
  split: str = ""
  label_map: str = ""
  series_uid: str = ""                 # DICOM series: which series of the folder


# ----------------------------------------------------------------------------
# Readers: -> (array [i, j, k(, c)] float32, 4x4 affine voxel -> LPS mm).


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A NIfTI-1/2 file (local or URL, gzipped or not) -> (data, LPS affine)."""
  import nibabel  # optional dependency (the 'volume' extra); pylint: disable=g-import-not-at-top
  data = decode.read_file(path)
  try:
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
    image = None
    for cls in (nibabel.Nifti1Image, nibabel.Nifti2Image):
      try:
        image = cls.from_bytes(data)
        break
      except Exception:  # pylint: disable=broad-except  (the other NIfTI version is tried)
        continue
    if image is None:
      raise ValueError("not a NIfTI-1/2 file")
    array = np.asarray(image.dataobj, dtype=np.float32)   # scl_slope / scl_inter applied
  except (OSError, ValueError, EOFError) as e:
    raise DataError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from None
  if array.ndim == 4 and array.shape[3] == 1:
    array = array[..., 0]
  if array.ndim != 3:
    raise DataError(path, f"NIfTI data of shape {array.shape}: expected a 3D volume")
  return array, volumes.RAS_TO_LPS @ image.affine


def _dicom_header(path: str):
  import pydicom  # optional dependency (the 'dicom' extra); pylint: disable=g-import-not-at-top
  try:
    return pydicom.dcmread(io.BytesIO(decode.read_file(path)), force=True)
  except Exception as e:  # pylint: disable=broad-except  (pydicom raises many kinds)
    raise DataError(path, f"cannot read DICOM ({type(e).__name__}: {e})") from None


def series_geometry(datasets: Sequence, where: str) -> tuple[list[int], np.ndarray]:
  """(slice order, LPS affine of the sorted stack ``[slice, row, col]``) from the headers:
  slices sorted by ImagePositionPatient along the normal of ImageOrientationPatient, slice
  spacing from those positions (uneven gaps or repeated positions are a DataError)."""
  try:
    orient = np.asarray(datasets[0].ImageOrientationPatient, np.float64)
    row_dir, col_dir = orient[:3], orient[3:]            # along a row (+col), along a column (+row)
    spacing_rows, spacing_cols = (float(v) for v in datasets[0].PixelSpacing)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
  except (AttributeError, TypeError, ValueError) as e:
    raise DataError(where, f"DICOM series without usable geometry ({type(e).__name__}: {e}); "
                    "needs ImageOrientationPatient, ImagePositionPatient, PixelSpacing") from None
  normal = np.cross(row_dir, col_dir)
  along = positions @ normal
  order = [int(i) for i in np.argsort(along, kind="stable")]
  gaps = np.diff(along[order])
  if len(datasets) > 1:
    step = float(np.median(gaps))
    if step <= 1e-6 or np.abs(gaps - step).max() > max(0.01 * step, 1e-3):
      raise DataError(where, f"DICOM series slice positions are not evenly spaced along the "
                      f"normal (gaps {np.round(gaps, 3).tolist()[:8]} mm)")
  else:
    step = float(getattr(datasets[0], "SpacingBetweenSlices", 0) or
                 getattr(datasets[0], "SliceThickness", 1) or 1)
  affine = np.eye(4)
  affine[:3, 0] = normal * step
  affine[:3, 1] = col_dir * spacing_rows
  affine[:3, 2] = row_dir * spacing_cols
  affine[:3, 3] = positions[order[0]]
  return order, affine


def read_dicom_series(files: Sequence[str], series_uid: str, where: str) -> tuple[np.ndarray, np.ndarray]:
  """The slices of ``files`` that belong to ``series_uid`` -> (stack [slice, row, col] of modality
  values, LPS affine)."""
  datasets = [ds for ds in (_dicom_header(f) for f in files)
              if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid]
  if not datasets:
    raise DataError(where, f"no DICOM files of series {series_uid}")
  order, affine = series_geometry(datasets, where)
  slices = []
  for i in order:
    ds = datasets[i]
    try:
      pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(where, f"cannot decode DICOM pixels ({type(e).__name__}: {e})") from None
    slope, intercept = decode.dicom_rescale(ds)
    slices.append(pixels * slope + intercept)
  shapes = {s.shape for s in slices}
  if len(shapes) != 1:
    raise DataError(where, f"DICOM series {series_uid} mixes slice shapes {sorted(shapes)}")
  return np.stack(slices), affine


# ----------------------------------------------------------------------------
# Listing.


def _dicom_series_in(folder: str, on_error: str) -> dict[str, tuple[list[str], str, str]]:
  """{SeriesInstanceUID: (files, patient id, modality)} of the DICOM files below ``folder``."""
  found: dict[str, tuple[list[str], str, str]] = {}
  for path in sorted(sources._files_under(storage.path(folder))):  # pylint: disable=protected-access
    if is_nifti(path) or decode.extension(path) not in ("", ".dcm", ".dicom"):
      continue
    try:
      ds = _dicom_header(path)
      uid = str(ds.SeriesInstanceUID)
    except (DataError, AttributeError) as e:
      if on_error == "raise":
        raise e if isinstance(e, DataError) else DataError(path, "DICOM file without SeriesInstanceUID") from None
      logging.warning("skipping bad data: %s", e)
      continue
    files, _, _ = found.setdefault(uid, ([], str(getattr(ds, "PatientID", "")), str(getattr(ds, "Modality", ""))))
    files.append(path)
  return found


def list_volume_folder(root: str, on_error: str = "raise") -> tuple[list[VolumeEntry], list[str]]:
  """Entries of ``ROOT/<class>/...`` (or ``ROOT/<split>/<class>/...``): each NIfTI file and each
  DICOM series below a class folder is one volume; and the class names."""
  top = storage.path(root)
  if not top.is_dir():
    raise ValueError(f"data.path={root!r}: not a directory")
  subdirs = lambda d: sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
  split_dirs = [d for d in subdirs(top) if d in sources.SPLIT_DIRS]
  layout = [(d, top / d) for d in split_dirs] if split_dirs else [("", top)]
  entries, classes = [], set()
  for split, base in layout:
    for label in subdirs(base):
      classes.add(label)
      folder = base / label
      for path in sorted(sources._files_under(folder)):  # pylint: disable=protected-access
        if is_nifti(path) and not epath.Path(path).name.startswith("."):
          entries.append(VolumeEntry(path, label=label, split=split))
      for uid, (files, patient, modality) in _dicom_series_in(str(folder), on_error).items():
        entries.append(VolumeEntry(str(epath.Path(files[0]).parent), label=label, split=split,
                                   patient_id=patient, modality=modality, series_uid=uid))
  if not entries:
    raise ValueError(f"data.path={root!r}: no NIfTI files or DICOM series in class subfolders "
                     "(expected ROOT/<class>/<file.nii.gz> or ROOT/<class>/<series>/<files>)")
  return entries, sorted(classes)


def read_volume_manifest(path: str, on_error: str = "raise") -> list[VolumeEntry]:
  """Entries of a CSV/JSONL manifest of volumes (columns :data:`VOLUME_MANIFEST_COLUMNS`; ``path``
  and ``label_map`` relative to the manifest's folder or absolute)."""
  manifest = storage.path(path)
  if not manifest.is_file():
    raise ValueError(f"data.path={path!r}: manifest file not found")
  text = storage.read_text(manifest)
  if path.lower().endswith((".jsonl", ".json")):
    try:
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
  else:
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
  base, entries = manifest.parent, []
  resolve = lambda p: p if not p or storage.is_url(p) or os.path.isabs(p) else str(base / p)
  for n, row in enumerate(rows, start=1):
    if not isinstance(row, dict) or not row.get("path"):
      raise ValueError(f"{path}: row {n}: missing 'path' (columns: {', '.join(VOLUME_MANIFEST_COLUMNS)})")
    unknown = set(row) - set(VOLUME_MANIFEST_COLUMNS)
    if unknown:
      raise ValueError(f"{path}: unknown column(s) {sorted(unknown)}; allowed: "
                       f"{', '.join(VOLUME_MANIFEST_COLUMNS)}")
    fields = {k: str(row.get(k) if row.get(k) is not None else "").strip() for k in VOLUME_MANIFEST_COLUMNS}
    fields["path"], fields["label_map"] = resolve(fields["path"]), resolve(fields["label_map"])
    if is_nifti(fields["path"]):
      entries.append(VolumeEntry(**fields))
      continue
    series = _dicom_series_in(fields["path"], on_error) if storage.path(fields["path"]).is_dir() else {}
    if not series:
      err = DataError(fields["path"], "neither a NIfTI file (.nii, .nii.gz) nor a folder with a DICOM series")
      if on_error == "raise":
        raise err
      entries.append(VolumeEntry(**fields))      # reported (and skipped) when read
      continue
    for uid, (_, patient, modality) in series.items():
      entries.append(dataclasses.replace(VolumeEntry(**fields), series_uid=uid,
                                         patient_id=fields["patient_id"] or patient,
                                         modality=fields["modality"] or modality))
  if not entries:
    raise ValueError(f"{path}: manifest has no rows")
  return entries


# ----------------------------------------------------------------------------
# Source.


def load_volume(entry: VolumeEntry, spacing: Sequence[float] = ()) -> dict[str, np.ndarray]:
  """The entry's image (and label map) in the canonical frame at ``spacing`` (() = the file's):
  ``{'image': float32 [D, H, W, 1], 'spacing': float32 [3], 'label_map': uint8 [D, H, W]?}``."""
  if entry.series_uid:
    files = sorted(str(p) for p in sources._files_under(storage.path(entry.path)))  # pylint: disable=protected-access
    array, affine = read_dicom_series(files, entry.series_uid, entry.path)
  elif is_nifti(entry.path):
    array, affine = read_nifti(entry.path)
  else:
    raise DataError(entry.path, "neither a NIfTI file (.nii, .nii.gz) nor a folder with a DICOM series")
  image, native = volumes.to_canonical(array, affine)
  out = {}
  if entry.label_map:
    labels, label_affine = read_nifti(entry.label_map)
    if labels.shape != array.shape or not np.allclose(label_affine, affine, atol=1e-3):
      raise DataError(entry.label_map, f"label map grid {labels.shape} does not match its image "
                      f"{array.shape} (same shape and affine needed)")
    labels, _ = volumes.to_canonical(np.rint(labels).astype(np.int32), affine)
    if spacing:
      labels = volumes.resample(labels, native, spacing, order=0)
    out["label_map"] = labels.astype(np.uint8)
  if spacing:
    image = volumes.resample(image, native, spacing, order=1)
  out["image"] = image[..., None].astype(np.float32)
  out["spacing"] = np.asarray(spacing or native, np.float32)
  return out


class VolumeFileSource(sources.RobustSource):
  """Volumes of :class:`VolumeEntry` s, read, reoriented and resampled on access."""

  def __init__(self, entries: Sequence[VolumeEntry], class_names: Sequence[str],
               spacing: Sequence[float] = (), on_error: str = "raise", skip_log: str | None = None,
               name: str = "volumes", modality_names: Sequence[str] | None = None):
    super().__init__(len(entries), on_error, skip_log)
    self.entries, self.class_names, self.spacing, self.name = tuple(entries), tuple(class_names), tuple(spacing), name
    if modality_names is None:
      modality_names = sources.class_names_of([e.modality for e in entries if e.modality])
    self.modality_names = tuple(modality_names) or ("unknown",)
    self._labels = {c: i for i, c in enumerate(self.class_names)}
    self._modalities = {m: i for i, m in enumerate(self.modality_names)}

  def _load(self, index: int) -> dict:
    e = self.entries[index]
    try:
      record = load_volume(e, self.spacing)
    except DataError:
      raise
    except (ValueError, OSError) as err:   # e.g. resampling a degenerate grid
      raise DataError(e.path, f"{type(err).__name__}: {err}") from None
    label = self._labels.get(e.label, -1)
    return {**record, "label": np.int32(label), "finding": np.int32(label),
            "modality": np.int32(self._modalities.get(e.modality, 0)), "caption": e.caption,
            "patient_id": e.patient_id, "path": e.path, "index": np.int64(index)}

  def __repr__(self) -> str:
    return f"VolumeFileSource({self.name}, {len(self)} volumes, on_error={self.on_error!r})"


class TfdsVolumeSource(sources.RobustSource):
  """A volume dataset written by ``python -m medfm_jax.data.build --volume`` (array_record, read
  through ``tfds.data_source`` without TensorFlow); volumes are stored already canonical and
  resampled."""

  def __init__(self, name: str, split: str, data_dir: str | None, on_error: str = "raise",
               skip_log: str | None = None):
    import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
    try:
      ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"data.name={name!r} split={split!r} data_dir={data_dir!r}: cannot open the "
                       f"TFDS dataset ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    features = ds.dataset_info.features
    if "label_map" not in features or "spacing" not in features:
      raise ValueError(f"data.name={name!r}: not a volume dataset (build it with "
                       "python -m medfm_jax.data.build --volume)")
    super().__init__(len(ds), on_error, skip_log)
    self._ds, self.name = ds, f"{name}/{split}"
    self.class_names = tuple(features["label"].names)
    self.modality_names = tuple(features["modality"].names)

  def _load(self, index: int) -> dict:
    where = f"{self.name}[{index}]"
    try:
      raw = self._ds[index]
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(where, f"cannot read record ({type(e).__name__}: {e})") from None
    out = {"image": np.asarray(raw["image"], np.float32), "spacing": np.asarray(raw["spacing"], np.float32),
           "label": np.int32(raw["label"]), "finding": np.int32(raw["label"]),
           "modality": np.int32(raw["modality"]), "caption": sources._text(raw["caption"]),  # pylint: disable=protected-access
           "patient_id": sources._text(raw["patient_id"]), "path": sources._text(raw["path"]) or where,  # pylint: disable=protected-access
           "index": np.int64(index)}
    if np.size(raw["label_map"]):
      out["label_map"] = np.asarray(raw["label_map"], np.uint8)
    return out

  def __repr__(self) -> str:
    return f"TfdsVolumeSource({self.name}, {len(self)} volumes, on_error={self.on_error!r})"


@functools.lru_cache(maxsize=8)
def _listing(kind: str, path: str, on_error: str) -> tuple[tuple[VolumeEntry, ...], tuple[str, ...]]:
  if kind == "folder":
    entries, classes = list_volume_folder(path, on_error)
  else:
    entries = read_volume_manifest(path, on_error)
    classes = sources.class_names_of([e.label for e in entries if e.label])
  return tuple(entries), tuple(classes)


def make_volume_source(spec, split: str, num_examples: int | None = None,
                       skip_log: str | None = None) -> VolumeFileSource:
  """``spec.source`` folder | manifest | tfds with ``spec.volume`` set -> the volume source of
  ``split``."""
  if spec.source == "tfds":
    source = TfdsVolumeSource(spec.name, split, spec.data_dir, spec.on_error, skip_log)
    if num_examples is not None:
      source.num_examples = min(int(num_examples), len(source))
    return source
  if spec.source not in ("folder", "manifest"):
    raise ConfigError(f"data.source={spec.source!r} with data.volume: allowed phantoms, folder, manifest, tfds")
  entries, classes = _listing(spec.source, spec.path, spec.on_error)
  modalities = sources.class_names_of([e.modality for e in entries if e.modality])
  entries = sources.select_split(entries, split, sources.parse_splits(spec.splits), spec.split_seed,
                                 f"data.path={spec.path!r}")
  if not entries:
    raise ValueError(f"data.path={spec.path!r}: split {split!r} is empty")
  source = VolumeFileSource(entries, classes, spec.volume.spacing, spec.on_error, skip_log,
                            f"{spec.path}[{split}]", modalities)
  if num_examples is not None:
    if not 0 < num_examples <= len(source):
      raise ValueError(f"num_examples={num_examples}: must be in [1, {len(source)}] (size of {source.name})")
    source.num_examples = int(num_examples)
  return source
