"""Masked autoencoder (He et al., 2022): ViT encoder on visible patches + light decoder."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfm_jax.models import layers, vit
from medfm_jax.models.layers import constrain


def random_masking(noise: jnp.ndarray, mask_ratio: float):
  """Argsort masking. ``noise [b, L]`` -> ``(keep_ids [b, n_keep], mask [b, L], restore_ids [b, L])``.

  Keeps the ``int(L * (1 - mask_ratio))`` patches with the smallest noise; ``mask`` is 1 for removed
  patches in the original patch order.
  """
  b, length = noise.shape
  n_keep = int(length * (1 - mask_ratio))
  shuffle_ids = jnp.argsort(noise, axis=1)
  restore_ids = jnp.argsort(shuffle_ids, axis=1)
  keep_ids = shuffle_ids[:, :n_keep]
  mask = jnp.take_along_axis((jnp.arange(length) >= n_keep).astype(jnp.float32)[None].repeat(b, 0),
                             restore_ids, axis=1)
  return keep_ids, mask, restore_ids


class MaeDecoder(nn.Module):
  """Embeds visible tokens, fills mask tokens, unshuffles, adds sin-cos positions, predicts pixels."""
  width: int
  depth: int
  num_heads: int
  patch_dim: int                      # p*p*c
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  mlp_dim: int | None = None          # default 4 x width
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, latent, restore_ids, grid_hw):
    """``latent [b, 1+n_keep, d_enc]`` (cls first) -> per-patch predictions ``[b, L, patch_dim]``."""
    x = layers.DenseGeneral((self.width,), ("embed", "mlp"), dtype=self.dtype, name="embed")(latent)
    b, length = restore_ids.shape
    mask_token = layers.param_with_axes(self, "mask_token", nn.initializers.normal(0.02),
                                        (1, 1, self.width), (None, None, "embed"))
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, length + 1 - x.shape[1], self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = layers.gather_tokens(patches, restore_ids)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(layers.sincos_2d(self.width, *grid_hw, cls_token=True))[None].astype(self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    x = vit.Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.layer_norm_eps,
                    dtype=self.dtype, remat=self.remat, scan=self.scan,
                    attention_impl=self.attention_impl, name="encoder")(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    x = layers.DenseGeneral((self.patch_dim,), ("embed", None), dtype=self.dtype, name="pred")(x)
    return x[:, 1:]


class MaskedAutoencoder(nn.Module):
  """``__call__(images, noise, mask_ratio)`` -> dict(pred [b, L, p*p*c] float32, mask [b, L])."""
  encoder: vit.VisionTransformer
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int | None = None  # default 4 x decoder_width

  @nn.compact
  def __call__(self, images, noise, mask_ratio: float, deterministic: bool = True):
    enc = self.encoder
    p = enc.size.patch_size
    grid = (images.shape[1] // p, images.shape[2] // p)
    keep_ids, mask, restore_ids = random_masking(noise, mask_ratio)
    latent = self.encoder(images, keep_ids=keep_ids, deterministic=deterministic)
    decoder = MaeDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                         p * p * images.shape[-1], enc.layer_norm_eps, enc.dtype, enc.remat, enc.scan,
                         self.decoder_mlp_dim, enc.attention_impl, name="decoder")
    pred = decoder(latent, restore_ids, grid)
    return {"pred": pred.astype(jnp.float32), "mask": mask, "latent": latent}


def normalize_patches(patches, eps: float = 1e-6):
  """MAE ``norm_pix_loss`` target: each patch ``[..., P]`` minus its mean over its unbiased std."""
  patches = jnp.asarray(patches, jnp.float32)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def patch_losses(images, pred, patch_size: int, norm_pix_loss: bool = True):
  """Per-patch MSE ``[b, L]`` against (optionally per-patch normalised, unbiased var) pixels."""
  target = vit.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    target = normalize_patches(target)
  return jnp.square(pred - target).mean(-1)


def mae_loss(images, pred, mask, patch_size: int, norm_pix_loss: bool = True):
  """Mean per-patch MSE over the masked patches only."""
  per_patch = patch_losses(images, pred, patch_size, norm_pix_loss)
  return (per_patch * mask).sum() / mask.sum()
