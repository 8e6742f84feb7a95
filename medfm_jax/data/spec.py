"""The data config resolved once: :class:`DataSpec`, what the pipelines and objectives read.

``config.data`` (a ``ConfigDict`` or dict) is turned into one frozen, typed spec by
:func:`resolve`: the source settings, image size and channels, normalisation, crop/flip, the
multi-crop spec, the patch-mask spec, the tokenizer and context length, MLM, mixing ratios, labels
and eval split. Every piece is checked here, with the one-line errors naming ``data.<field>``
that the pieces raise (``transforms.MultiCropSpec``, ``masking.PatchMaskSpec``,
``tokenizers.from_config``, ``text_masking.MLMSpec``, ``mixing.parse_ratios``). The train and eval
pipelines (``pipeline.make_train_iterator`` / ``make_eval_batches``) are built from the spec, and
:meth:`DataSpec.abstract_batch` gives the shapes of a train batch without drawing one.

:func:`resolve` is memoised on the config's content: config validation, the objective and the
trainer of a run share one spec (a changed config is a new key, so it resolves anew).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from medfm_jax.data import decode, masking, mixing, phantoms, prompts, text_masking, tokenizers, transforms, volumes

SOURCES = ("phantoms", "folder", "manifest", "tfds")
SKIPPED_KEY = "data_skipped"   # per-row count of bad records skipped (data.on_error='skip')
DEFAULT_SPLITS = "train:0.9,val:0.05,test:0.05"


def _on(raw) -> bool:
  """A sub-config is on unless absent, None or False ({} = on, with its defaults)."""
  return raw is not None and raw is not False


def _window(raw):
  """``data.window``: a preset name, 'center,width', or a (center, width) pair (kept a tuple)."""
  return raw if isinstance(raw, str) else tuple(raw)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """``config.data``, resolved (see the module docstring); fields named as the config's."""
  # Source (``pipeline.make_source``, ``sources.make_file_source``).
  source: str = "phantoms"
  path: str = ""                       # folder root or CSV/JSONL manifest
  name: str = ""                       # tfds 'name[:version]'
  data_dir: str = ""                   # tfds data_dir ('' = TFDS default)
  image_key: str = "image"
  label_key: str = "label"
  caption_key: str = "caption"
  splits: str = DEFAULT_SPLITS         # patient-level split fractions when the data has none
  split_seed: int = 0
  window: Any = "auto"
  resize: str = "none"
  load_size: int = 0                   # target of ``resize`` (0 = image_size)
  on_error: str = "raise"
  lesion_scale: float = 1.0            # phantoms: multiplies every lesion's axes
  # Images.
  image_size: int = 224
  channels: int = 3
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.25,)
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  # Input workers.
  num_workers: int = 0
  prefetch: int = 2
  # Splits and labels.
  train_split: str = "train"
  eval_split: str = "val"
  eval_examples: int = 512
  eval_batch_size: int = 128
  label: str = "finding"
  # Objective inputs (each None = off).
  multicrop: transforms.MultiCropSpec | None = None      # DINO views (replace ``image``)
  patch_masks: masking.PatchMaskSpec | None = None       # of the global views, or of ``image``
  tokenizer: tokenizers.CaptionTokenizer | None = None   # adds ``tokens`` (context length inside)
  mlm: text_masking.MLMSpec | None = None                # adds ``mlm_tokens`` / ``mlm_labels``
  mix: tuple[float, float, float] | None = None          # (paired, image, text) ratios
  volume: volumes.VolumeSpec | None = None               # 3D crops replace 2D ``image``
  segment: prompts.PromptSpec | None = None              # target mask + SAM prompts (``sam``)

  @classmethod
  def from_config(cls, data_cfg) -> "DataSpec":
    """Resolves ``data_cfg`` (raises ``ValueError``, one line naming the field); absent fields
    take the defaults of ``configs/common.py``. Prefer :func:`resolve` (memoised)."""
    get = data_cfg.get
    multicrop = get("multicrop")
    if _on(multicrop) and not hasattr(multicrop, "keys"):
      raise ValueError(f"data.multicrop={multicrop!r} must be a dict of multi-crop fields or None")
    multicrop = transforms.MultiCropSpec.from_config(multicrop) if _on(multicrop) else None
    image_size = int(get("image_size", cls.image_size))
    patch_masks = None
    if _on(get("patch_masks")):   # iBOT: the global views; FLAVA MIM: the image
      patch_masks = masking.PatchMaskSpec.from_config(
          get("patch_masks"), image_size if multicrop is None else multicrop.global_size)
    text = tokenizers.from_config(data_cfg)
    mlm_cfg, mix_cfg = get("mlm"), get("mix")
    if text is None and (_on(mlm_cfg) or _on(mix_cfg)):
      raise ValueError(f"data.{'mlm' if _on(mlm_cfg) else 'mix'} needs a data.tokenizer "
                       f"(allowed {tokenizers.KINDS})")
    mix = mixing.parse_ratios(mix_cfg) if _on(mix_cfg) else None
    volume = get("volume")
    if _on(volume):
      if not hasattr(volume, "keys"):
        raise ValueError(f"data.volume={volume!r} must be a dict of volume fields or None")
      volume = volumes.VolumeSpec.from_config(volume)
      extras = [k for k, v in (("multicrop", multicrop), ("patch_masks", patch_masks),
                               ("tokenizer", text), ("mix", mix)) if v is not None]
      if extras:
        raise ValueError(f"data.volume is set: data.{extras[0]} is 2-D only (turn it off)")
    else:
      volume = None
    mlm = text_masking.MLMSpec.from_config(mlm_cfg, text.tokenizer()) if _on(mlm_cfg) else None
    floats = lambda key: tuple(float(v) for v in get(key, getattr(cls, key)))
    return cls(
        source=get("source", cls.source), path=get("path", "") or "", name=get("name", "") or "",
        data_dir=get("data_dir", "") or "", image_key=get("image_key", cls.image_key),
        label_key=get("label_key", cls.label_key), caption_key=get("caption_key", cls.caption_key),
        splits=get("splits", cls.splits), split_seed=int(get("split_seed", 0)),
        window=_window(get("window", cls.window)), resize=get("resize", cls.resize),
        load_size=int(get("load_size", 0) or 0), on_error=get("on_error", cls.on_error),
        lesion_scale=_positive(float(get("lesion_scale", 1.0)), "data.lesion_scale"),
        image_size=image_size, channels=int(get("channels", cls.channels)),
        mean=floats("mean"), std=floats("std"), crop_scale=floats("crop_scale"),
        crop_ratio=floats("crop_ratio"), flip=bool(get("flip", cls.flip)),
        num_workers=int(get("num_workers", 0)), prefetch=int(get("prefetch", cls.prefetch)),
        train_split=get("train_split", cls.train_split), eval_split=get("eval_split", cls.eval_split),
        eval_examples=int(get("eval_examples", cls.eval_examples)),
        eval_batch_size=int(get("eval_batch_size", cls.eval_batch_size)),
        label=get("label", cls.label), multicrop=multicrop, patch_masks=patch_masks,
        tokenizer=text, mlm=mlm, mix=mix, volume=volume,
        segment=prompts.PromptSpec.from_config(get("segment")) if _on(get("segment")) else None)

  @property
  def context_length(self) -> int | None:
    """Tokens per caption (None without a tokenizer)."""
    return None if self.tokenizer is None else self.tokenizer.context_length

  @property
  def mask_patch_size(self) -> int | None:
    """The patch size ``data.patch_masks`` was given (None when off)."""
    if self.patch_masks is None:
      return None
    size = self.image_size if self.multicrop is None else self.multicrop.global_size
    return size // self.patch_masks.grid

  @property
  def preprocess(self) -> decode.Preprocess:
    """Decoded file pixels -> record image: channels / window / resize / load_size."""
    return decode.Preprocess(channels=self.channels, window=self.window, resize=self.resize,
                             size=self.load_size or self.image_size)

  def mix_spec(self, global_batch: int | None) -> mixing.MixSpec | None:
    """The kinds of the slots of a global batch (None when ``data.mix`` is off); ``global_batch``
    None (eval): every example is paired."""
    if self.mix is None:
      return None
    if not global_batch:
      return mixing.MixSpec((mixing.PAIRED,))
    return mixing.MixSpec.from_ratios(self.mix, global_batch)

  def abstract_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes (no sharding) of the global train batch the pipeline yields, numeric keys
    only (as ``parallel.mesh.drop_non_numeric`` keeps); see ``pipeline.make_train_iterator``."""
    b, c = int(global_batch_size), self.channels
    s = lambda shape, dtype: jax.ShapeDtypeStruct((b, *shape), np.dtype(dtype))
    out = {"modality": s((), np.int32), "finding": s((), np.int32)}
    if self.source == "phantoms" and self.volume is None:   # 2-D phantoms: the lesion labels too
      out.update({k: s((), np.int32) for k in phantoms.LESION_LABELS})
    if self.on_error == "skip" and self.source != "phantoms":   # file sources count skips
      out[SKIPPED_KEY] = s((), np.int32)
    if self.multicrop is not None:
      m = self.multicrop
      out["global"] = s((m.num_global, m.global_size, m.global_size, c), np.float32)
      out["local"] = s((m.num_local, m.local_size, m.local_size, c), np.float32)
      if self.patch_masks is not None:
        out["global_masks"] = s((m.num_global, self.patch_masks.num_patches), np.bool_)
      return out
    if self.volume is not None:
      out["image"] = s((*self.volume.size, c), np.float32)
      if self.volume.labels:
        out["label_map"] = s(self.volume.size, np.int32)
      return out
    out["image"] = s((self.image_size, self.image_size, c), np.float32)
    if self.tokenizer is not None:
      out["tokens"] = s((self.tokenizer.context_length,), np.int32)
    if self.mlm is not None:
      out["mlm_tokens"] = out["mlm_labels"] = s((self.tokenizer.context_length,), np.int32)
    if self.patch_masks is not None:
      out["patch_mask"] = s((self.patch_masks.num_patches,), np.bool_)
    if self.mix is not None:
      out["has_image"] = out["has_text"] = s((), np.bool_)
    if self.segment is not None:
      p = self.segment.num_prompt_points
      out.update(target=s((self.image_size, self.image_size), np.float32), target_class=s((), np.int32),
                 box=s((4,), np.float32), points=s((p, 2), np.float32), point_labels=s((p,), np.int32))
    return out


def _positive(x: float, field: str) -> float:
  if not x > 0:
    raise ValueError(f"{field}={x}: must be > 0")
  return x


_RESOLVED: dict[str, DataSpec] = {}   # content of a data config -> its spec (newest last)
_MAX_RESOLVED = 64


def resolve(data) -> DataSpec:
  """``config.data`` (or a :class:`DataSpec`, returned as is) -> its :class:`DataSpec`, resolved
  once per distinct content (raises ``ValueError`` naming the field)."""
  if isinstance(data, DataSpec):
    return data
  raw = data.to_dict() if hasattr(data, "to_dict") else dict(data)
  key = json.dumps(raw, sort_keys=True, default=repr)
  spec = _RESOLVED.get(key)
  if spec is None:
    spec = _RESOLVED[key] = DataSpec.from_config(data)
    if len(_RESOLVED) > _MAX_RESOLVED:
      del _RESOLVED[next(iter(_RESOLVED))]
  return spec
