"""grain input pipeline: per-process sharding, checkpointable train iterator.

Train stream (identical on every process, then sharded)::

  range(N).shuffle(seed)   # a new permutation per epoch
    .repeat()              # infinite
    -> (global position, source index)
    [blocks of b: process p takes blocks p, p+P, ...]
    -> source[index], random resized crop, flip, normalise
       (RNG seeded by (seed, global position): independent of workers/threads)
       [or, with ``data.multicrop`` set, DINO global + local views]
       [+ MLM inputs (``data.mlm``), a MIM block mask (``data.patch_masks``) and
        paired/image-only/text-only kinds (``data.mix``): FLAVA]
    .batch(global_batch // process_count)

Both pipelines are built from the resolved :class:`~medfm_jax.data.spec.DataSpec`; the entry points
take the spec or ``config.data`` (resolved once, at the entry, by ``spec.resolve``).

Global batch ``s`` is global positions ``[s*B, (s+1)*B)``; process ``p`` holds
its rows ``[p*b, (p+1)*b)`` (b = B/P), matching ``jax.make_array_from_process_local_data``. Batching happens before the worker processes
split the stream, so batches do not depend on ``data.num_workers``.

All outputs are plain numpy (no JAX): the trainer assembles global arrays.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator, Protocol

import grain
import numpy as np
from absl import flags, logging

from medfm_jax.data import masking, mixing, phantoms, phantoms3d, prompts, sources, text_masking, transforms
from medfm_jax.data import volume_sources, volumes
from medfm_jax.data import spec as spec_lib
from medfm_jax.data.decode import DataError  # noqa: F401  (re-exported for callers)
from medfm_jax.data.spec import SKIPPED_KEY, SOURCES, DataSpec  # noqa: F401  (re-exported)


class RandomAccessSource(Protocol):
  """grain's RandomAccessDataSource protocol (records are dicts)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


def make_source(data: DataSpec, split: str, num_examples: int | None = None, *,
                skip_log: str | None = None) -> RandomAccessSource:
  """Random-access source for ``data.source`` (phantom dataset seed fixed at 0); ``data`` is a
  :class:`DataSpec` or ``config.data``.

  ``folder`` / ``manifest`` / ``tfds`` read real images (see ``sources``); ``skip_log`` is the
  file that skipped bad records are appended to with ``data.on_error='skip'``. With
  ``data.segment.train_examples`` N > 0 the train split is its first N records; with
  ``data.volume.train_volumes`` N > 0 its first N volumes, kept in memory once read (N <= 64).
  """
  spec = spec_lib.resolve(data)
  source = _make_source(spec, split, num_examples, skip_log)
  if spec.volume is not None and spec.volume.train_volumes and split == spec.train_split \
      and len(source) <= FEW_SHOT_CACHE:   # few-shot volumes: each read (rendered) once, then kept
    source = CachedSource(source)
  few = spec.segment.train_examples if spec.segment is not None and split == spec.train_split else 0
  if few:   # few-shot segmentation: the first N labelled train images
    if few > len(source):
      raise ValueError(f"data.segment.train_examples={few}: must be <= {len(source)}, the size of "
                       f"split {split!r}")
    source = SubsetSource(source, tuple(range(few)))
  return source


def _make_source(spec: DataSpec, split: str, num_examples: int | None,
                 skip_log: str | None) -> RandomAccessSource:
  if spec.volume is not None and spec.volume.train_volumes and split == spec.train_split:
    num_examples = spec.volume.train_volumes      # few-shot: the first N labelled volumes
  if spec.volume is not None and spec.source == "phantoms":
    return phantoms3d.VolumePhantomSource(split, spec.volume.source_size, seed=0,
                                          num_examples=num_examples)
  if spec.volume is not None:
    return volume_sources.make_volume_source(spec, split, num_examples, skip_log)
  if spec.source == "phantoms":
    return phantoms.PhantomSource(split, image_size=spec.image_size, channels=spec.channels,
                                  seed=0, num_examples=num_examples, masks=spec.segment is not None,
                                  lesion_scale=spec.lesion_scale)
  if spec.source in SOURCES:
    return sources.make_file_source(spec, split, num_examples, skip_log)
  raise ValueError(f"data.source={spec.source!r} is not supported; allowed: {', '.join(SOURCES)}")


