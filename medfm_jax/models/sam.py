"""Segment Anything (Kirillov et al., 2023) and MedSAM (Ma et al., 2024) as one linen module.

``SegmentAnything(image_encoder, prompt_encoder, mask_decoder)``; params ``image_encoder``,
``prompt_encoder``, ``mask_decoder``. Methods (``apply(..., method=...)``):

- ``embed_image(images [B, H, W, c])`` -> image embeddings ``[B, h, w, C]``;
- ``predict(embeddings, points=, labels=, boxes=, masks=, multimask_output=)`` ->
  ``(low-res mask logits [B, M, K, 4h, 4w], iou [B, M, K])`` (prompt shapes: :mod:`sam_prompt`);
- ``__call__(images, ...)``: both, returning a dict.

Images are expected already normalised (SAM: ImageNet mean/std on 0..255 pixels) and padded to
``image_size``. :func:`build_sam` makes the model from a flat dict of sizes (:data:`SAM_SIZES`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfm_jax.models import vit
from medfm_jax.models.sam_decoder import SamMaskDecoder
from medfm_jax.models.sam_encoder import SamImageEncoder, ViTNeckEncoder
from medfm_jax.models.sam_prompt import SamPromptEncoder

# Official image-encoder sizes (segment_anything.build_sam): width, depth, heads, global blocks.
SAM_SIZES = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}

# Every field of a SAM config (``build_sam``), with SAM ViT-B's values.
DEFAULTS = dict(
    image_size=1024, patch_size=16, channels=3, width=768, depth=12, num_heads=12, mlp_dim=3072,
    window_size=14, global_attn_indexes=(2, 5, 8, 11), use_abs_pos=True, use_rel_pos=True, qkv_bias=True,
    layer_norm_eps=1e-6, prompt_dim=256, mask_in_chans=16, decoder_depth=2, decoder_heads=8,
    decoder_mlp_dim=2048, attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3,
    iou_head_hidden_dim=256, decoder_layer_norm_eps=1e-5)


class SegmentAnything(nn.Module):
  """Image encoder + prompt encoder + mask decoder (see the module docstring)."""
  image_encoder: nn.Module
  prompt_encoder: SamPromptEncoder
  mask_decoder: SamMaskDecoder

  def embed_image(self, images, deterministic: bool = True):
    return self.image_encoder(images, deterministic=deterministic)

  def predict(self, image_embeddings, points=None, labels=None, boxes=None, masks=None,
              multimask_output: bool | None = True, pad_points: bool | None = None):
    sparse, dense = self.prompt_encoder(points, labels, boxes, masks, batch_size=image_embeddings.shape[0],
                                        pad_points=pad_points)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output)

  def __call__(self, images, points=None, labels=None, boxes=None, masks=None, multimask_output: bool = True,
               deterministic: bool = True):
    emb = self.embed_image(images, deterministic)
    logits, iou = self.predict(emb, points, labels, boxes, masks, multimask_output)
    return {"image_embeddings": emb, "masks": logits, "iou": iou}


def full_config(cfg: dict[str, Any] | None = None, **overrides) -> dict[str, Any]:
  """:data:`DEFAULTS` updated by ``cfg`` and ``overrides``; one-line error on an unknown field."""
  out = dict(DEFAULTS)
  for k, v in {**(cfg or {}), **overrides}.items():
    if k not in DEFAULTS:
      raise ValueError(f"SAM config field {k!r} is unknown; allowed: {', '.join(sorted(DEFAULTS))}")
    out[k] = tuple(v) if k == "global_attn_indexes" else v
  c, rate = out["prompt_dim"], out["attention_downsample_rate"]
  if out["width"] % out["num_heads"]:
    raise ValueError(f"SAM width={out['width']} is not divisible by num_heads={out['num_heads']}")
  if c % 8 or c % rate or (c // rate) % out["decoder_heads"] or c % out["decoder_heads"]:
    raise ValueError(f"SAM prompt_dim={c} must be divisible by 8, and prompt_dim and prompt_dim / "
                     f"attention_downsample_rate ({rate}) by decoder_heads={out['decoder_heads']}")
  return out


def build_prompt_and_decoder(cfg: dict[str, Any], grid: int, dtype=jnp.float32):
  """The prompt encoder and mask decoder for an image-embedding grid ``grid x grid``."""
  c = cfg["prompt_dim"]
  prompt = SamPromptEncoder(c, (grid, grid), (cfg["image_size"],) * 2, cfg["mask_in_chans"], 1e-6, dtype)
  decoder = SamMaskDecoder(c, cfg["num_multimask_outputs"], cfg["decoder_depth"], cfg["decoder_heads"],
                           cfg["decoder_mlp_dim"], cfg["attention_downsample_rate"], cfg["iou_head_depth"],
                           cfg["iou_head_hidden_dim"], cfg["decoder_layer_norm_eps"], dtype)
  return prompt, decoder


def build_sam(cfg: dict[str, Any] | None = None, dtype=jnp.float32, remat: bool = False,
              attention_impl: str | None = None, attention_chunk: int = 0, **overrides) -> SegmentAnything:
  """SAM with its own ViTDet image encoder, sized by ``cfg`` (fields: :data:`DEFAULTS`);
  ``attention_chunk > 0`` computes global attention that many queries at a time (less memory,
  same outputs: :class:`~medfm_jax.models.sam_encoder.RelPosAttention`)."""
  cfg = full_config(cfg, **overrides)
  if cfg["image_size"] % cfg["patch_size"]:
    raise ValueError(f"SAM image_size={cfg['image_size']} is not divisible by patch_size={cfg['patch_size']}")
  encoder = SamImageEncoder(cfg["image_size"], cfg["patch_size"], cfg["width"], cfg["depth"], cfg["num_heads"],
                            cfg["mlp_dim"], cfg["prompt_dim"], cfg["window_size"], tuple(cfg["global_attn_indexes"]),
                            cfg["use_abs_pos"], cfg["use_rel_pos"], cfg["qkv_bias"], cfg["layer_norm_eps"], dtype,
                            remat, attention_impl, attention_chunk)
  return SegmentAnything(encoder, *build_prompt_and_decoder(cfg, cfg["image_size"] // cfg["patch_size"], dtype))


def build_sam_on_vit(encoder: vit.VisionTransformer, image_size: int, cfg: dict[str, Any] | None = None,
                     **overrides) -> SegmentAnything:
  """SAM whose image encoder is one of our ViTs plus a conv neck (:class:`ViTNeckEncoder`);
  ``cfg`` sizes the prompt encoder and decoder (its encoder fields are ignored)."""
  cfg = full_config(cfg, image_size=image_size, **overrides)
  p = encoder.size.patch_size
  if image_size % p:
    raise ValueError(f"SAM image_size={image_size} is not divisible by the encoder's patch size {p}")
  return SegmentAnything(ViTNeckEncoder(encoder, cfg["prompt_dim"]),
                         *build_prompt_and_decoder(cfg, image_size // p, encoder.dtype))
