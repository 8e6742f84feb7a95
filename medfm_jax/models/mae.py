"""Masked autoencoder (He et al., 2022): ViT encoder on visible patches + light decoder."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import layers, vit
from medfm_jax.models.layers import constrain


def num_kept(length: int, mask_ratio: float, block: int = 1) -> int:
  """Patches kept of ``length`` at ``mask_ratio``, a whole number of blocks of ``block`` patches."""
  return int(length // block * (1 - mask_ratio)) * block


def random_masking(noise: jnp.ndarray, mask_ratio: float, block: int = 1):
  """Argsort masking. ``noise [b, L]`` -> ``(keep_ids [b, n_keep], mask [b, L], restore_ids [b, L])``.

  Keeps the :func:`num_kept` patches with the smallest noise; ``mask`` is 1 for removed patches in
  the original patch order. Block masking: patches of one block share their noise (see
  :func:`block_noise`) and ``block`` patches per block makes whole blocks kept or masked.
  """
  b, length = noise.shape
  n_keep = num_kept(length, mask_ratio, block)
  shuffle_ids = jnp.argsort(noise, axis=1)
  restore_ids = jnp.argsort(shuffle_ids, axis=1)
  keep_ids = shuffle_ids[:, :n_keep]
  mask = jnp.take_along_axis((jnp.arange(length) >= n_keep).astype(jnp.float32)[None].repeat(b, 0),
                             restore_ids, axis=1)
  return keep_ids, mask, restore_ids


def block_noise(noise_blocks: jnp.ndarray, grid: tuple[int, ...], block: tuple[int, ...]) -> jnp.ndarray:
  """Per-block noise ``[b, prod(grid / block)]`` -> per-patch noise ``[b, prod(grid)]`` (every patch
  of a block of ``block`` patches per axis gets its block's value; patches in row-major order)."""
  coarse = tuple(g // k for g, k in zip(grid, block))
  x = noise_blocks.reshape(noise_blocks.shape[0], *coarse)
  for axis, k in enumerate(block):
    x = jnp.repeat(x, k, axis=axis + 1)
  return x.reshape(noise_blocks.shape[0], -1)


class MaeDecoder(nn.Module):
  """Embeds visible tokens, fills mask tokens, unshuffles, adds sin-cos positions, predicts pixels."""
  width: int
  depth: int
  num_heads: int
  patch_dim: int                      # p*p*c (volumes: pd*ph*pw*c)
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  mlp_dim: int | None = None          # default 4 x width
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, latent, restore_ids, grid_hw):
    """``latent [b, 1+n_keep, d_enc]`` (cls first) -> per-patch predictions ``[b, L, patch_dim]``;
    ``grid_hw``: the 2-D or 3-D token grid (its sin-cos position embedding)."""
    x = layers.DenseGeneral((self.width,), ("embed", "mlp"), dtype=self.dtype, name="embed")(latent)
    b, length = restore_ids.shape
    mask_token = layers.param_with_axes(self, "mask_token", nn.initializers.normal(0.02),
                                        (1, 1, self.width), (None, None, "embed"))
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, length + 1 - x.shape[1], self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = layers.gather_tokens(patches, restore_ids)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(layers.sincos_nd(self.width, tuple(grid_hw), cls_token=True))[None].astype(self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    x = vit.Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.layer_norm_eps,
                    dtype=self.dtype, remat=self.remat, scan=self.scan,
                    attention_impl=self.attention_impl, name="encoder")(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    x = layers.DenseGeneral((self.patch_dim,), ("embed", None), dtype=self.dtype, name="pred")(x)
    return x[:, 1:]


class MaskedAutoencoder(nn.Module):
  """``__call__(images, noise, mask_ratio)`` -> dict(pred [b, L, p*p*c] float32, mask [b, L]).

  Volumes ``[b, D, H, W, c]`` work alike (3-D patches of the encoder, pred ``[b, L, pd*ph*pw*c]``);
  ``mask_block`` patches per block (e.g. 8 = 2x2x2 patches) keeps or masks whole blocks.
  """
  encoder: vit.VisionTransformer
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int | None = None  # default 4 x decoder_width
  # 'visible' (MAE): the encoder sees only the kept patches. 'all' (SimMIM, nnssl's Primus MAE):
  # every patch, the masked ones replaced by the encoder's learned mask token (needs mask_token).
  encoder_tokens: str = "visible"

  @nn.compact
  def __call__(self, images, noise, mask_ratio: float, deterministic: bool = True, mask_block: int = 1):
    enc = self.encoder
    patch = enc.patch_shape(images.ndim - 2)
    grid = vit.patch_grid(images.shape[1:-1], patch)
    keep_ids, mask, restore_ids = random_masking(noise, mask_ratio, mask_block)
    if self.encoder_tokens == "all":
      latent = self.encoder(images, patch_mask=mask > 0, deterministic=deterministic)
      restore_ids = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)   # already in order
    elif self.encoder_tokens == "visible":
      latent = self.encoder(images, keep_ids=keep_ids, deterministic=deterministic)
    else:
      raise ValueError(f"encoder_tokens={self.encoder_tokens!r}: allowed 'visible', 'all'")
    decoder = MaeDecoder(self.decoder_width, self.decoder_depth, self.decoder_heads,
                         int(np.prod(patch)) * images.shape[-1], enc.layer_norm_eps, enc.dtype,
                         enc.remat, enc.scan, self.decoder_mlp_dim, enc.attention_impl, name="decoder")
    pred = decoder(latent, restore_ids, grid)
    return {"pred": pred.astype(jnp.float32), "mask": mask, "latent": latent}


def normalize_patches(patches, eps: float = 1e-6):
  """MAE ``norm_pix_loss`` target: each patch ``[..., P]`` minus its mean over its unbiased std."""
  patches = jnp.asarray(patches, jnp.float32)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def patch_losses(images, pred, patch_size: int | tuple[int, ...], norm_pix_loss: bool = True):
  """Per-patch MSE ``[b, L]`` against (optionally per-patch normalised, unbiased var) pixels;
  ``patch_size`` a tuple: volumes (:func:`vit.patchify_any`)."""
  patch = patch_size if isinstance(patch_size, tuple) else (patch_size, patch_size)
  target = vit.patchify_any(images.astype(jnp.float32), patch)
  if norm_pix_loss:
    target = normalize_patches(target)
  return jnp.square(pred - target).mean(-1)


def mae_loss(images, pred, mask, patch_size: int | tuple[int, ...], norm_pix_loss: bool = True,
             visible_weight: float = 0.0):
  """Mean per-patch MSE over the masked patches (= the MSE over masked pixels / voxels), plus
  ``visible_weight`` x the mean over the visible patches (0, MAE's recipe: masked only)."""
  per_patch = patch_losses(images, pred, patch_size, norm_pix_loss)
  loss = (per_patch * mask).sum() / mask.sum()
  if visible_weight:
    loss = loss + visible_weight * (per_patch * (1.0 - mask)).sum() / jnp.maximum((1.0 - mask).sum(), 1.0)
  return loss
