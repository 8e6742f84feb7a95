"""SAM mask decoder: a two-way transformer between prompt tokens and image embeddings, an IoU token
plus ``num_multimask_outputs + 1`` mask tokens, transposed-convolution upscaling, per-token
hypernetwork MLPs and an IoU prediction head.

Each two-way block: token self-attention, token -> image cross-attention, token MLP (ReLU), image ->
token cross-attention, each followed by a residual add and a post-LayerNorm; prompt and image
positional encodings are re-added to queries and keys before every attention (the first block's
self-attention skips them). Cross-attention projects to ``C / attention_downsample_rate`` channels
("downsampled" attention). A final token -> image attention and LayerNorm (eps 1e-5) close it.

Every attention has per-head 3-D kernels (``[embed, heads, kv]``, out ``[heads, kv, embed]``) and
calls ``jax.nn.dot_product_attention``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfm_jax.models import layers
from medfm_jax.models.layers import constrain


class SamAttention(nn.Module):
  """Attention from ``q [B, T, C]`` to ``k, v [B, S, C]`` in ``C / downsample_rate`` inner channels."""
  num_heads: int
  downsample_rate: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    c = q.shape[-1]
    inner = c // self.downsample_rate
    if c % self.downsample_rate or inner % self.num_heads:
      raise ValueError(f"mask decoder width {c} / downsample {self.downsample_rate} is not divisible "
                       f"by num_heads {self.num_heads}")
    head_dim = inner // self.num_heads
    proj = lambda x, name: constrain(
        layers.DenseGeneral((self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name)(x),
        ("batch", "seq", "act_heads", "act_kv"))
    out = jax.nn.dot_product_attention(proj(q, "query"), proj(k, "key"), proj(v, "value"))
    out = constrain(out, ("batch", "seq", "act_heads", "act_kv"))
    y = layers.DenseGeneral((c,), ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype, name="out")(out)
    return constrain(y, ("batch", "seq", "act_embed"))


class TwoWayBlock(nn.Module):
  """One two-way block on ``queries [B, T, C]`` (prompt tokens) and ``keys [B, S, C]`` (image)."""
  num_heads: int
  mlp_dim: int
  downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    ln = lambda name: layers.LayerNorm(self.layer_norm_eps, self.dtype, name=name)
    attn = lambda name, rate: SamAttention(self.num_heads, rate, self.dtype, name=name)
    if self.skip_first_layer_pe:
      queries = attn("self_attn", 1)(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + attn("self_attn", 1)(q, q, queries)
    queries = ln("norm1")(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = ln("norm2")(queries + attn("cross_attn_token_to_image", self.downsample_rate)(q, k, keys))
    queries = ln("norm3")(queries + layers.Mlp(self.mlp_dim, "relu", dtype=self.dtype, name="mlp")(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = ln("norm4")(keys + attn("cross_attn_image_to_token", self.downsample_rate)(k, q, queries))
    return queries, keys


class TwoWayTransformer(nn.Module):
  """``(image [B, S, C], image_pe [B | 1, S, C], tokens [B, T, C])`` -> ``(tokens, image)``."""
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  downsample_rate: int = 2
  layer_norm_eps: float = 1e-5          # block norms (SAM 1e-5; HF SamModel 1e-6)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, image_pe, tokens):
    queries, keys = tokens, image
    for i in range(self.depth):
      queries, keys = TwoWayBlock(self.num_heads, self.mlp_dim, self.downsample_rate, i == 0,
                                  self.layer_norm_eps, self.dtype, name=f"layer_{i}")(queries, keys, tokens, image_pe)
    q, k = queries + tokens, keys + image_pe
    queries = queries + SamAttention(self.num_heads, self.downsample_rate, self.dtype,
                                     name="final_attn_token_to_image")(q, k, keys)
    return layers.LayerNorm(1e-5, self.dtype, name="norm_final")(queries), keys


class Mlp(nn.Module):
  """``num_layers`` dense layers (``layer_0 ...``) with ReLU between them."""
  hidden_dim: int
  out_dim: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = layers.DenseGeneral((self.out_dim if last else self.hidden_dim,), ("embed", "mlp" if not last else None),
                              dtype=self.dtype, name=f"layer_{i}")(x)
      x = x if last else jax.nn.relu(x)
    return x


class ConvTranspose2x2(nn.Module):
  """Stride-2, kernel-2 transposed convolution on NHWC (each input cell writes its own 2x2 block);
  kernel ``[2, 2, in, out]``."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = layers.param_with_axes(self, "kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features),
                                    (None, None, "embed", None))
    bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), (None,))
    y = jnp.einsum("byxc,pqco->bypxqo", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class SamMaskDecoder(nn.Module):
  """``(image_embeddings [B, h, w, C], image_pe [h, w, C], sparse [B, M, T, C], dense [B, M | 1, h, w, C])``
  -> ``(mask logits [B, M, K, 4h, 4w], iou [B, M, K])``; ``K = num_multimask_outputs`` with
  ``multimask_output`` True (mask tokens 1..), 1 with False (mask token 0), and all
  ``num_multimask_outputs + 1`` with None (training picks per example)."""
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool | None = True):
    b, h, w, c = image_embeddings.shape
    m = sparse.shape[1]
    n_masks = self.num_multimask_outputs + 1
    init = nn.initializers.normal(1.0)
    iou_token = layers.param_with_axes(self, "iou_token", init, (1, c), (None, "embed"))
    mask_tokens = layers.param_with_axes(self, "mask_tokens", init, (n_masks, c), (None, "embed"))
    out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(self.dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b, m, 1 + n_masks, c)), sparse.astype(self.dtype)],
                             axis=2).reshape(b * m, -1, c)
    src = image_embeddings.astype(self.dtype)[:, None] + dense.astype(self.dtype)
    src = jnp.broadcast_to(src, (b, m, h, w, c)).reshape(b * m, h * w, c)
    src = constrain(src, ("batch", "seq", "act_embed"))
    pos = image_pe.astype(self.dtype).reshape(1, h * w, c)
    hs, src = TwoWayTransformer(self.depth, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                                self.layer_norm_eps, self.dtype, name="transformer")(src, pos, tokens)
    iou_out, mask_out = hs[:, 0], hs[:, 1:1 + n_masks]
    x = ConvTranspose2x2(c // 4, self.dtype, name="upscale_conv1")(src.reshape(b * m, h, w, c))
    x = layers.exact_gelu(layers.LayerNorm(1e-6, self.dtype, name="upscale_norm")(x))
    x = layers.exact_gelu(ConvTranspose2x2(c // 8, self.dtype, name="upscale_conv2")(x))
    hyper = jnp.stack([Mlp(c, c // 8, 3, self.dtype, name=f"hyper_{i}")(mask_out[:, i]) for i in range(n_masks)],
                      axis=1)                                      # [B*M, K+1, C/8]
    masks = jnp.einsum("bkc,byxc->bkyx", hyper, x).reshape(b, m, n_masks, 4 * h, 4 * w)
    iou = Mlp(self.iou_head_hidden_dim, n_masks, self.iou_head_depth, self.dtype,
              name="iou_head")(iou_out).reshape(b, m, n_masks)
    sel = slice(None) if multimask_output is None else slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, :, sel].astype(jnp.float32), iou[:, :, sel].astype(jnp.float32)
