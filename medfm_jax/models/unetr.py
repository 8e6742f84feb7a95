"""UNETR (Hatamizadeh et al., 2022): a convolutional decoder from volumetric ViT tokens to voxel
logits, laid out as MONAI's ``monai.networks.nets.UNETR`` (weights convert one to one, see
``medfm_jax.interop.monai_unetr``).

For a cubic patch ``p = 2^n`` (16 in UNETR, 8 in Primus) the decoder has ``n`` levels; level
``k = 1..n`` works at ``1/2^(k-1)`` of the input resolution with ``feature_size * 2^(k-1)``
channels. Level 1's skip is a residual conv block on the input volume; level ``k >= 2``'s skip comes
from the output of encoder block index ``(k-1) * depth // n`` (MONAI: ``hidden_states_out[3, 6,
9]`` of 12 blocks), reshaped to the token grid and upsampled by ``n - k + 1``
stride-2 transposed convolutions (each but the first followed by a residual block). The final
(layer-normed) tokens enter level ``n``; each level upsamples by 2, concatenates its skip and runs a
residual block (conv3-IN-lReLU-conv3-IN + a 1x1-conv-IN shortcut when channels change, lReLU).
Instance norm without affine parameters, leaky ReLU slope 0.01, convolutions without bias except
the final 1x1 output conv, as MONAI's defaults.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfm_jax.models import layers, vit
from medfm_jax.models.layers import constrain

_CONV_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")   # PyTorch's default
_ACT = ("batch", None, None, None, "act_embed")


class Conv3d(nn.Module):
  """3-D convolution over NDHWC inputs, kernel ``[k, k, k, in, out]`` (DHWIO), 'same' padding."""
  features: int
  kernel_size: int = 3
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = layers.param_with_axes(self, "kernel", _CONV_INIT, (k, k, k, x.shape[-1], self.features),
                                    (None, None, None, None, "embed"))
    pad = ((k // 2, k // 2),) * 3
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1, 1), pad,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if self.use_bias:
      y = y + layers.param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), ("embed",)).astype(self.dtype)
    return constrain(y, _ACT)


class UpConv3d(nn.Module):
  """Stride-2, kernel-2 transposed convolution: each input voxel writes its own 2x2x2 block,
  ``out[2d+i, 2h+j, 2w+k] = x[d, h, w] @ W[:, i, j, k]`` (+ bias with ``use_bias``); kernel
  ``[in, 2, 2, 2, out]``, initialised by ``kernel_init`` (default: PyTorch's)."""
  features: int
  dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Any = _CONV_INIT

  @nn.compact
  def __call__(self, x):
    kernel = layers.param_with_axes(self, "kernel", self.kernel_init,
                                    (x.shape[-1], 2, 2, 2, self.features), (None, None, None, None, "embed"))
    b, d, h, w, _ = x.shape
    y = jnp.einsum("bdhwc,cijko->bdihjwko", x.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(b, 2 * d, 2 * h, 2 * w, self.features)
    if self.use_bias:
      y = y + layers.param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), ("embed",)).astype(self.dtype)
    return constrain(y, _ACT)


