"""Image <-> text retrieval recall@k over paired embeddings (row i of each is one pair).

Similarities are cosine. The rank of the true partner is the number of candidates scoring strictly
higher, so identical captions (the phantoms repeat some, e.g. "Chest X-ray with no focal finding.")
tie with the true one and count in its favour. Similarities are computed in chunks of queries.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ranks(queries: np.ndarray, candidates: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Rank (0 = best) of candidate i for query i."""
  out = []
  for s in range(0, len(queries), chunk):
    sims = queries[s:s + chunk] @ candidates.T                                  # [chunk, n]
    true = sims[np.arange(len(sims)), np.arange(s, s + len(sims))]
    out.append((sims > true[:, None]).sum(1))
  return np.concatenate(out)


def recall_at_k(image_emb, text_emb, ks=KS) -> dict[str, float]:
  """``{i2t_r@k, t2i_r@k}`` for k in ``ks``: fraction of images (texts) whose paired text (image)
  ranks in the top k."""
  img, txt = _normalize(image_emb), _normalize(text_emb)
  if img.shape != txt.shape:
    raise ValueError(f"image embeddings {img.shape} and text embeddings {txt.shape} must pair up")
  i2t, t2i = _ranks(img, txt), _ranks(txt, img)
  out = {}
  for k in ks:
    out[f"i2t_r@{k}"] = float(np.mean(i2t < k))
    out[f"t2i_r@{k}"] = float(np.mean(t2i < k))
  return out
