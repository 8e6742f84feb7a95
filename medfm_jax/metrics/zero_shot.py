"""Zero-shot classification with an image-text model: class names x prompt templates.

For each class, every template is filled with the class phrase, tokenized and embedded by the text
tower; the embeddings are L2-normalised, averaged, and the average renormalised (CLIP's prompt
ensembling). Image scores are ``100 * normalise(image) · classᵀ``; metrics are those of
:func:`medfm_jax.metrics.classification.classification_metrics` (accuracy, balanced accuracy, macro AUROC).

Prompts for the phantoms are derived from their captions ("Brain MRI with a small lesion in the
center."): a finding's class phrase is the caption's finding phrase without size and location, and
its templates name each modality ("Chest X-ray with {finding}.") plus modality-free ones. Other
sources use the class name with underscores as spaces and :data:`GENERIC_TEMPLATES`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from medfm_jax.data import phantoms
from medfm_jax.metrics import classification

GENERIC_TEMPLATES = ("a medical image showing {}.", "an image with {}.", "{}.")
FINDING_PHRASES = {
    "none": "no focal finding", "single_lesion": "a lesion", "multiple_lesions": "multiple lesions",
    "elongated_lesion": "an elongated lesion", "calcification": "a small calcification",
    "ring_enhancing": "a ring-enhancing lesion"}


def phantom_prompts(label: str) -> dict[str, list[str]]:
  """``{class name: [prompt, ...]}`` for the phantoms' ``finding`` or ``modality`` label."""
  modalities = [phantoms.MODALITY_NAMES[m] for m in phantoms.MODALITIES]
  if label == "finding":
    return {name: [f"{m} with {FINDING_PHRASES[name]}." for m in modalities]
            + [t.format(FINDING_PHRASES[name]) for t in GENERIC_TEMPLATES]
            for name in phantoms.FINDINGS}
  if label == "modality":
    return {name: [f"{phantoms.MODALITY_NAMES[name]} with {FINDING_PHRASES[f]}." for f in phantoms.FINDINGS]
            + [f"{phantoms.MODALITY_NAMES[name]}."]
            for name in phantoms.MODALITIES}
  raise ValueError(f"data.label={label!r}: phantom zero-shot prompts exist for 'finding', 'modality'")


def class_prompts(source: str, label: str, class_names: Sequence[str],
                  templates: Sequence[str] = GENERIC_TEMPLATES) -> dict[str, list[str]]:
  """Prompts per class: phantom caption phrases, else ``templates`` filled with the class name."""
  if source == "phantoms":
    return phantom_prompts(label)
  return {c: [t.format(c.replace("_", " ")) for t in templates] for c in class_names}


def class_embeddings(prompts: dict[str, list[str]], embed_texts: Callable[[list[str]], np.ndarray]
                     ) -> np.ndarray:
  """``[C, e]``: per class, normalised prompt embeddings averaged then renormalised."""
  flat = [p for ps in prompts.values() for p in ps]
  emb = _normalize(np.asarray(embed_texts(flat), np.float64))
  out, start = [], 0
  for ps in prompts.values():
    out.append(emb[start:start + len(ps)].mean(0))
    start += len(ps)
  return _normalize(np.stack(out))


def scores(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
  """Zero-shot logits ``100 * normalise(image) · classᵀ`` ``[n, C]``."""
  return 100.0 * _normalize(np.asarray(image_emb, np.float64)) @ class_emb.T


def zero_shot_metrics(image_emb: np.ndarray, labels: np.ndarray, prompts: dict[str, list[str]],
                      embed_texts: Callable[[list[str]], np.ndarray]) -> dict:
  """Classification metrics of the zero-shot classifier built from ``prompts`` (class order =
  label ids)."""
  return classification.classification_metrics(scores(image_emb, class_embeddings(prompts, embed_texts)),
                                        labels, list(prompts))


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
