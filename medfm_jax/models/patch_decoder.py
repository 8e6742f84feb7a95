"""Primus patch decoder (Wald et al., 2025, "Primus: Enforcing Attention Usage for 3D Medical Image
Segmentation"; nnssl / dynamic-network-architectures ``PatchDecode``): voxel logits from the final
ViT tokens alone.

For a cubic patch ``p = 2^n`` the decoder has ``n`` stride-2, kernel-2 transposed convolutions from
the token grid back to voxels; each but the last is followed by a channel LayerNorm and GELU. The
channels shrink geometrically from the encoder width to ``num_classes``: stage ``s`` has
``round8(width / r^(s+1))`` with ``r = (width / (2 num_classes))^(1/n)`` (at least 8), the last
stage ``num_classes``. There is no skip from the input volume and no convolution on voxel-resolution
image features, so every logit is a function of the encoder's tokens only (each token decodes its own
``p^3`` voxels). Transposed convolutions have a bias, He-normal weights (fan-in = input channels,
leaky-ReLU slope 1e-2, as nnssl's ``InitWeights_He(1e-2)``).

``DECODERS`` lists the 3D segmentation decoders; :func:`segmentation_model` builds one by name.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medfm_jax.models import layers, unetr, vit

DECODERS = ("unetr", "primus")    # objective.decoder: UNETR (input + conv skips) | Primus (tokens only)

_HE_INIT = nn.initializers.variance_scaling(2 / (1 + 1e-2 ** 2), "fan_in", "normal", in_axis=0, out_axis=-1)


def stage_channels(width: int, num_classes: int, patch: int) -> tuple[int, ...]:
  """Output channels of the ``n = log2(patch)`` upsampling stages (nnssl's ``PatchDecode``)."""
  n = unetr.num_levels(patch)
  ratio = (width / (2 * num_classes)) ** (1 / n)
  channels = [int(max(8, np.round((width / ratio ** (s + 1) + 1e-6) / 8) * 8)) for s in range(n)]
  return tuple(channels[:-1]) + (num_classes,)


class PatchDecoder(nn.Module):
  """Patch tokens ``[b, gd*gh*gw, width]`` on the token ``grid`` -> voxel logits
  ``[b, gd*p, gh*p, gw*p, num_classes]`` float32."""
  num_classes: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid):
    channels = stage_channels(tokens.shape[-1], self.num_classes, self.patch)
    y = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).astype(self.dtype)
    for s, ch in enumerate(channels):
      y = unetr.UpConv3d(ch, self.dtype, use_bias=True, kernel_init=_HE_INIT, name=f"up{s}")(y)
      if s < len(channels) - 1:
        y = layers.exact_gelu(layers.LayerNorm(1e-6, self.dtype, name=f"norm{s}")(y))
    return y.astype(jnp.float32)


class Primus(nn.Module):
  """A volumetric ViT encoder (``encoder``, cubic power-of-two patches) + :class:`PatchDecoder`:
  ``[b, D, H, W, c]`` -> voxel logits ``[b, D, H, W, num_classes]`` float32."""
  encoder: vit.VisionTransformer
  num_classes: int

  @nn.compact
  def __call__(self, volumes, deterministic: bool = True):
    enc = self.encoder
    patch, grid = unetr.cubic_patch_grid(enc, volumes, "Primus decoder")
    tokens = enc(volumes, deterministic=deterministic)
    return PatchDecoder(self.num_classes, patch[0], enc.dtype, name="decoder")(
        tokens[:, enc.num_prefix_tokens:], grid)


def segmentation_model(decoder: str, encoder: vit.VisionTransformer, num_classes: int,
                       feature_size: int) -> nn.Module:
  """The 3D segmentation model ``decoder`` (one of ``DECODERS``) on ``encoder``; ``feature_size`` is
  UNETR's full-resolution width (Primus derives its widths from the encoder's)."""
  if decoder == "unetr":
    return unetr.Unetr(encoder, num_classes, feature_size)
  if decoder == "primus":
    return Primus(encoder, num_classes)
  raise ValueError(f"objective.decoder={decoder!r}: allowed: {', '.join(DECODERS)}")

