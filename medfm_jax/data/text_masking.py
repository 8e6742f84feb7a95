"""BERT-style masked-language-modelling inputs, made per example in the grain workers (numpy).

Of a text's maskable tokens (every token that is not one of the tokenizer's ``special_ids``: pad,
bos/cls, eot/sep, mask, unk...) exactly ``max(1, round(probability * n))`` positions are chosen
uniformly without replacement (the original BERT ``create_pretraining_data`` rule: a short text
still gets a prediction; with ``probability=0`` none is chosen). Each chosen token independently
becomes ``mask_id`` with probability ``mask_frac``, a random non-special id (uniform) with
probability ``random_frac``, and stays unchanged otherwise. Labels hold the original id at the
chosen positions and -1 elsewhere. The rng is the example's augmentation rng (seeded by the data
seed and the example's global stream position), so masks are deterministic and resumable.
"""
from __future__ import annotations

import dataclasses

import numpy as np

IGNORE = -1    # label of positions that are not predicted


@dataclasses.dataclass(frozen=True)
class MLMSpec:
  """Picklable MLM settings plus what they need from the tokenizer."""
  mask_id: int
  vocab_size: int                     # random replacements are drawn from [0, vocab_size) ...
  special_ids: tuple[int, ...]        # ... minus these, which are never masked either
  probability: float = 0.15
  mask_frac: float = 0.8
  random_frac: float = 0.1

  def __post_init__(self):
    if not 0.0 <= self.probability <= 1.0:
      raise ValueError(f"data.mlm.probability={self.probability}: must be in [0, 1]")
    if not (0.0 <= self.mask_frac and 0.0 <= self.random_frac
            and self.mask_frac + self.random_frac <= 1.0):
      raise ValueError(f"data.mlm.mask_frac={self.mask_frac}, data.mlm.random_frac={self.random_frac}: "
                       "must be >= 0 with a sum <= 1 (the rest stays unchanged)")

  @classmethod
  def from_config(cls, mlm_cfg, tokenizer) -> "MLMSpec":
    """From ``data.mlm`` (probability, mask_frac, random_frac) and a loaded tokenizer."""
    if tokenizer.mask_id is None:
      raise ValueError("data.mlm is set but the tokenizer has no mask token ('[MASK]' or '<mask>'); "
                       "use data.tokenizer='bytes' or a tokenizer file that defines one")
    if not hasattr(mlm_cfg, "get"):
      raise ValueError(f"data.mlm={mlm_cfg!r}: must be a dict (probability, mask_frac, random_frac) or None")
    get = mlm_cfg.get
    return cls(int(tokenizer.mask_id), int(tokenizer.vocab_size),
               tuple(sorted(int(i) for i in tokenizer.special_ids)),
               float(get("probability", 0.15)), float(get("mask_frac", 0.8)),
               float(get("random_frac", 0.1)))

  def random_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` ids uniform over the non-special vocabulary ``[0, vocab_size) - special_ids``."""
    specials = np.array([i for i in self.special_ids if 0 <= i < self.vocab_size], np.int64)
    k = rng.integers(0, self.vocab_size - len(specials), n)
    # the k-th non-special id is k + #(specials <= it): shift past the specials in sorted order
    return (k + np.searchsorted(specials - np.arange(len(specials)), k, side="right")).astype(np.int32)


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator,
                spec: MLMSpec) -> tuple[np.ndarray, np.ndarray]:
  """``tokens int [L]`` -> ``(masked_tokens int32 [L], labels int32 [L])`` (labels -1 where the
  position is not predicted); see the module docstring for the rule."""
  tokens = np.asarray(tokens, np.int32)
  masked, labels = tokens.copy(), np.full(tokens.shape, IGNORE, np.int32)
  candidates = np.flatnonzero(~np.isin(tokens, spec.special_ids))
  if not len(candidates) or spec.probability == 0.0:
    return masked, labels
  n = max(1, int(round(spec.probability * len(candidates))))
  chosen = np.sort(rng.choice(candidates, size=n, replace=False))
  labels[chosen] = tokens[chosen]
  u = rng.uniform(size=n)
  masked[chosen[u < spec.mask_frac]] = spec.mask_id
  rand = chosen[(u >= spec.mask_frac) & (u < spec.mask_frac + spec.random_frac)]
  masked[rand] = spec.random_ids(rng, len(rand))
  return masked, labels