FEW_SHOT_CACHE = 64    # few-shot volume sources up to this many records are kept in memory


class CachedSource:
  """``source`` with each record read once and kept (read-only arrays): for few-shot volume sets,
  whose N records are otherwise re-read or re-rendered for every crop. Failed reads are not kept."""

  def __init__(self, source):
    self.source, self._records = source, {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index not in self._records:
      record = dict(self.source[index])
      for value in record.values():
        if isinstance(value, np.ndarray):
          value.setflags(write=False)
      self._records[index] = record
    return dict(self._records[index])

  def __getstate__(self):   # grain workers start with an empty cache
    return {"source": self.source, "_records": {}}

  def __repr__(self) -> str:
    return f"CachedSource({self.source!r}, {len(self._records)} kept)"


@dataclasses.dataclass(frozen=True)
class SubsetSource:
  """The records ``indices`` of ``source``, in that order (e.g. a label budget's train rows)."""
  source: Any
  indices: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[self.indices[int(index)]]

  def __repr__(self) -> str:
    return f"SubsetSource({self.source!r}, {len(self.indices)} of its records)"


def _seed32(seed: int) -> int:
  """Hashes any int seed to 32 bits (grain folds the epoch in by addition)."""
  return int(np.random.SeedSequence(int(seed) % 2 ** 64).generate_state(1)[0])


def _with_position(position: int, index: int) -> tuple[int, int]:
  return int(position), int(index)


@dataclasses.dataclass(frozen=True)
class _ProcessPosition(grain.transforms.Map):
  """Local position j of process p -> (global position, source index), in blocks of ``block``."""
  stream: Any             # global position -> source index
  block: int
  process_index: int
  process_count: int

  def map(self, j: int) -> tuple[int, int]:
    g = (j // self.block) * self.block * self.process_count + self.process_index * self.block + j % self.block
    return _with_position(g, self.stream[g])


def shard_stream(num_examples: int, seed: int, process_index: int = 0,
                 process_count: int = 1, block: int = 1) -> grain.MapDataset:
  """Infinite per-process stream of ``(global position, source index)`` pairs.

  Every epoch is a fresh permutation of ``range(num_examples)`` (seeded by ``seed`` and the
  epoch). Global positions are dealt out in blocks of ``block``: process ``p`` takes blocks
  ``p, p+P, ...``. With ``block`` = the local batch, process ``p`` holds rows
  ``[p*b, (p+1)*b)`` of every global batch, exactly where ``jax.make_array_from_process_local_data``
  puts them, so a multi-process run sees the same global batches as a single-process one.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  stream = grain.MapDataset.range(num_examples).shuffle(seed=_seed32(seed)).repeat(None)
  local = grain.MapDataset.range(len(stream) // process_count)
  return local.map(_ProcessPosition(stream, block, process_index, process_count))


def _position_rng(seed: int, position: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, position])))


def _record_and_rng(source, seed: int, element: tuple[int, int]) -> tuple[dict, np.random.Generator]:
  """The record at ``index`` and an augmentation rng seeded by (seed, global position)."""
  position, index = element
  return source[index], _position_rng(seed, position)


def _labels(record: dict, skipped: bool = True) -> dict[str, np.ndarray]:
  """modality, finding and the phantoms' lesion labels a record carries (+ the skip count of an
  ``on_error='skip'`` train record when ``skipped``)."""
  labels = {"modality": np.int32(record["modality"]), "finding": np.int32(record["finding"])}
  labels.update({k: np.int32(record[k]) for k in phantoms.LESION_LABELS if k in record})
  if skipped and "skipped" in record:   # on_error='skip' sources: counted into the train metrics
    labels[SKIPPED_KEY] = np.int32(record["skipped"])
  return labels


skip_log_path = sources.skip_log_path


def _caption_tokens(text, record: dict) -> dict[str, np.ndarray]:
  """``{'tokens': int32 [L]}`` of the record's caption when ``text`` (a CaptionTokenizer) is set."""
  if text is None:
    return {}
  caption = record.get("caption")
  if caption is None:
    raise DataError(record.get("path", f"record {record.get('index', '?')}"),
                    "data.tokenizer is set but the record has no 'caption' (phantoms, manifests "
                    "with a caption column and tfds datasets with data.caption_key carry one)")
  return {"tokens": text(str(caption))}


@dataclasses.dataclass(frozen=True)
class MaskedInputs:
  """Picklable FLAVA extras of an example (each None = off): ``mlm`` adds ``mlm_tokens`` and
  ``mlm_labels`` int32 [L]; ``patch_masks`` adds one block mask ``patch_mask`` bool [N]; ``mix``
  adds ``has_image`` / ``has_text`` and blanks the modality an example's kind lacks."""
  pad_id: int = 0
  mlm: text_masking.MLMSpec | None = None
  patch_masks: masking.PatchMaskSpec | None = None
  mix: mixing.MixSpec | None = None

  def __call__(self, example: dict, rng: np.random.Generator, position: int | None) -> dict:
    """``position`` None: an eval padding row (every modality blanked)."""
    if self.mlm is not None:
      example["mlm_tokens"], example["mlm_labels"] = text_masking.mask_tokens(
          example["tokens"], rng, self.mlm)
    if self.patch_masks is not None:
      example["patch_mask"] = masking.view_masks(rng, self.patch_masks, 1)[0]
    if position is None:
      return mixing.blank_missing(example, False, False, self.pad_id, self.mix is not None)
    if self.mix is not None:
      return mixing.blank_missing(example, *mixing.KIND_FLAGS[self.mix.kind(position)], self.pad_id)
    return example


def masked_inputs(data: DataSpec, global_batch: int | None = None) -> MaskedInputs | None:
  """The :class:`MaskedInputs` of ``data`` (a spec or ``config.data``; None when ``data.mlm``,
  ``data.mix`` and single-view ``data.patch_masks`` are all off). ``global_batch`` None (eval):
  every example is paired."""
  spec = spec_lib.resolve(data)
  patch_masks = spec.patch_masks if spec.multicrop is None else None
  if spec.mlm is None and spec.mix is None and patch_masks is None:
    return None
  return MaskedInputs(pad_id=0 if spec.tokenizer is None else int(spec.tokenizer.pad_id),
                      mlm=spec.mlm, patch_masks=patch_masks, mix=spec.mix_spec(global_batch))


def pop_skipped(batch: dict) -> int:
  """Removes the skip counts from a train batch; returns their sum (0 if absent)."""
  counts = batch.pop(SKIPPED_KEY, None)
  return 0 if counts is None else int(np.sum(counts))


@dataclasses.dataclass(frozen=True)
class _TrainTransform(grain.transforms.Map):
  """(position, index) -> augmented, normalised example (picklable)."""
  source: Any
  seed: int
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  text: Any = None          # tokenizers.CaptionTokenizer: adds 'tokens' (image-text objectives)
  masked: MaskedInputs | None = None    # FLAVA: MLM, MIM mask, mixed kinds

  def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    record, rng = _record_and_rng(self.source, self.seed, element)
    image = transforms.random_resized_crop(record["image"], rng, self.image_size,
                                           self.crop_scale, self.crop_ratio)
    if self.flip:
      image = transforms.random_flip(image, rng)
    out = {"image": transforms.normalize(image, self.mean, self.std), **_labels(record),
           **_caption_tokens(self.text, record)}
    return out if self.masked is None else self.masked(out, rng, element[0])


def modality_names(source) -> tuple[str, ...]:
  """Names of a source's modality indices (phantoms: ``phantoms.MODALITIES``)."""
  return tuple(getattr(source, "modality_names", phantoms.MODALITIES))


@dataclasses.dataclass(frozen=True)
class _VolumeTrainTransform(grain.transforms.Map):
  """(position, index) -> normalised, cropped, flipped, jittered volume (picklable)."""
  source: Any
  seed: int
  volume: volumes.VolumeTransform

  def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    record, rng = _record_and_rng(self.source, self.seed, element)
    return {**self.volume(record, rng), **_labels(record)}


@dataclasses.dataclass(frozen=True)
class _VolumeEvalTransform(grain.transforms.Map):
  """Global position -> centre-cropped, normalised volume with ``mask`` (padding rows: zeros)."""
  source: Any
  num_examples: int
  channels: int
  volume: volumes.VolumeTransform

  def map(self, position: int) -> dict[str, np.ndarray]:
    spec = self.volume.spec
    if position >= self.num_examples:
      out = {"image": np.zeros((*spec.size, self.channels), np.float32), "modality": np.int32(0),
             "finding": np.int32(0), "mask": np.bool_(False)}
      if spec.labels:
        out["label_map"] = np.zeros(spec.size, np.int32)
      return out
    record = self.source[int(position)]
    return {**self.volume(record, None), "modality": np.int32(record["modality"]),
            "finding": np.int32(record["finding"]), "mask": np.bool_(True)}


def _segmentation_example(record: dict, rng: np.random.Generator, segment: prompts.PromptSpec,
                          image_size: int, flip: bool) -> tuple[np.ndarray, dict]:
  """(image uint8 [S, S, C], target + prompts) of a record with masks, flipped with the image;
  other sizes are centre-cropped to a square and resized (masks by nearest neighbour)."""
  image = record["image"]
  if "masks" not in record:
    raise DataError(record.get("path", f"record {record.get('index', '?')}"),
                    "data.segment: the record has no mask (manifests: a 'mask' column; folders: "
                    "<image stem>_mask.png or _mask.dcm beside the image; tfds: a 'mask' feature, "
                    "written by data.build from masked images)")
  if image.shape[:2] != (image_size, image_size):
    h, w = image.shape[:2]
    side = min(h, w)
    idx = lambda n, off: (off + (np.arange(image_size) + 0.5) * side / image_size).astype(np.int64)
    rows, cols = idx(h, (h - side) // 2), idx(w, (w - side) // 2)
    record = {**record, "masks": record["masks"][rows][:, cols], "lesion_ids": record["lesion_ids"][rows][:, cols]}
    image = transforms.center_resize(image, image_size)
  if flip and rng.random() < 0.5:
    record = {**record, "masks": record["masks"][:, ::-1], "lesion_ids": record["lesion_ids"][:, ::-1]}
    image = image[:, ::-1]
  return image, prompts.make_example(record, rng, segment, image_size)


@dataclasses.dataclass(frozen=True)
class _SegmentTransform(grain.transforms.Map):
  """(position, index) -> normalised image, target mask and its prompts (``data.segment``)."""
  source: Any
  seed: int
  image_size: int
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  segment: prompts.PromptSpec

  def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    record, rng = _record_and_rng(self.source, self.seed, element)
    image, example = _segmentation_example(record, rng, self.segment, self.image_size, self.flip)
    return {"image": transforms.normalize(image, self.mean, self.std), **_labels(record), **example}


@dataclasses.dataclass(frozen=True)
class _MultiCropTransform(grain.transforms.Map):
  """(position, index) -> normalised DINO ``global``/``local`` views (picklable)."""
  source: Any
  seed: int
  spec: transforms.MultiCropSpec
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  patch_masks: masking.PatchMaskSpec | None = None    # iBOT masks for the global views

  def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    record, rng = _record_and_rng(self.source, self.seed, element)
    views = transforms.multicrop(record["image"], rng, self.spec, self.flip)
    out = {"global": transforms.normalize(views["global"], self.mean, self.std),
           "local": transforms.normalize(views["local"], self.mean, self.std), **_labels(record)}
    if self.patch_masks is not None:
      out["global_masks"] = masking.view_masks(rng, self.patch_masks, self.spec.num_global)
    return out


def _local_batch_size(batch_size: int, process_count: int, field: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the process count "
                     f"({process_count})")
  return batch_size // process_count


def _read_options(spec: DataSpec) -> grain.ReadOptions:
  # Records are generated in memory; a couple of threads overlap the numpy work.
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(spec.prefetch, 2))


def make_train_iterator(data: DataSpec, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, *,
                        source: RandomAccessSource | None = None,
                        skip_log: str | None = None) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator over this process's train batches of ``data`` (a
  :class:`DataSpec` or ``config.data``); ``DataSpec.abstract_batch`` gives their global shapes.

  Yields ``{"image": float32 [b, H, W, C], "modality": int32 [b],
  "finding": int32 [b]}`` with ``b = global_batch_size // process_count``.
  With ``data.multicrop`` set (see ``transforms.MultiCropSpec``), ``image`` is
  replaced by ``global`` float32 ``[b, num_global, G, G, C]`` and ``local``
  float32 ``[b, num_local, L, L, C]`` (DINO views, flipped if ``data.flip``,
  normalised with ``data.mean/std``), seeded the same way.
  ``get_state()`` returns a JSON-serialisable dict (``set_state`` restores it;
  e.g. ``{"next_index": 3}`` in-process, a nested dict of per-worker states
  with workers). ``source`` overrides ``make_source(data,
  data.train_split)`` (tests, custom sources). Close iterators with
  workers via ``.close()`` when done. Sources with ``data.on_error='skip'``
  add ``data_skipped`` int32 [b] (see :func:`pop_skipped`); skipped files are
  appended to ``skip_log``.
  """
  spec = spec_lib.resolve(data)
  local = _local_batch_size(global_batch_size, process_count, "batch_size")
  source = (make_source(spec, spec.train_split, skip_log=skip_log) if source is None
            else source)
  if spec.volume is not None:
    transform = _VolumeTrainTransform(source=source, seed=_seed32(seed), volume=volumes.VolumeTransform(
        spec.volume, modality_names(source), spec.flip, train=True))
  elif spec.segment is not None:
    transform = _SegmentTransform(source=source, seed=_seed32(seed), image_size=spec.image_size,
                                  flip=spec.flip, mean=spec.mean, std=spec.std, segment=spec.segment)
  elif spec.multicrop is None:
    transform = _TrainTransform(
        source=source, seed=_seed32(seed), image_size=spec.image_size, crop_scale=spec.crop_scale,
        crop_ratio=spec.crop_ratio, flip=spec.flip, mean=spec.mean, std=spec.std,
        text=spec.tokenizer, masked=masked_inputs(spec, global_batch_size))
  else:
    transform = _MultiCropTransform(
        source=source, seed=_seed32(seed), spec=spec.multicrop, flip=spec.flip, mean=spec.mean,
        std=spec.std, patch_masks=spec.patch_masks)
  ds = shard_stream(len(source), seed, process_index, process_count, block=local)
  ds = ds.map(transform).batch(local, drop_remainder=True)
  it_ds = ds.to_iter_dataset(_read_options(spec))
  if spec.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=spec.num_workers, per_worker_buffer_size=max(spec.prefetch, 1)))
  logging.info("train input: %s, %d examples, local batch %d (process %d/%d), %d workers%s",
               source, len(source), local, process_index, process_count, spec.num_workers,
               f", {spec.multicrop}" if spec.multicrop else "")
  return iter(it_ds)


@dataclasses.dataclass(frozen=True)
class _EvalTransform(grain.transforms.Map):
  """Global position -> centre-resized, normalised example with ``mask``."""
  source: Any
  num_examples: int
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  text: Any = None          # tokenizers.CaptionTokenizer: adds 'tokens' (padding rows: all pad)
  masked: MaskedInputs | None = None    # FLAVA extras, seeded by (0, position); all paired
  segment: prompts.PromptSpec | None = None   # target + prompts, seeded by (0, position)

  def map(self, position: int) -> dict[str, np.ndarray]:
    if self.segment is not None:
      return self._segment(position)
    if position >= self.num_examples:  # padding row
      pad = {} if self.text is None else {
          "tokens": np.full((self.text.context_length,), self.text.pad_id, np.int32)}
      out = {"image": np.zeros((self.image_size, self.image_size, self.channels), np.float32),
             "modality": np.int32(0), "finding": np.int32(0), "mask": np.bool_(False), **pad,
             **{k: np.int32(-1) for k in getattr(self.source, "extra_labels", ())}}
      return out if self.masked is None else self.masked(out, _position_rng(0, position), None)
    record = self.source[int(position)]
    image = transforms.center_resize(record["image"], self.image_size)
    out = {"image": transforms.normalize(image, self.mean, self.std),
           **_labels(record, skipped=False), "mask": np.bool_(True),
           **_caption_tokens(self.text, record)}
    return out if self.masked is None else self.masked(out, _position_rng(0, position), position)

  def _segment(self, position: int) -> dict[str, np.ndarray]:
    s, p = self.image_size, self.segment.num_prompt_points
    if position >= self.num_examples:  # padding row: zeros
      return {"image": np.zeros((s, s, self.channels), np.float32), "modality": np.int32(0),
              "finding": np.int32(0), "mask": np.bool_(False), "target": np.zeros((s, s), np.float32),
              "target_class": np.int32(0), "box": np.zeros(4, np.float32), "points": np.zeros((p, 2), np.float32),
              "point_labels": np.zeros(p, np.int32)}
    record = self.source[int(position)]
    image, example = _segmentation_example(record, _position_rng(0, position), self.segment, s, False)
    return {"image": transforms.normalize(image, self.mean, self.std), "modality": np.int32(record["modality"]),
            "finding": np.int32(record["finding"]), "mask": np.bool_(True), **example}


class EvalBatches:
  """Finite, deterministic, re-iterable sequence of eval batches (``len`` = batches)."""

  def __init__(self, dataset: grain.MapDataset, read_options: grain.ReadOptions):
    self._dataset, self._read_options = dataset, read_options

  def __len__(self) -> int:
    return len(self._dataset)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._dataset.to_iter_dataset(self._read_options))


def make_eval_batches(data: DataSpec, split: str, batch_size: int, num_examples: int,
                      process_index: int = 0, process_count: int = 1, *,
                      source: RandomAccessSource | None = None,
                      skip_log: str | None = None) -> EvalBatches:
  """The first ``num_examples`` records of ``split`` of ``data`` (a :class:`DataSpec` or
  ``config.data``), unaugmented, in batches.

  ``batch_size`` is global; each process gets ``batch_size // process_count``
  rows per batch and every process the same number of batches,
  ``ceil(num_examples / batch_size)``. Keys as the train batches plus ``mask``
  (bool [b], False on padding rows, which are zeros with labels 0).
  """
  spec = spec_lib.resolve(data)
  local = _local_batch_size(batch_size, process_count, "data.eval_batch_size")
  source = make_source(spec, split, skip_log=skip_log) if source is None else source
  if not 0 < num_examples <= len(source):
    raise ValueError(f"data.eval_examples={num_examples} must be in [1, {len(source)}] "
                     f"(size of split {split!r})")
  num_batches = math.ceil(num_examples / batch_size)
  if spec.volume is not None:
    transform = _VolumeEvalTransform(source=source, num_examples=int(num_examples),
                                     channels=spec.channels, volume=volumes.VolumeTransform(
                                         spec.volume, modality_names(source), train=False))
  else:
    transform = _EvalTransform(
        source=source, num_examples=int(num_examples), image_size=spec.image_size,
        channels=spec.channels, mean=spec.mean, std=spec.std, text=spec.tokenizer,
        masked=masked_inputs(spec), segment=spec.segment)
  ds = grain.MapDataset.range(num_batches * batch_size).map(transform)
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]   # rows [p*b, (p+1)*b)
  return EvalBatches(ds, _read_options(spec))


def time_train_iterator(data: DataSpec, global_batch_size: int, num_batches: int = 50,
                        warmup: int = 3) -> dict[str, float | None]:
  """Images per wall-clock second drawn from ``make_train_iterator`` (after ``warmup``
  batches), and, without worker processes, images per CPU second of this process (all its
  threads): a cost that does not depend on what else runs on the machine."""
  spec = spec_lib.resolve(data)
  it = make_train_iterator(spec, global_batch_size, seed=0)
  try:
    for _ in range(warmup):
      next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      next(it)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  finally:
    if hasattr(it, "close"):
      it.close()
  n = num_batches * global_batch_size
  return {"images_per_s": n / wall,
          "images_per_cpu_s": n / cpu if spec.num_workers == 0 and cpu > 0 else None}


def benchmark_train_iterator(data: DataSpec, global_batch_size: int, num_batches: int = 50,
                             warmup: int = 3) -> float:
  """Images per second drawn from ``make_train_iterator`` (after ``warmup`` batches)."""
  return time_train_iterator(data, global_batch_size, num_batches, warmup)["images_per_s"]
