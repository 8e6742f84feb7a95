"""Two-tower image-text model (CLIP / SigLIP / BiomedCLIP-like) and SigLIP's attention-pooling head.

``ImageTextModel``: image tower (our ViT) pooled by its cls token (CLIP) or by a multi-head
attention-pooling head (``MapHead``, SigLIP), projected to ``embed_dim``; text tower
(``text.TextTransformer``) pooled per its own rule, projected to ``embed_dim``; learnable
``logit_scale`` (and SigLIP's ``logit_bias``). Embeddings come out unnormalised; the losses
normalise them. ``image_proj=False`` / ``text_proj_bias=True`` reproduce SigLIP's heads (no image
projection: the pooled width is the embedding; text head with bias). ``text_proj``: 'linear' (CLIP),
'mlp' (open_clip's HF text towers, BiomedCLIP: ``fc2(gelu(fc1(x)))`` without biases, hidden width
``(text width + embed_dim) // 2``) or 'none' (the pooled text width is the embedding).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfm_jax.models import layers, vit
from medfm_jax.models.layers import DenseGeneral, LayerNorm, Mlp, constrain

IMAGE_POOLS = ("cls", "map")
TEXT_PROJS = ("linear", "mlp", "none")


class MlpProjection(nn.Module):
  """open_clip's 'mlp' projection of HF text towers: ``fc2(gelu(fc1(x)))``, no biases, hidden
  width ``(in + out) // 2``."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = (x.shape[-1] + self.features) // 2
    h = DenseGeneral((hidden,), ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="fc1")(x)
    return DenseGeneral((self.features,), ("mlp", "embed"), use_bias=False, dtype=self.dtype,
                        name="fc2")(layers.exact_gelu(h))


class MapHead(nn.Module):
  """Multi-head attention pooling (SigLIP / big_vision ``MAPHead``): a learned probe attends over
  the tokens, then ``y + mlp(ln(y))``; ``[b, n, d] -> [b, d]``."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  activation: str = "gelu_tanh"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    head_dim = d // self.num_heads
    probe = layers.param_with_axes(self, "probe", nn.initializers.xavier_uniform(), (1, 1, d),
                                   (None, None, "embed"))
    proj = lambda name, y: DenseGeneral((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                        dtype=self.dtype, name=name)(y)
    q = proj("query", jnp.broadcast_to(probe, (b, 1, d)).astype(self.dtype))
    k, v = proj("key", x), proj("value", x)
    out = jax.nn.dot_product_attention(q, k, v)                          # [b, 1, heads, kv]
    y = DenseGeneral((d,), ("heads", "kv", "embed"), contract_dims=2, dtype=self.dtype,
                     name="out")(out)
    y = y + Mlp(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(
        LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(y))
    return y[:, 0]


class ImageTextModel(nn.Module):
  """``(images, tokens) -> (image_emb [b, e], text_emb [b, e])``; see the module docstring."""
  image: vit.VisionTransformer
  text: text.TextTransformer
  embed_dim: int
  image_pool: str = "cls"              # 'cls' | 'map'
  image_proj: bool = True              # False: the pooled image width is the embedding (SigLIP)
  text_proj_bias: bool = False
  text_proj: str = "linear"            # 'linear' | 'mlp' | 'none'
  init_logit_scale: float = 2.6592600369644043     # ln(1/0.07)
  init_logit_bias: float | None = None             # SigLIP: -10

  def setup(self):
    if self.image_pool not in IMAGE_POOLS:
      raise ValueError(f"model.image_pool={self.image_pool!r}: allowed {IMAGE_POOLS}")
    size = self.image.size
    if self.image_pool == "map":
      self.map_head = MapHead(size.num_heads, size.mlp_dim, self.image.layer_norm_eps,
                              self.image.activation, self.image.dtype)
    if self.image_proj:
      self.image_projection = DenseGeneral((self.embed_dim,), ("embed", "mlp"), use_bias=False,
                                           dtype=self.image.dtype)
    elif size.width != self.embed_dim:
      raise ValueError(f"model.embed_dim={self.embed_dim}: without an image projection it must "
                       f"equal the image width {size.width}")
    if self.text_proj not in TEXT_PROJS:
      raise ValueError(f"model.text_proj={self.text_proj!r}: allowed {TEXT_PROJS}")
    if self.text_proj == "linear":
      self.text_projection = DenseGeneral((self.embed_dim,), ("embed", "mlp"),
                                          use_bias=self.text_proj_bias, dtype=self.text.dtype)
    elif self.text_proj == "mlp":
      self.text_projection = MlpProjection(self.embed_dim, self.text.dtype)
    elif self.text.width != self.embed_dim:
      raise ValueError(f"model.embed_dim={self.embed_dim}: with model.text_proj='none' it must "
                       f"equal the text width {self.text.width}")
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale),
                                  (), jnp.float32)
    if self.init_logit_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_logit_bias),
                                   (), jnp.float32)

  def encode_image(self, images, deterministic: bool = True):
    tokens = self.image(images, deterministic=deterministic)
    pooled = self.map_head(tokens) if self.image_pool == "map" else tokens[:, 0]
    out = self.image_projection(pooled) if self.image_proj else pooled
    return constrain(out.astype(jnp.float32), ("batch", None))

  def encode_text(self, tokens, deterministic: bool = True, attention_mask=None):
    """``attention_mask [b, L]`` (nonzero = real token): see ``text.TextTransformer``."""
    out = self.text(tokens, deterministic=deterministic, attention_mask=attention_mask)
    out = out if self.text_proj == "none" else self.text_projection(out)
    return constrain(out.astype(jnp.float32), ("batch", None))

  def __call__(self, images, tokens, deterministic: bool = True, attention_mask=None):
    return (self.encode_image(images, deterministic),
            self.encode_text(tokens, deterministic, attention_mask))
