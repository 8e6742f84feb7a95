"""Mixed FLAVA batches: paired, image-only and text-only examples in every batch (static shapes).

With ``data.mix = dict(paired=..., image=..., text=...)`` (ratios summing to 1) every example keeps
both ``image`` and ``tokens`` and gains ``has_image`` / ``has_text`` (bool); the modality it lacks
is blanked: an image-only example has all-pad ``tokens`` (``mlm_tokens`` too, ``mlm_labels`` -1), a
text-only example a zero (normalised) ``image`` and an all-False ``patch_mask``. All three kinds
come from the same shuffled stream: the text of a text-only example is the caption of a record
whose image is not used (and vice versa).

Exact counts per global batch: the ``B`` slots of every global batch get ``round`` (largest
remainder) ``ratio * B`` kinds each, spread evenly over the slots (at each slot the kind furthest
behind its quota comes next). The kind at global stream position ``p`` is therefore the fixed
function ``pattern[p % B]``: independent of seeds, workers, the process count and restarts
(checkpoint-resumable), and every process's contiguous rows get ``ratio * b`` of each kind to
within one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from medfm_jax.data import text_masking

KINDS = ("paired", "image", "text")
PAIRED, IMAGE, TEXT = range(3)
KIND_FLAGS = {PAIRED: (True, True), IMAGE: (True, False), TEXT: (False, True)}   # has_image, has_text


def slot_counts(ratios: tuple[float, ...], n: int) -> tuple[int, ...]:
  """``n`` slots split in the proportions ``ratios`` (largest remainder; ties to the first)."""
  exact = np.asarray(ratios, np.float64) * n
  counts = np.floor(exact).astype(int)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:n - counts.sum()]] += 1
  return tuple(int(c) for c in counts)


def interleave(counts: tuple[int, ...]) -> tuple[int, ...]:
  """Kind ids with ``counts[k]`` of kind ``k``, spread evenly: slot ``i`` takes the kind with the
  largest deficit ``counts[k] * (i + 1) / n - used[k]`` (ties to the lower id)."""
  n = sum(counts)
  used = np.zeros(len(counts))
  out = []
  for i in range(n):
    deficit = np.asarray(counts) * (i + 1) / n - used
    deficit[used >= np.asarray(counts)] = -np.inf
    k = int(np.argmax(deficit))
    used[k] += 1
    out.append(k)
  return tuple(out)


def parse_ratios(mix_cfg) -> tuple[float, float, float]:
  """``data.mix`` (a dict of ``paired`` / ``image`` / ``text`` ratios, absent = 0) -> the ratios
  in :data:`KINDS` order, checked."""
  if not hasattr(mix_cfg, "keys"):
    raise ValueError(f"data.mix={mix_cfg!r}: must be a dict of ratios {KINDS} (or None: all paired)")
  unknown = sorted(set(mix_cfg.keys()) - set(KINDS))
  if unknown:
    raise ValueError(f"data.mix has unknown kinds {unknown}: allowed {KINDS}")
  ratios = tuple(float(mix_cfg.get(k, 0.0) or 0.0) for k in KINDS)
  if min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
    raise ValueError(f"data.mix={dict(zip(KINDS, ratios))}: ratios must be >= 0 and sum to 1")
  return ratios


@dataclasses.dataclass(frozen=True)
class MixSpec:
  """Picklable kinds of the slots of a global batch."""
  pattern: tuple[int, ...]

  @classmethod
  def from_ratios(cls, ratios: tuple[float, ...], global_batch: int) -> "MixSpec":
    """``global_batch`` slots split in the (checked) proportions ``ratios``, spread evenly."""
    return cls(interleave(slot_counts(ratios, global_batch)))

  def kind(self, position: int) -> int:
    return self.pattern[position % len(self.pattern)]


def blank_missing(example: dict, has_image: bool, has_text: bool, pad_id: int,
                  flags: bool = True) -> dict:
  """``example`` with the modalities it lacks blanked (see the module docstring) and, if
  ``flags``, ``has_image`` / ``has_text`` added."""
  out = dict(example)
  if not has_text:
    for key in ("tokens", "mlm_tokens"):
      if key in out:
        out[key] = np.full_like(out[key], pad_id)
    if "mlm_labels" in out:
      out["mlm_labels"] = np.full_like(out["mlm_labels"], text_masking.IGNORE)
  if not has_image:
    out["image"] = np.zeros_like(out["image"])
    if "patch_mask" in out:
      out["patch_mask"] = np.zeros_like(out["patch_mask"])
  if flags:
    out["has_image"], out["has_text"] = np.bool_(has_image), np.bool_(has_text)
  return out
