"""Random-access sources of real images: class-per-subfolder trees, CSV/JSONL manifests, TFDS.

Every source returns records shaped like :class:`~medfm_jax.data.phantoms.PhantomSource`'s, so the
pipeline, objectives and evaluators work unchanged::

  image     uint8 [H, W, channels]   (after data.window / data.channels / data.resize)
  label     int32   class index into ``source.class_names`` (sorted names); -1 = no label
  finding   int32   = label (the key the pipeline batches)
  modality  int32   index into ``source.modality_names`` (0 = unknown)
  caption, patient_id, path   str;   frame int32;   index int64
  skipped   int32   only with on_error='skip': bad records passed over to reach this one

Multi-frame DICOM files contribute one record per frame. Without explicit splits (a ``split``
column or ``root/<split>/`` folders) examples are split by patient (:func:`assign_splits`): no
patient in two splits, deterministic given the seed.

``on_error='raise'`` raises :class:`~medfm_jax.data.decode.DataError` (``PATH: reason``);
``'skip'`` takes the next readable record (index + 1, + 2, ...; deterministic), appends
``PATH<TAB>reason`` to the ``skip_log`` file and counts it in the record's ``skipped``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from medfm_jax import storage
from medfm_jax.data import decode
from medfm_jax.data.decode import DataError
from medfm_jax.errors import ConfigError

ON_ERROR = ("raise", "skip")
SPLIT_DIRS = ("train", "val", "validation", "test")
MANIFEST_COLUMNS = ("path", "label", "caption", "patient_id", "modality", "split", "mask")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One example: a file (and frame) with its metadata (label and modality as names)."""
  path: str
  label: str = ""
  caption: str = ""
  patient_id: str = ""
  modality: str = ""
  split: str = ""
  frame: int = 0
  mask: str = ""            # segmentation mask PNG (0 = background, k > 0 = object k)


# ----------------------------------------------------------------------------
# Splits.


def parse_splits(spec: str | Mapping[str, float]) -> dict[str, float]:
  """``"train:0.9,val:0.1"`` (or a dict) -> {split: fraction}; fractions > 0 summing to 1."""
  try:
    if isinstance(spec, str):
      pairs = [p.split(":") for p in spec.split(",") if p.strip()]
      out = {name.strip(): float(frac) for name, frac in pairs}
    else:
      out = {str(k): float(v) for k, v in dict(spec).items()}
  except ValueError:
    out = {}
  if not out or any(v <= 0 for v in out.values()) or abs(sum(out.values()) - 1) > 1e-6:
    raise ValueError(f"data.splits={spec!r}: expected 'name:fraction,...' with fractions > 0 "
                     "summing to 1, e.g. 'train:0.9,val:0.05,test:0.05'")
  return out


def parse_splits_counts(spec: str) -> dict[str, int]:
  """``"train:1000,val:100"`` -> {split: count}; counts > 0."""
  try:
    out = {n.strip(): int(c) for n, c in (p.split(":") for p in spec.split(",") if p.strip())}
  except ValueError:
    out = {}
  if not out or any(v <= 0 for v in out.values()):
    raise ValueError(f"--num_examples={spec!r}: expected 'split:count,...' with counts > 0")
  return out


def assign_splits(groups: Sequence[str], fractions: Mapping[str, float], seed: int) -> list[str]:
  """Split name per example; all examples of a group (patient) land in the same split.

  Groups are shuffled by ``seed`` and laid end to end; a group goes to the split whose share
  of the examples (in ``fractions`` order) its first example falls into. Deterministic in
  (the multiset of groups, fractions, seed), independent of the listing order.
  """
  names, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
  order = np.random.default_rng(int(seed)).permutation(len(names))
  bounds = np.cumsum(list(fractions.values())) * len(groups)
  split_of, position = {}, 0
  for g in order:
    k = min(int(np.searchsorted(bounds, position, side="right")), len(bounds) - 1)
    split_of[names[g]] = list(fractions)[k]
    position += counts[g]
  return [split_of[str(g)] for g in groups]


def select_split(entries: Sequence[Entry], split: str, fractions: Mapping[str, float],
                 seed: int, where: str) -> list[Entry]:
  """Entries of ``split``: by their own ``split`` field if any has one, else by patient."""
  if any(e.split for e in entries):
    chosen = [e for e in entries if e.split == split]
    known = sorted({e.split for e in entries})
  else:
    groups = [e.patient_id or e.path for e in entries]
    chosen = [e for e, s in zip(entries, assign_splits(groups, fractions, seed)) if s == split]
    known = list(fractions)
  if split not in known:
    raise ConfigError(f"{where}: no split {split!r} (data.train_split / data.eval_split); available: "
                      f"{', '.join(known)}")
  return chosen


