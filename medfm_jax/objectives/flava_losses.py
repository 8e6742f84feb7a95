"""FLAVA loss terms as pure float32 ``jnp`` functions (traced under ``jit``; global arrays).

Every term takes a ``valid`` / ``mask`` selection and is safe on selections that are empty:
ignored entries may carry any label (e.g. -1) and are never used as an index, and a term with
nothing selected is exactly 0 with a finite, zero gradient (a unimodal batch, a text with no
masked token or a batch without negatives never produces NaN).

- MLM / MIM-codebook / ITM: cross-entropy averaged over the selected entries.
- MIM-pixel: MAE's target, per-patch normalised pixels (mean, unbiased variance, eps 1e-6), MSE
  averaged over the masked patches.
- ITM hard negatives (ALBEF / FLAVA): for each row one column drawn with probability
  ``softmax(sim)`` over the valid columns other than the row's own positive (Gumbel-max).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medfm_jax.models.mae import normalize_patches

Array = jnp.ndarray


def masked_cross_entropy(logits: Array, labels: Array, valid: Array) -> tuple[Array, Array]:
  """``(sum, count)`` of ``-log softmax(logits)[label]`` over the entries where ``valid``.

  ``logits [..., V]``, ``labels [...]`` int (any value where not valid), ``valid [...]`` bool.
  ``count`` is float32 so that sums and counts can be added across terms and devices.
  """
  logits = jnp.asarray(logits, jnp.float32)
  valid = jnp.asarray(valid, bool)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid, dtype=jnp.float32)


def safe_mean(total: Array, count: Array) -> Array:
  """``total / count``, and 0 (with zero gradient) when ``count == 0``."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_mean_cross_entropy(logits: Array, labels: Array, valid: Array) -> Array:
  """Mean cross-entropy over the ``valid`` entries (0 when there is none)."""
  return safe_mean(*masked_cross_entropy(logits, labels, valid))


def masked_accuracy(logits: Array, labels: Array, valid: Array) -> Array:
  """Fraction of ``valid`` entries whose argmax equals the label (0 when there is none)."""
  valid = jnp.asarray(valid, bool)
  hit = jnp.where(valid, jnp.argmax(logits, axis=-1) == labels, False)
  return safe_mean(jnp.sum(hit, dtype=jnp.float32), jnp.sum(valid, dtype=jnp.float32))


def mlm_loss(logits: Array, labels: Array, valid: Array | None = None) -> Array:
  """Masked-language-modelling loss: ``logits [b, L, V]``, ``labels [b, L]`` (-1 = not predicted,
  as ``data.text_masking`` writes them); ``valid`` defaults to ``labels >= 0``."""
  return masked_mean_cross_entropy(logits, labels, labels >= 0 if valid is None else valid)


def mim_codebook_loss(logits: Array, ids: Array, mask: Array) -> Array:
  """Discrete MIM: ``logits [b, N, K]`` against codebook ``ids [b, N]`` on masked patches
  ``mask [b, N]``."""
  return masked_mean_cross_entropy(logits, ids, mask)


def mim_pixel_loss(pred: Array, target_patches: Array, mask: Array, norm_pix: bool = True) -> Array:
  """Pixel MIM: mean over masked patches (``mask [b, N]``) of the per-patch MSE between
  ``pred [b, N, P]`` and the (normalised, if ``norm_pix``) ``target_patches [b, N, P]``."""
  target = normalize_patches(target_patches) if norm_pix else jnp.asarray(target_patches, jnp.float32)
  per_patch = jnp.square(jnp.asarray(pred, jnp.float32) - target).mean(-1)
  mask = jnp.asarray(mask, bool)
  return safe_mean(jnp.sum(jnp.where(mask, per_patch, 0.0)), jnp.sum(mask, dtype=jnp.float32))


def sample_hard_negatives(sim: Array, valid_cols: Array, self_cols: Array,
                          rng: jax.Array, excluded: Array | None = None) -> tuple[Array, Array]:
  """One hard negative column per row, drawn from ``softmax(sim)`` restricted to the valid
  columns other than the row's own.

  ``sim [b, B]``: similarities (already temperature-scaled) of ``b`` rows against ``B`` columns;
  ``valid_cols [B]`` bool; ``self_cols [b]`` int: each row's positive column. Returns
  ``(index [b] int32, has_negative [b] bool)``; a row without any candidate gets its own column
  and ``has_negative=False``. ``excluded [b, B]`` bool (optional) removes more candidates per row
  (e.g. columns whose caption is identical to the row's: not true negatives). Gumbel-max (``argmax(sim + Gumbel)``) samples exactly from the
  restricted softmax; no gradient flows through the choice.
  """
  sim = jax.lax.stop_gradient(jnp.asarray(sim, jnp.float32))
  cols = jnp.arange(sim.shape[1])
  allowed = jnp.asarray(valid_cols, bool)[None, :] & (cols[None, :] != self_cols[:, None])
  if excluded is not None:
    allowed = allowed & ~jnp.asarray(excluded, bool)
  gumbel = jax.random.gumbel(rng, sim.shape, jnp.float32)
  scores = jnp.where(allowed, sim + gumbel, -jnp.inf)
  has_negative = jnp.any(allowed, axis=-1)
  index = jnp.where(has_negative, jnp.argmax(scores, axis=-1), self_cols)
  return index.astype(jnp.int32), has_negative


def same_sequences(tokens: Array) -> Array:
  """``[B, B]`` bool: rows of ``tokens [B, L]`` that are identical (compared through two 32-bit
  polynomial hashes, so no ``[B, B, L]`` tensor is built)."""
  t = jnp.asarray(tokens).astype(jnp.uint32)
  powers = lambda base: base ** jnp.arange(t.shape[1], dtype=jnp.uint32)     # wraps mod 2**32
  h1 = jnp.sum(t * powers(jnp.uint32(1_000_003)), axis=-1, dtype=jnp.uint32)
  h2 = jnp.sum((t + 1) * powers(jnp.uint32(2_654_435_761)), axis=-1, dtype=jnp.uint32)
  return (h1[:, None] == h1[None, :]) & (h2[:, None] == h2[None, :])


def itm_loss(logits: Array, labels: Array, valid: Array) -> Array:
  """Image-text matching: 2-way ``logits [b, 2]``, ``labels [b]`` (1 = matched pair), averaged
  over the ``valid`` rows (0 when there is none)."""
  return masked_mean_cross_entropy(logits, labels, valid)