def instance_norm(x, eps: float = 1e-5):
  """Per example and channel over the spatial axes (biased variance), no affine parameters."""
  xf = x.astype(jnp.float32)
  mean = xf.mean((1, 2, 3), keepdims=True)
  var = jnp.square(xf - mean).mean((1, 2, 3), keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def leaky_relu(x):
  return jax.nn.leaky_relu(x, 0.01)


class ResBlock(nn.Module):
  """MONAI's ``UnetResBlock`` (kernel 3, stride 1, instance norm, leaky ReLU)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = leaky_relu(instance_norm(Conv3d(self.features, dtype=self.dtype, name="conv1")(x)))
    y = instance_norm(Conv3d(self.features, dtype=self.dtype, name="conv2")(y))
    if x.shape[-1] != self.features:
      x = instance_norm(Conv3d(self.features, 1, dtype=self.dtype, name="conv3")(x))
    return leaky_relu(y + x)


def num_levels(patch: int) -> int:
  """Decoder levels for a cubic patch (a power of two >= 2); one-line error otherwise."""
  n = int(patch).bit_length() - 1
  if patch < 2 or patch != 1 << n:
    raise ValueError(f"UNETR decoder: patch size {patch} must be a power of two >= 2 (cubic)")
  return n


def skip_layers(depth: int, patch: int) -> tuple[int, ...]:
  """Encoder blocks whose outputs feed the skips of levels 2..n (MONAI: (3, 6, 9) of 12 at p=16)."""
  n = num_levels(patch)
  return tuple(j * depth // n for j in range(1, n))


class UnetrDecoder(nn.Module):
  """Voxel logits ``[b, D, H, W, num_classes]`` from the input volume, the final tokens and the
  skip blocks' tokens (``[b, gd*gh*gw, width]`` each, patch tokens only)."""
  num_classes: int
  patch: int
  feature_size: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, volumes, tokens, skips, grid):
    n = num_levels(self.patch)
    if len(skips) != n - 1:
      raise ValueError(f"UNETR decoder at patch {self.patch} needs {n - 1} skip token sets, got {len(skips)}")
    to_grid = lambda t: t.reshape(t.shape[0], *grid, t.shape[-1]).astype(self.dtype)
    fs = self.feature_size
    enc = [ResBlock(fs, self.dtype, name="encoder1")(volumes.astype(self.dtype))]
    for k, t in zip(range(2, n + 1), skips):                 # level k: resolution / 2^(k-1)
      ch = fs * 2 ** (k - 1)
      y = UpConv3d(ch, self.dtype, name=f"encoder{k}_up")(to_grid(t))
      for i in range(n - k):
        y = UpConv3d(ch, self.dtype, name=f"encoder{k}_up{i}")(y)
        y = ResBlock(ch, self.dtype, name=f"encoder{k}_block{i}")(y)
      enc.append(y)
    y = to_grid(tokens)
    for k in range(n, 0, -1):                                # decoder{k+1} in MONAI's names
      ch = fs * 2 ** (k - 1)
      y = UpConv3d(ch, self.dtype, name=f"decoder{k}_up")(y)
      y = ResBlock(ch, self.dtype, name=f"decoder{k}_block")(jnp.concatenate([y, enc[k - 1]], -1))
    return Conv3d(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="out")(y).astype(jnp.float32)


def cubic_patch_grid(encoder: vit.VisionTransformer, volumes, decoder: str):
  """(the encoder's cubic patch ``(p, p, p)``, the token grid of ``volumes [b, D, H, W, c]``); a
  ``decoder`` (named in the error) needs cubic patches."""
  patch = encoder.patch_shape(3)
  if len(set(patch)) != 1:
    raise ValueError(f"{decoder}: needs cubic patches, got model.patch_3d={patch}")
  return patch, vit.patch_grid(volumes.shape[1:4], patch)


class Unetr(nn.Module):
  """A volumetric ViT encoder (``encoder``, cubic power-of-two patches) + :class:`UnetrDecoder`:
  ``[b, D, H, W, c]`` -> voxel logits ``[b, D, H, W, num_classes]`` float32."""
  encoder: vit.VisionTransformer
  num_classes: int
  feature_size: int = 16

  @nn.compact
  def __call__(self, volumes, deterministic: bool = True):
    enc = self.encoder
    patch, grid = cubic_patch_grid(enc, volumes, "UNETR decoder")
    layers_ = skip_layers(enc.size.depth, patch[0])
    tokens, hidden = enc(volumes, deterministic=deterministic, return_hidden=layers_)
    prefix = enc.num_prefix_tokens
    return UnetrDecoder(self.num_classes, patch[0], self.feature_size, enc.dtype, name="decoder")(
        volumes, tokens[:, prefix:], [h[:, prefix:] for h in hidden], grid)