# ----------------------------------------------------------------------------
# Listing.


def _expand_frames(entries: Sequence[Entry], on_error: str) -> list[Entry]:
  """One entry per DICOM frame; PatientID/Modality filled from the header when missing."""
  out = []
  for e in entries:
    if decode.EXTENSIONS.get(decode.extension(e.path)) != "dicom":
      out.append(e)
      continue
    try:
      info = decode.dicom_info(e.path)
    except DataError:
      if on_error == "raise":
        raise
      out.append(e)          # reported (and skipped) when read
      continue
    e = dataclasses.replace(e, patient_id=e.patient_id or info.patient_id,
                            modality=e.modality or info.modality)
    out.extend(dataclasses.replace(e, frame=f) for f in range(info.frames))
  return out


def _is_data_file(path: str) -> bool:
  ext = decode.extension(path)
  if ext not in decode.EXTENSIONS:
    return False
  if ext:
    return True
  try:   # no extension: only DICOM files (by content)
    with epath.Path(path).open("rb") as f:
      return decode.sniff(f.read(132)) == "dicom"
  except OSError:
    return False


def _files_under(folder: epath.Path) -> list[str]:
  """Every file below ``folder``, hidden folders skipped. (Not ``epath.Path.walk``: through fsspec
  it yields folder names without their ``gs://``.)"""
  files = []
  for child in folder.iterdir():
    if child.is_dir():
      files += [] if child.name.startswith(".") else _files_under(child)
    else:
      files.append(str(child))
  return files


MASK_SUFFIX = "_mask"   # folder sources: IMAGE_STEM + "_mask.png" (or ".dcm", DICOM SEG) beside the image


