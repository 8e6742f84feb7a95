"""SAM prompt encoder: points, boxes and low-resolution masks -> sparse and dense embeddings.

Prompt shapes (``B`` images, ``M`` prompts per image, ``N`` points per prompt; pixel coordinates
``(x, y)`` in the frame of the ``input_image_size`` image fed to the image encoder):

- ``points [B, M, N, 2]`` with ``labels [B, M, N]``: 1 positive, 0 negative, -1 "not a point"
  (learned embedding), -10 padding (zero embedding, Hugging Face's convention), 2 / 3 the top-left /
  bottom-right box corner (SAM 2's convention: a box written as two points, so prompts of mixed
  types share one fixed shape);
- ``boxes [B, M, 4]`` as ``(x0, y0, x1, y1)``: two corner tokens;
- ``masks [B, M, 4h, 4w]``: mask logits at 4x the image-embedding grid (SAM's 256 x 256 for 1024 px).

Points get a "not a point" padding token when no box is given (as in SAM). Coordinates are shifted
by half a pixel and encoded with random Fourier features (a fixed Gaussian matrix ``[2, C/2]``, then
``[sin, cos]``), plus a learned embedding per point type. Without a mask prompt the dense embedding
is the learned "no mask" vector at every grid cell.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import layers

POINT_LABELS = {"pad": -10, "not_a_point": -1, "negative": 0, "positive": 1, "box_top_left": 2,
                "box_bottom_right": 3}


class SamPromptEncoder(nn.Module):
  """``__call__(points, labels, boxes, masks, batch_size)`` -> ``(sparse [B, M, T, C], dense [B, M', h, w, C])``
  (``M'``: the mask prompts' M, else 1); :meth:`dense_pe` -> ``[h, w, C]``."""
  embed_dim: int = 256
  image_embedding_size: tuple[int, int] = (64, 64)
  input_image_size: tuple[int, int] = (1024, 1024)
  mask_in_chans: int = 16
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  def setup(self):
    c = self.embed_dim
    if c % 2:
      raise ValueError(f"prompt embed_dim must be even, got {c}")
    normal = nn.initializers.normal(1.0)          # torch nn.Embedding / randn
    p = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(normal, axes), shape, jnp.float32)
    self.pe_gaussian = p("pe_gaussian", (2, c // 2), (None, None))
    self.point_embeddings = p("point_embeddings", (4, c), (None, "embed"))
    self.not_a_point_embed = p("not_a_point_embed", (1, c), (None, "embed"))
    self.no_mask_embed = p("no_mask_embed", (1, c), (None, "embed"))
    m = self.mask_in_chans
    self.mask_conv1 = layers.Conv(m // 4, 2, strides=2, dtype=self.dtype)
    self.mask_ln1 = layers.LayerNorm(self.layer_norm_eps, self.dtype)
    self.mask_conv2 = layers.Conv(m, 2, strides=2, dtype=self.dtype)
    self.mask_ln2 = layers.LayerNorm(self.layer_norm_eps, self.dtype)
    self.mask_conv3 = layers.Conv(c, 1, dtype=self.dtype)

  def _fourier(self, coords):
    """``coords [..., 2]`` in ``[0, 1]`` -> ``[..., C]`` random Fourier features."""
    x = jnp.einsum("...i,ij->...j", 2 * coords.astype(jnp.float32) - 1, self.pe_gaussian,
                   precision="highest")
    x = 2 * np.pi * x
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)

  def _encode_coords(self, xy):
    """Pixel coordinates ``[..., 2]`` (x, y) -> Fourier features of their pixel centres."""
    h, w = self.input_image_size
    xy = xy.astype(jnp.float32) + 0.5
    return self._fourier(jnp.stack([xy[..., 0] / w, xy[..., 1] / h], axis=-1))

  def dense_pe(self):
    """Positional encoding of the image-embedding grid's cell centres, ``[h, w, C]``."""
    h, w = self.image_embedding_size
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return self._fourier(jnp.asarray(np.stack([xs, ys], axis=-1), jnp.float32))

  def embed_points(self, points, labels, pad: bool):
    """``points [B, M, N, 2]``, ``labels [B, M, N]`` -> ``[B, M, N (+1 with pad), C]``."""
    if pad:
      points = jnp.concatenate([points, jnp.zeros((*points.shape[:-2], 1, 2), points.dtype)], axis=-2)
      labels = jnp.concatenate([labels, jnp.full((*labels.shape[:-1], 1), -1, labels.dtype)], axis=-1)
    emb = self._encode_coords(points)
    lab = labels[..., None]
    emb = jnp.where(lab == POINT_LABELS["not_a_point"], self.not_a_point_embed[0], emb)
    emb = jnp.where(lab == POINT_LABELS["pad"], 0.0, emb)
    for i in range(4):
      emb = jnp.where(lab == i, emb + self.point_embeddings[i], emb)
    return emb

  def embed_boxes(self, boxes):
    """``boxes [B, M, 4]`` (x0, y0, x1, y1) -> corner tokens ``[B, M, 2, C]``."""
    corners = self._encode_coords(boxes.reshape(*boxes.shape[:-1], 2, 2))
    return corners + self.point_embeddings[2:4]

  def embed_masks(self, masks):
    """``masks [B, M, 4h, 4w]`` -> ``[B, M, h, w, C]`` (two stride-2 convs with LayerNorm + GELU, 1x1 conv)."""
    b, m, hh, ww = masks.shape
    x = masks.reshape(b * m, hh, ww, 1).astype(self.dtype)
    x = layers.exact_gelu(self.mask_ln1(self.mask_conv1(x)))
    x = layers.exact_gelu(self.mask_ln2(self.mask_conv2(x)))
    x = self.mask_conv3(x)
    return x.reshape(b, m, *x.shape[1:])

  def __call__(self, points=None, labels=None, boxes=None, masks=None, batch_size: int | None = None,
               pad_points: bool | None = None):
    """``pad_points``: append a "not a point" token to the points; None = SAM's rule (when no box)."""
    if points is not None and labels is None:
      raise ValueError("point prompts need labels")
    sparse_in = [x.shape[:2] for x in (points, boxes) if x is not None]
    images = {s[0] for s in sparse_in} | ({masks.shape[0]} if masks is not None else set())
    if len(set(sparse_in)) > 1 or len(images) > 1 or (
        masks is not None and sparse_in and masks.shape[1] not in (1, sparse_in[0][1])):
      raise ValueError(f"prompts disagree on [images, prompts]: points/boxes {sparse_in}, "
                       f"masks {None if masks is None else masks.shape[:2]} (masks may have 1 prompt)")
    bm = sparse_in[0] if sparse_in else (masks.shape[:2] if masks is not None else (batch_size or 1, 1))
    c = self.embed_dim
    sparse = [jnp.zeros((*bm, 0, c), jnp.float32)]
    if points is not None:
      sparse.append(self.embed_points(points, labels, pad=boxes is None if pad_points is None else pad_points))
    if boxes is not None:
      sparse.append(self.embed_boxes(boxes))
    sparse = jnp.concatenate(sparse, axis=2).astype(self.dtype)
    if masks is not None:
      dense = self.embed_masks(masks)
    else:
      if self.is_initializing():  # create the mask-embedding params whatever prompts init sees
        h, w = self.image_embedding_size
        self.embed_masks(jnp.zeros((1, 1, 4 * h, 4 * w), jnp.float32))
      dense = jnp.broadcast_to(self.no_mask_embed[0].astype(self.dtype), (bm[0], 1, *self.image_embedding_size, c))
    return sparse, dense
