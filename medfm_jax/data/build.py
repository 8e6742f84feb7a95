r"""Builds a TFDS-compatible array_record dataset from a folder, a manifest or the phantoms.

  python -m medfm_jax.data.build --source=folder --path=/data/cxr_png --out=/data/tfds \
      --name=cxr --splits=train:0.9,val:0.05,test:0.05
  python -m medfm_jax.data.build --source=manifest --path=/data/reports.csv --out=/data/tfds --name=rep
  python -m medfm_jax.data.build --source=phantoms --num_examples=train:2000,val:200 \
      --image_size=64 --out=/data/tfds --name=phantoms64

Writes ``OUT/NAME/VERSION/NAME-SPLIT.array_record-0000i-of-0000n`` plus TFDS metadata
(``dataset_info.json``, ``features.json``), readable with ``tfds.data_source`` or
``tfds.builder_from_directory`` WITHOUT TensorFlow, and by ``data.source='tfds'`` with
``data.name=NAME:VERSION data.data_dir=OUT``. Features: ``image`` (PNG, uint8 or with
``--bit_depth=16`` uint16), ``label`` and ``modality`` (ClassLabel, sorted names), ``caption``,
``patient_id``, ``path``, and ``mask`` (PNG label map) when the folder / manifest images have
masks (all of them). Images go through the same decoding and preprocessing as the folder
source (``--window``, ``--channels``, ``--resize``/``--size``); ``--window=full --bit_depth=16``
keeps 16-bit pixels unchanged. Without explicit splits (manifest ``split`` column, or
``ROOT/<split>/`` folders) examples are split by patient: no patient in two splits. The train
split's per-channel mean/std (of pixel / max value) are written to ``medfm_stats.json`` and
printed as config overrides.

Volume mode (``--volume``): NIfTI files / DICOM series of a folder or manifest (see
``data.volume_sources``; ``--spacing=z,y,x`` resamples), or ``--source=phantoms`` 3D phantoms
(``--image_size`` per side), are written as float32 ``image [D, H, W, 1]`` (modality values, the
canonical LPS frame), ``label_map`` uint8 ``[D, H, W]`` (``[0, 0, 0]`` when the entry has none),
``spacing`` float32 [3] (zlib-compressed tensors), with the same label/modality/caption fields;
``data.source='tfds'`` with ``data.volume`` set reads them back::

  python -m medfm_jax.data.build --volume --source=manifest --path=/data/ct.csv --spacing=2,1,1 \
      --out=/data/tfds --name=ct3d

The output is written locally (records are streamed, one shard in
memory at a time); copy ``OUT/NAME`` to a bucket to stream it on a pod
(``data.data_dir=gs://...``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Iterator, Sequence

import numpy as np
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter

from medfm_jax import storage
from medfm_jax.data import decode, image_files, phantoms, phantoms3d, sources, volume_sources
from medfm_jax.data.decode import DataError

SOURCES = ("folder", "manifest", "phantoms")


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray
  label: int
  modality: int
  caption: str
  patient_id: str
  path: str
  mask: np.ndarray | None = None     # uint8 [H, W] label map (0 background, k > 0 object k)


def features(channels: int, bit_depth: int, class_names: Sequence[str],
             modality_names: Sequence[str], masks: bool = False):
  """The TFDS FeaturesDict of a built dataset (``masks``: plus ``mask``, a PNG label map)."""
  import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
  extra = {"mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")} if masks else {}
  return tfds.features.FeaturesDict({
      **extra,
      "image": tfds.features.Image(shape=(None, None, channels),
                                   dtype=np.uint8 if bit_depth == 8 else np.uint16,
                                   encoding_format="png"),
      "label": tfds.features.ClassLabel(names=list(class_names) or ["unlabeled"]),
      "modality": tfds.features.ClassLabel(names=list(modality_names) or ["unknown"]),
      "caption": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "path": tfds.features.Text(),
  })


class _Stats:
  """Running per-channel mean/std of pixel values scaled to [0, 1]."""

  def __init__(self):
    self.n, self.s, self.s2 = 0, 0.0, 0.0

  def add(self, image: np.ndarray, max_value: float) -> None:
    x = image.reshape(-1, image.shape[-1]).astype(np.float64) / max_value
    self.n += x.shape[0]
    self.s = self.s + x.sum(0)
    self.s2 = self.s2 + (x * x).sum(0)

  def result(self) -> dict[str, list[float]]:
    mean = self.s / max(self.n, 1)
    std = np.sqrt(np.maximum(self.s2 / max(self.n, 1) - mean * mean, 0))
    return {"mean": [round(float(m), 6) for m in np.atleast_1d(mean)],
            "std": [round(float(s), 6) for s in np.atleast_1d(std)]}


def write_split(out_dir: str, name: str, split: str, examples: Iterator[Example], feats,
                shard_size: int, stats: _Stats | None = None, max_value: float = 255.0):
  """Streams one split into array_record shards of ``shard_size`` records (renamed to
  ``NAME-SPLIT.array_record-0000i-of-0000n`` when done); returns its ``tfds.core.SplitInfo``."""
  def encoded():
    for ex in examples:
      if stats is not None:
        stats.add(ex.image, max_value)
      mask = {} if ex.mask is None else {"mask": image_files.encode_png(ex.mask[..., None])}
      yield feats.encode_example({
          "image": image_files.encode_png(ex.image), "label": ex.label, "modality": ex.modality,
          "caption": ex.caption, "patient_id": ex.patient_id, "path": ex.path, **mask})
  return _write_records(out_dir, name, split, encoded(), feats, shard_size)


def _readable_records(load, n: int, on_error: str, skip_log: str) -> Iterator[tuple[int, dict]]:
  """``(i, load(i))`` for i < n; a bad file raises (``on_error='raise'``) or is skipped, logged
  and written to ``skip_log`` (not replaced)."""
  for i in range(n):
    try:
      record = load(i)
    except DataError as e:
      if on_error == "raise":
        raise
      logging.warning("skipping bad data: %s", e)
      with open(skip_log, "a", encoding="utf-8") as f:
        f.write(f"{e.path}\t{e.reason}\n")
      continue
    yield i, record


def _file_examples(source: sources.FileSource, on_error: str,
                   skip_log: str) -> Iterator[Example]:
  """Decodes every entry once; bad files raise or are skipped (logged, not replaced)."""
  for _, r in _readable_records(source._load, len(source.entries), on_error, skip_log):  # pylint: disable=protected-access
    frame = f"#frame={int(r['frame'])}" if int(r["frame"]) else ""
    yield Example(r["image"], int(r["label"]), int(r["modality"]), r["caption"],
                  r["patient_id"], r["path"] + frame, r.get("lesion_ids"))


def _phantom_examples(split: str, n: int, image_size: int, channels: int) -> Iterator[Example]:
  src = phantoms.PhantomSource(split, image_size=image_size, channels=channels, num_examples=n)
  for i in range(n):
    r = src[i]
    yield Example(r["image"], int(r["finding"]), int(r["modality"]), r["caption"],
                  f"phantom-{split}-{i}", f"phantoms/{split}/{i}")


def volume_features(class_names: Sequence[str], modality_names: Sequence[str]):
  """The TFDS FeaturesDict of a volume dataset (``--volume``)."""
  import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
  tensor = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype, encoding="zlib")
  return tfds.features.FeaturesDict({
      "image": tensor((None, None, None, 1), np.float32),
      "label_map": tensor((None, None, None), np.uint8),
      "spacing": tensor((3,), np.float32),
      "label": tfds.features.ClassLabel(names=list(class_names) or ["unlabeled"]),
      "modality": tfds.features.ClassLabel(names=list(modality_names) or ["unknown"]),
      "caption": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "path": tfds.features.Text(),
  })


def _write_records(out_dir: str, name: str, split: str, records: Iterator[dict], feats,
                   shard_size: int):
  """Streams feature dicts of one split into array_record shards; returns its SplitInfo."""
  import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
  tmp = lambda i: os.path.join(out_dir, f".{name}-{split}.{i:05d}.tmp")
  lengths, num_bytes, writer = [], 0, None
  for example in records:
    if writer is None or lengths[-1] == shard_size:
      if writer is not None:
        writer.close()
      writer = ArrayRecordWriter(tmp(len(lengths)), "group_size:1")
      lengths.append(0)
    record = feats.serialize_example(example)
    writer.write(record)
    lengths[-1] += 1
    num_bytes += len(record)
  if writer is None:
    raise ValueError(f"split {split!r} has no examples")
  writer.close()
  for i in range(len(lengths)):
    os.replace(tmp(i), os.path.join(out_dir, f"{name}-{split}.array_record-{i:05d}-of-{len(lengths):05d}"))
  return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=None)


def _volume_records(source, skip_log: str, on_error: str, phantom: bool = False) -> Iterator[dict]:
  """Feature dicts of every record of a volume source; bad files raise or are skipped (logged)."""
  load = source.__getitem__ if phantom else source._load  # pylint: disable=protected-access
  for i, r in _readable_records(load, len(source), on_error, skip_log):
    yield {"image": r["image"].astype(np.float32),
           "label_map": r.get("label_map", np.zeros((0, 0, 0), np.uint8)).astype(np.uint8),
           "spacing": np.asarray(r["spacing"], np.float32),
           "label": int(r["finding"]) if phantom else max(int(r["label"]), 0),
           "modality": int(r["modality"]), "caption": r["caption"],
           "patient_id": r.get("patient_id", f"phantom-{i}"), "path": r.get("path", f"phantoms3d/{i}")}


def build_volumes(source: str, out_dir: str, name: str, *, path: str, splits: str, split_seed: int,
                  spacing: tuple[float, ...], on_error: str, shard_size: int, image_size: int,
                  num_examples: str, skip_log: str):
  """Volume mode of :func:`build`: -> the split infos and features written to ``out_dir``."""
  if source == "phantoms":
    counts = sources.parse_splits_counts(num_examples)
    class_names = phantoms.FINDINGS
    modality_names = phantoms.MODALITIES
    split_records = {s: _volume_records(phantoms3d.VolumePhantomSource(s, image_size, num_examples=n),
                                        skip_log, on_error, phantom=True) for s, n in counts.items()}
  else:
    if source == "folder":
      entries, class_names = volume_sources.list_volume_folder(path, on_error)
    else:
      entries = volume_sources.read_volume_manifest(path, on_error)
      class_names = sources.class_names_of([e.label for e in entries if e.label])
    if not any(e.split for e in entries):
      groups = [e.patient_id or e.path for e in entries]
      entries = [dataclasses.replace(e, split=s) for e, s in
                 zip(entries, sources.assign_splits(groups, sources.parse_splits(splits), split_seed))]
    modality_names = sources.class_names_of([e.modality for e in entries if e.modality])
    split_records = {}
    for split in sorted({e.split for e in entries}, key=lambda s: (s != "train", s)):
      src = volume_sources.VolumeFileSource([e for e in entries if e.split == split], class_names,
                                            spacing, name=f"{path}[{split}]", modality_names=modality_names)
      split_records[split] = _volume_records(src, skip_log, on_error)
  feats = volume_features(class_names, modality_names)
  return [_write_records(out_dir, name, split, records, feats, shard_size)
          for split, records in split_records.items()], feats


def _count_lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def build(source: str, out: str, name: str, *, path: str = "", version: str = "1.0.0",
          splits: str = "train:0.9,val:0.05,test:0.05", split_seed: int = 0,
          channels: int = 1, window: str = "auto", resize: str = "none", size: int = 0,
          bit_depth: int = 8, on_error: str = "raise", shard_size: int = 10_000,
          image_size: int = 64, num_examples: str = "train:1000,val:100,test:100",
          volume: bool = False, spacing: str = "") -> dict:
  """Builds the dataset; returns ``{"dir", "splits": {split: n}, "stats", "skipped"}``."""
  if source not in SOURCES:
    raise ValueError(f"--source={source!r}: allowed {', '.join(SOURCES)}")
  if on_error not in sources.ON_ERROR:
    raise ValueError(f"--on_error={on_error!r}: allowed {', '.join(sources.ON_ERROR)}")
  if source == "phantoms" and bit_depth != 8:
    raise ValueError("--bit_depth=16 needs real 16-bit data; phantoms are 8-bit")
  if storage.is_url(out):   # array_record writes local files only
    raise ValueError(f"--out={out!r}: the build writes to a local folder (array_record); build "
                     "there, then copy the folder")
  out_dir = os.path.join(out, name, version)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f"--out: {out_dir} exists and is not empty; remove it or pass another "
                     "--version")
  os.makedirs(out_dir, exist_ok=True)
  skip_log = os.path.join(out_dir, "skipped_files.txt")
  max_value = 255.0 if bit_depth == 8 else 65535.0
  stats = _Stats()
  if volume:
    try:
      spacing_mm = tuple(float(v) for v in spacing.split(",")) if spacing else ()
    except ValueError:
      spacing_mm = (0.0,)
    if spacing_mm and (len(spacing_mm) != 3 or min(spacing_mm) <= 0):
      raise ValueError(f"--spacing={spacing!r}: expected three positive mm values z,y,x")
    infos, feats = build_volumes(source, out_dir, name, path=path, splits=splits, split_seed=split_seed,
                                 spacing=spacing_mm, on_error=on_error, shard_size=shard_size,
                                 image_size=image_size, num_examples=num_examples, skip_log=skip_log)
    split_examples = {}
  elif source == "phantoms":
    counts = {k: int(v) for k, v in sources.parse_splits_counts(num_examples).items()}
    class_names, modality_names = phantoms.FINDINGS, phantoms.MODALITIES
    split_examples = {s: _phantom_examples(s, n, image_size, channels) for s, n in counts.items()}
  else:
    preprocess = decode.Preprocess(channels=channels, window=window, resize=resize,
                                   size=size, bit_depth=bit_depth)
    if source == "folder":
      entries, class_names = sources.list_folder(path, on_error)
    else:
      entries = sources.read_manifest(path, on_error)
      class_names = sources.class_names_of([e.label for e in entries if e.label])
    if not any(e.split for e in entries):
      fractions = sources.parse_splits(splits)
      groups = [e.patient_id or e.path for e in entries]
      entries = [dataclasses.replace(e, split=s)
                 for e, s in zip(entries, sources.assign_splits(groups, fractions, split_seed))]
    modality_names = sources.class_names_of([e.modality for e in entries if e.modality])
    masked = sum(bool(e.mask) for e in entries)
    if 0 < masked < len(entries):
      raise ValueError(f"--path={path!r}: {masked} of {len(entries)} images have a mask; give every "
                       "image a mask (folders: <stem>_mask.png, manifests: the 'mask' column) or none")
    split_examples = {}
    for split in sorted({e.split for e in entries}, key=lambda s: (s != "train", s)):
      src = sources.FileSource([e for e in entries if e.split == split], class_names, preprocess,
                               name=f"{path}[{split}]", modality_names=modality_names)
      split_examples[split] = _file_examples(src, on_error, skip_log)
  if not volume:
    feats = features(channels, bit_depth, class_names, modality_names,
                     masks=source != "phantoms" and masked > 0)
  infos = infos if volume else [write_split(out_dir, name, split, examples, feats, shard_size,
                       stats if split == "train" else None, max_value)
           for split, examples in split_examples.items()]
  import tensorflow_datasets as tfds  # heavy (~0.4 s); only TFDS sources need it; pylint: disable=g-import-not-at-top
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=feats, split_infos=infos, check_data=False,
      description=f"Built by medfm_jax.data.build from {source} {path}".strip())
  result = {"dir": out_dir, "splits": {i.name: i.num_examples for i in infos},
            "stats": stats.result() if stats.n else None,
            "skipped": _count_lines(skip_log)}
  with open(os.path.join(out_dir, "medfm_stats.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv):
  del argv
  try:
    result = build(_SOURCE.value, _OUT.value, _NAME.value, path=_PATH.value,
                   version=_VERSION.value, splits=_SPLITS.value, split_seed=_SPLIT_SEED.value,
                   channels=_CHANNELS.value, window=_WINDOW.value, resize=_RESIZE.value,
                   size=_SIZE.value, bit_depth=int(_BIT_DEPTH.value), on_error=_ON_ERROR.value,
                   shard_size=_SHARD_SIZE.value, image_size=_IMAGE_SIZE.value,
                   num_examples=_NUM_EXAMPLES.value, volume=_VOLUME.value, spacing=_SPACING.value)
  except ValueError as e:   # DataError included: one line naming the file or flag
    sys.stderr.write(f"medfm_jax.data.build: error: {e}\n")
    sys.exit(2)
  print(json.dumps(result))
  if result["stats"]:
    s = result["stats"]
    print(f"config: --config.data.source=tfds --config.data.name={_NAME.value}:{_VERSION.value} "
          f"--config.data.data_dir={_OUT.value} --config.data.mean={tuple(s['mean'])} "
          f"--config.data.std={tuple(s['std'])}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module as a library
  # (tests, other CLIs) never clashes with another CLI's flags of the same name.
  _SOURCE = flags.DEFINE_enum("source", None, list(SOURCES), "What to read.")
  _PATH = flags.DEFINE_string("path", "", "Folder root (folder) or CSV/JSONL file (manifest).")
  _OUT = flags.DEFINE_string("out", None, "TFDS data_dir to write into (local or bucket URL).")
  _NAME = flags.DEFINE_string("name", None, "Dataset name.")
  _VERSION = flags.DEFINE_string("version", "1.0.0", "Dataset version.")
  _SPLITS = flags.DEFINE_string("splits", "train:0.9,val:0.05,test:0.05",
                                "Patient-level split fractions (when the data has no splits).")
  _SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the patient-level split.")
  _CHANNELS = flags.DEFINE_integer("channels", 1, "Stored channels: 1 or 3.")
  _WINDOW = flags.DEFINE_string("window", "auto", "Intensity window: auto | minmax | full | "
                                f"{' | '.join(decode.WINDOW_PRESETS)} | center,width.")
  _RESIZE = flags.DEFINE_enum("resize", "none", list(decode.RESIZE_POLICIES), "Resize policy.")
  _SIZE = flags.DEFINE_integer("size", 0, "Target size of --resize.")
  _BIT_DEPTH = flags.DEFINE_enum("bit_depth", "8", ["8", "16"], "Stored PNG bit depth.")
  _ON_ERROR = flags.DEFINE_enum("on_error", "raise", list(sources.ON_ERROR), "Bad files.")
  _SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Records per array_record file.")
  _IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Phantom resolution.")
  _NUM_EXAMPLES = flags.DEFINE_string("num_examples", "train:1000,val:100,test:100",
                                      "Phantom examples per split.")
  _VOLUME = flags.DEFINE_bool("volume", False, "3D volumes (NIfTI / DICOM series / 3D phantoms).")
  _SPACING = flags.DEFINE_string("spacing", "", "Volume mode: target spacing 'z,y,x' mm ('' = keep).")
  flags.mark_flags_as_required(["source", "out", "name"])
  app.run(main)