def _pair_masks(paths: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(image files, image -> mask file) of one folder's files: ``<stem>_mask.png`` / ``.dcm`` is
  the mask of the image ``<stem>.<ext>`` beside it (a ``*_mask.*`` file without such an image is an
  image itself)."""
  by_stem = {}
  for q in paths:
    by_stem.setdefault(os.path.splitext(q)[0], []).append(q)
  masks = {}
  for q in paths:
    stem, ext = os.path.splitext(q)
    if stem.endswith(MASK_SUFFIX) and ext.lower() in (".png", ".dcm"):
      images = [i for i in by_stem.get(stem[:-len(MASK_SUFFIX)], []) if i != q]
      if images:
        masks[sorted(images)[0]] = q
  taken = set(masks.values())
  return [q for q in paths if q not in taken], masks


def list_folder(root: str, on_error: str = "raise") -> tuple[list[Entry], list[str]]:
  """Entries of a class-per-subfolder tree (``root/<class>/**/<file>``) and the class names.

  With split folders (``root/train/<class>/...``, ``root/val/...``) entries carry their split
  and the class names are the union over splits. Hidden files and files with other extensions
  are ignored (counted in a warning). A segmentation mask of an image is the file beside it named
  ``<image stem>_mask.png`` (a PNG label map: 0 background, k > 0 object k) or ``_mask.dcm`` (a
  DICOM SEG, segment k = object k); it is not an image entry. ``root`` is a local folder or a URL.
  """
  top_dir = storage.path(root)
  if not top_dir.is_dir():
    raise ValueError(f"data.path={root!r}: not a directory")
  subdirs = lambda d: sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
  split_dirs = [d for d in subdirs(top_dir) if d in SPLIT_DIRS]
  layout = [(d, top_dir / d) for d in split_dirs] if split_dirs else [("", top_dir)]
  entries, ignored, classes = [], 0, set()
  for split, base in layout:
    for label in subdirs(base):
      classes.add(label)
      images, masks = _pair_masks(sorted(_files_under(base / label)))
      for path in images:
        if epath.Path(path).name.startswith(".") or not _is_data_file(path):
          ignored += 1
          continue
        entries.append(Entry(path, label=label, split=split, mask=masks.get(path, "")))
  if ignored:
    logging.warning("%s: ignored %d files that are not PNG/JPEG/TIFF/DICOM", root, ignored)
  if not entries:
    raise ValueError(f"data.path={root!r}: no image files in class subfolders "
                     "(expected ROOT/<class>/<file> or ROOT/<split>/<class>/<file>)")
  return _expand_frames(entries, on_error), sorted(classes)


def read_manifest(path: str, on_error: str = "raise") -> list[Entry]:
  """Entries of a CSV (header row) or JSONL manifest with columns ``path`` (relative to the
  manifest's folder or absolute) and optional ``label, caption, patient_id, modality, split,
  mask`` (a PNG label map of the image: 0 background, k > 0 object k; or a DICOM SEG, segment
  k = object k); the manifest and its files
  are local or URLs."""
  manifest = storage.path(path)
  if not manifest.is_file():
    raise ValueError(f"data.path={path!r}: manifest file not found")
  base = manifest.parent
  with io.StringIO(storage.read_text(manifest), newline="") as f:
    if path.lower().endswith((".jsonl", ".json")):
      try:
        rows = [json.loads(line) for line in f if line.strip()]
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
      rows = list(csv.DictReader(f))
  entries = []
  for line, row in enumerate(rows, start=2):
    if not isinstance(row, dict) or not row.get("path"):
      raise ValueError(f"{path}: row {line - 1}: missing 'path' (columns: "
                       f"{', '.join(MANIFEST_COLUMNS)})")
    unknown = set(row) - set(MANIFEST_COLUMNS)
    if unknown:
      raise ValueError(f"{path}: unknown column(s) {sorted(unknown)}; allowed: "
                       f"{', '.join(MANIFEST_COLUMNS)}")
    fields = {k: str(row.get(k) if row.get(k) is not None else "").strip()
              for k in MANIFEST_COLUMNS}
    resolve = lambda q: q if not q or storage.is_url(q) or os.path.isabs(q) else str(base / q)
    p = resolve(fields.pop("path"))
    fields["mask"] = resolve(fields["mask"])
    entries.append(Entry(p, **fields))
  if not entries:
    raise ValueError(f"{path}: manifest has no rows")
  return _expand_frames(entries, on_error)


def class_names_of(labels: Sequence[str]) -> list[str]:
  """Sorted distinct names (numerically when all are integers)."""
  names = sorted(set(labels))
  if all(n.lstrip("-").isdigit() for n in names):
    names = sorted(names, key=int)
  return names


# ----------------------------------------------------------------------------
# Sources.


def skip_log_path(workdir: str, process_index: int = 0) -> str:
  """``WORKDIR/skipped_files.txt`` (process 0) or ``skipped_files.p<i>.txt``."""
  name = "skipped_files.txt" if process_index == 0 else f"skipped_files.p{process_index}.txt"
  return str(storage.path(workdir) / name)


def _data_error(path: str, error: Exception) -> DataError:
  """``error`` raised on the data of ``path`` as a DataError (ValueErrors name their field)."""
  if isinstance(error, DataError):
    return error
  return DataError(path, str(error) if isinstance(error, ValueError)
                   else f"{type(error).__name__}: {error}")


class RobustSource:
  """Base: index -> record with the ``on_error`` policy around ``_load`` (subclasses)."""
  name = "source"

  def __init__(self, num_examples: int, on_error: str = "raise", skip_log: str | None = None):
    if on_error not in ON_ERROR:
      raise ValueError(f"data.on_error={on_error!r}: allowed {', '.join(ON_ERROR)}")
    self.num_examples, self.on_error, self.skip_log = int(num_examples), on_error, skip_log
    self._pid = os.getpid()   # the process that built the source (not a grain worker)

  def __len__(self) -> int:
    return self.num_examples

  def _load(self, index: int) -> dict:
    raise NotImplementedError

  def _skip(self, error: DataError) -> None:
    logging.warning("skipping bad data: %s", error)
    if self.skip_log:
      storage.append_text(self._skip_log_here(), f"{error.path}\t{error.reason}\n")

  def _skip_log_here(self) -> str:
    """The skip log, or in a grain worker process with a URL log ``<stem>.worker<pid>.txt`` beside
    it: an object is appended by rewriting it, so processes sharing one would drop lines (local
    files are appended atomically)."""
    if os.getpid() == self._pid or not storage.is_url(self.skip_log):
      return self.skip_log
    return f"{self.skip_log.removesuffix('.txt')}.worker{os.getpid()}.txt"

  def __getitem__(self, index: int) -> dict:
    index, n = int(index), self.num_examples
    if not 0 <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range [0, {n})")
    for j in range(n):
      try:
        record = self._load((index + j) % n)
      except DataError as e:
        if self.on_error == "raise":
          raise
        self._skip(e)
        continue
      if self.on_error == "skip":
        record["skipped"] = np.int32(j)
      return record
    raise DataError(self.name, f"all {n} records failed to load (see {self.skip_log})")


class FileSource(RobustSource):
  """Records decoded from files (folder trees and manifests)."""

  def __init__(self, entries: Sequence[Entry], class_names: Sequence[str],
               preprocess: decode.Preprocess, on_error: str = "raise",
               skip_log: str | None = None, name: str = "files",
               modality_names: Sequence[str] | None = None):
    super().__init__(len(entries), on_error, skip_log)
    self.entries = tuple(entries)
    self.class_names = tuple(class_names)
    if modality_names is None:
      modality_names = class_names_of([e.modality for e in entries if e.modality])
    self.modality_names = tuple(modality_names) or ("unknown",)
    self.preprocess, self.name = preprocess, name
    self._labels = {c: i for i, c in enumerate(self.class_names)}
    self._modalities = {m: i for i, m in enumerate(self.modality_names)}

  def _load(self, index: int) -> dict:
    e = self.entries[index]
    decoded = decode.decode(decode.read_file(e.path), e.path, e.frame)
    try:
      image = self.preprocess(decoded)
    except Exception as err:  # any failure on a file's pixels is that file's data error
      raise _data_error(e.path, err) from None
    label = self._labels.get(e.label, -1)
    record = {"image": image, "label": np.int32(label), "finding": np.int32(label),
              "modality": np.int32(self._modalities.get(e.modality, 0)), "caption": e.caption,
              "patient_id": e.patient_id, "path": e.path, "frame": np.int32(e.frame),
              "index": np.int64(index)}
    return {**record, **read_mask(e.mask, image.shape[:2])} if e.mask else record

  def __repr__(self) -> str:
    return (f"FileSource({self.name}, {len(self)} examples, {len(self.class_names)} classes, "
            f"on_error={self.on_error!r})")


SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"   # DICOM Segmentation Storage


def _seg_label_map(data: bytes, path: str) -> np.ndarray:
  """The label map of a 2-D DICOM SEG (any writer): pixels of segment k -> k (a later segment wins
  where they overlap); FRACTIONAL segments count above half their maximum."""
  import pydicom  # optional: the 'dicom' extra  pylint: disable=import-outside-toplevel
  try:
    ds = pydicom.dcmread(io.BytesIO(data))
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
      raise DataError(path, f"a DICOM mask must be a Segmentation (SOP class {SEG_SOP_CLASS}), "
                            f"got {ds.get('SOPClassUID', 'none')}")
    frames = np.asarray(ds.pixel_array)
    groups = ds.PerFrameFunctionalGroupsSequence
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as err:
    if isinstance(err, DataError):
      raise
    raise DataError(path, f"cannot read the DICOM SEG ({err})") from None
  frames = frames.reshape(-1, *frames.shape[-2:])
  if len(groups) != len(frames):
    raise DataError(path, f"DICOM SEG has {len(frames)} frames but {len(groups)} per-frame groups")
  threshold = 0.5 * float(ds.get("MaximumFractionalValue", 1)) if ds.get("SegmentationType") == "FRACTIONAL" else 0
  ids = np.zeros(frames.shape[1:], np.int64)
  for frame, group in zip(frames, groups):
    ids[frame > threshold] = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
  return ids


def read_mask(path: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
  """A PNG label map or a DICOM SEG (segment numbers as labels) -> the phantoms' mask record
  fields: ``lesion_ids`` (the objects 1..k), ``masks`` [H, W, 3] (objects, the whole image as
  'body', no organ); resized to ``shape`` by nearest neighbour when the image was resized."""
  data = decode.read_file(path)
  if decode.sniff(data[:132]) == "dicom":
    ids = _seg_label_map(data, path)
  else:
    try:
      with Image.open(io.BytesIO(data)) as im:
        ids = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)
    except OSError as err:
      raise DataError(path, f"cannot decode the mask PNG ({err})") from None
  return label_map_record(ids, shape, path)


def label_map_record(ids: np.ndarray, shape: tuple[int, int], path: str) -> dict[str, np.ndarray]:
  """A label map [H, W] (or [H, W, 1]) -> ``lesion_ids`` and ``masks`` (see :func:`read_mask`)."""
  ids = ids[..., 0] if ids.ndim == 3 and ids.shape[-1] == 1 else ids
  if ids.ndim != 2:
    raise DataError(path, f"mask must be a single-channel label map, got shape {ids.shape}")
  if ids.max() > 255:
    raise DataError(path, f"mask has label {ids.max()}; at most 255 objects per image")
  h, w = ids.shape
  if (h, w) != tuple(shape):
    rows = ((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64)
    ids = ids[rows][:, cols]
  ids = ids.astype(np.uint8)
  masks = np.stack([ids > 0, np.ones_like(ids, bool), np.zeros_like(ids, bool)], -1).astype(np.uint8)
  return {"lesion_ids": ids, "masks": masks}


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  return "" if value is None else str(value)


class TfdsSource(RobustSource):
  """A TFDS dataset read through ``tfds.data_source`` (array_record; TensorFlow not needed).

  Images are taken encoded (``SkipDecoding``) and decoded here, so 16-bit PNGs work with
  Pillow alone. ``label_key`` may name a ClassLabel (its names become ``class_names``). A ``mask``
  feature (``data.build`` of masked images) gives the record's ``lesion_ids`` / ``masks``.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, preprocess: decode.Preprocess,
               image_key: str = "image", label_key: str = "label", caption_key: str = "caption",
               on_error: str = "raise", skip_log: str | None = None):
    import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
    try:
      ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
      raise ValueError(f"data.name={name!r} split={split!r} data_dir={data_dir!r}: cannot open "
                       f"the TFDS dataset ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    features = ds.dataset_info.features
    for key, field in ((image_key, "data.image_key"),):
      if key not in features:
        raise ValueError(f"{field}={key!r}: not a feature of {name}; features: {', '.join(features)}")
    super().__init__(len(ds), on_error, skip_log)
    self._ds, self.preprocess, self.name = ds, preprocess, f"{name}/{split}"
    self.keys = (image_key, label_key, caption_key)
    self.class_names = tuple(getattr(features[label_key], "names", ()) if label_key in features else ())
    self.modality_names = tuple(getattr(features["modality"], "names", ()) if "modality" in features
                                else ()) or ("unknown",)

  def _load(self, index: int) -> dict:
    image_key, label_key, caption_key = self.keys
    where = f"{self.name}[{index}]"
    try:
      raw = self._ds[index]
    except Exception as e:
      raise DataError(where, f"cannot read record ({type(e).__name__}: {e})") from None
    pixels = raw[image_key]
    try:
      decoded = (decode.decode(pixels, where, check_extension=False) if isinstance(pixels, bytes)
                 else decode.Decoded(np.asarray(pixels).reshape(*np.shape(pixels)[:2], -1)))
      image = self.preprocess(decoded)
    except DataError:
      raise
    except Exception as e:  # any failure on a record's pixels is that record's data error
      raise _data_error(where, e) from None
    label = int(raw.get(label_key, -1))
    modality = raw.get("modality", 0)
    mask = label_map_record(np.asarray(raw["mask"]), image.shape[:2], where) if "mask" in raw else {}
    return {**mask, "image": image, "label": np.int32(label), "finding": np.int32(label),
            "modality": np.int32(modality if isinstance(modality, (int, np.integer)) else 0),
            "caption": _text(raw.get(caption_key)), "patient_id": _text(raw.get("patient_id")),
            "path": _text(raw.get("path")) or where, "frame": np.int32(0), "index": np.int64(index)}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {len(self)} examples, on_error={self.on_error!r})"


@functools.lru_cache(maxsize=8)
def _listing(kind: str, path: str, on_error: str) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
  """(entries, class names) of a folder or manifest, listed once per process (the train and
  eval sources of every split share it; DICOM headers are read here)."""
  if kind == "folder":
    entries, classes = list_folder(path, on_error)
  else:
    entries = read_manifest(path, on_error)
    classes = class_names_of([e.label for e in entries if e.label])
  return tuple(entries), tuple(classes)


def make_file_source(spec, split: str, num_examples: int | None = None,
                     skip_log: str | None = None) -> RobustSource:
  """``spec.source`` in folder | manifest | tfds -> the source of ``split`` (``spec``: the resolved
  ``data.spec.DataSpec``)."""
  kind, on_error, preprocess = spec.source, spec.on_error, spec.preprocess
  if kind == "tfds":
    source = TfdsSource(spec.name, split, spec.data_dir, preprocess, spec.image_key,
                        spec.label_key, spec.caption_key, on_error, skip_log)
  else:
    path = spec.path
    entries, classes = _listing(kind, path, on_error)
    modalities = class_names_of([e.modality for e in entries if e.modality])
    entries = select_split(entries, split, parse_splits(spec.splits), spec.split_seed,
                           f"data.path={path!r}")
    if not entries:
      raise ValueError(f"data.path={path!r}: split {split!r} is empty")
    source = FileSource(entries, classes, preprocess, on_error, skip_log, f"{path}[{split}]",
                        modalities)
  if num_examples is not None:
    if not 0 < num_examples <= len(source):
      raise ValueError(f"num_examples={num_examples}: must be in [1, {len(source)}] "
                       f"(size of {source.name})")
    source.num_examples = int(num_examples)
  return source
