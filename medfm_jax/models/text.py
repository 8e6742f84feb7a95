"""Text transformer for image-text objectives (CLIP / SigLIP / BiomedCLIP-like text towers).

``tokens [b, L]`` (int32, padded with ``pad_id``) -> token embedding + learned position embedding
-> the ViT's pre-LN :class:`~medfm_jax.models.vit.Encoder` (causal or bidirectional, padding keys
masked out, unrolled or scanned, remat) -> final LayerNorm -> one pooled vector per text.

BERT layout (``post_ln=True``, with ``embed_norm=True``; PubMedBERT, BiomedCLIP's text tower):
LayerNorm on the embeddings, post-LN blocks (the LayerNorm after each residual sum), no final
LayerNorm; ``pooler=True`` adds BERT's pooler (``tanh(dense(pooled))``).

Pooling (``pooling``):
  argmax  the position of the largest token id (OpenAI CLIP: the EOT token has the largest id)
  eot     the first position holding ``eot_id``
  cls     position 0 (BERT's [CLS])
  last    the last position (SigLIP, whose texts are padded to the full context)
  mean    the mean over non-padding positions

Variants (:data:`VARIANTS`): ``clip_b16`` (OpenAI CLIP B/16 text tower: width 512, 12 layers,
8 heads, context 77, vocab 49408, causal, EOT pooling, QuickGELU, LN eps 1e-5) and
``biomedclip`` (BERT-base-like as BiomedCLIP's PubMedBERT: 768, 12, 12, context 256, vocab 30522,
bidirectional, cls pooling; ``configs/clip.py:biomedclip_b16`` builds it in the BERT layout).
``tiny`` is the CPU demo / test size.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfm_jax.models import layers
from medfm_jax.models import vit
from medfm_jax.models.layers import constrain
from medfm_jax.models.vit import Encoder

POOLINGS = ("argmax", "eot", "cls", "last", "mean")


@dataclasses.dataclass(frozen=True)
class TextSize:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  context_length: int
  vocab_size: int
  causal: bool
  pooling: str
  activation: str
  layer_norm_eps: float


VARIANTS = {
    "tiny": TextSize(64, 2, 4, 256, 64, 259, True, "eot", "gelu", 1e-5),
    "clip_b16": TextSize(512, 12, 8, 2048, 77, 49408, True, "argmax", "quick_gelu", 1e-5),
    "biomedclip": TextSize(768, 12, 12, 3072, 256, 30522, False, "cls", "gelu", 1e-12),
    # FLAVA's text encoder (HF facebook/flava-full: BERT vocab, 512 positions; pre-LN blocks with
    # a LayerNorm on the embeddings: build it with embed_norm=True / model.text.embed_norm).
    "flava": TextSize(768, 12, 12, 3072, 512, 30522, False, "cls", "gelu", 1e-12),
}


def pool_tokens(x: jnp.ndarray, tokens: jnp.ndarray, pooling: str, eot_id: int,
                pad_id: int, attention_mask=None) -> jnp.ndarray:
  """``x [b, L, d]`` -> ``[b, d]`` by ``pooling`` (see the module docstring); 'mean' averages the
  positions ``attention_mask [b, L]`` keeps (default: ``tokens != pad_id``)."""
  b, length = tokens.shape
  if pooling == "mean":
    keep = (tokens != pad_id) if attention_mask is None else attention_mask.astype(bool)
    keep = keep.astype(x.dtype)[..., None]
    return (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1)
  if pooling == "cls":
    return x[:, 0]
  if pooling == "last":
    return x[:, -1]
  if pooling == "argmax":
    ids = jnp.argmax(tokens, axis=-1)
  elif pooling == "eot":
    ids = jnp.argmax(tokens == eot_id, axis=-1)     # first EOT (0 if none)
  else:
    raise ValueError(f"model.text.pooling={pooling!r}: allowed {POOLINGS}")
  return layers.gather_tokens(x, ids[:, None].astype(jnp.int32))[:, 0]


class TextTransformer(nn.Module):
  """``tokens [b, L]`` -> pooled features ``[b, width]`` (after the final LN); with
  ``return_tokens`` also the token features ``[b, L, width]``."""
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  context_length: int = 77
  vocab_size: int = 49408
  causal: bool = True
  pooling: str = "argmax"
  eot_id: int = 49407
  pad_id: int = 0
  mask_padding: bool = True            # padding keys are not attended to
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention_impl: str | None = None
  embed_norm: bool = False             # LayerNorm after token + position embedding (BERT / FLAVA)
  post_ln: bool = False                # post-LN blocks and no final LayerNorm (BERT)
  pooler: bool = False                 # BERT's pooler on the pooled vector: tanh(dense(x))

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True, return_tokens: bool = False,
               return_pre_norm: bool = False, attention_mask=None):
    """``return_pre_norm``: ``(pooled, tokens, pre_norm_tokens)`` with the last block's output
    before the final LN (FLAVA feeds those to its fusion encoder; with ``post_ln`` the same as the
    tokens). ``attention_mask [b, L]``
    (nonzero = a real token, as HF's): the padding keys; without it, ``mask_padding`` masks
    ``tokens == pad_id`` (our tokenizers' dedicated pad id) and otherwise nothing is masked."""
    if self.pooling not in POOLINGS:
      raise ValueError(f"model.text.pooling={self.pooling!r}: allowed {POOLINGS}")
    b, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"tokens have length {length} > model.text.context_length={self.context_length}")
    embed = layers.param_with_axes(self, "token_embed", nn.initializers.normal(0.02),
                                   (self.vocab_size, self.width), ("vocab", "embed"))
    pos = layers.param_with_axes(self, "pos_embed", nn.initializers.normal(0.01),
                                 (self.context_length, self.width), (None, "embed"))
    x = jnp.take(embed, tokens, axis=0) + pos[None, :length]
    x = constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"))
    if self.embed_norm:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="embed_norm")(x)
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]
    else:
      mask = (tokens != self.pad_id)[:, None, None, :] if self.mask_padding else None
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.layer_norm_eps,
                activation=self.activation, dtype=self.dtype, remat=self.remat, scan=self.scan,
                attention_impl=self.attention_impl, causal=self.causal, post_ln=self.post_ln,
                name="encoder")(x, deterministic, mask)
    pre_norm = x
    if not self.post_ln:
      x = layers.LayerNorm(self.layer_norm_eps, self.dtype, name="norm")(x)
    pooled = pool_tokens(x, tokens, self.pooling, self.eot_id, self.pad_id, attention_mask)
    if self.pooler:
      pooled = jnp.tanh(layers.DenseGeneral((self.width,), ("embed", "mlp"), dtype=self.dtype,
                                            name="pooler")(pooled))
    if return_pre_norm:
      return pooled, x, pre_norm
    return (pooled, x) if return_tokens else pooled


TEXT_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "context_length", "vocab_size", "causal",
               "pooling", "activation", "layer_norm_eps")


def text_size(text_cfg) -> TextSize:
  """``model.text.variant``'s sizes with every field of ``model.text`` that is set (not None)."""
  variant = text_cfg.get("variant", "tiny")
  if variant not in VARIANTS:
    raise ValueError(f"model.text.variant={variant!r}: allowed {sorted(VARIANTS)}")
  overrides = {k: text_cfg[k] for k in TEXT_FIELDS if k in text_cfg and text_cfg[k] is not None}
  return dataclasses.replace(VARIANTS[variant], **overrides)


def text_from_config(config, eot_id: int, pad_id: int) -> TextTransformer:
  """The text tower of ``config.model.text`` (ids of the configured tokenizer) in ``config.dtype``."""
  t = config.model.text
  s = text_size(t)
  dtype = vit.COMPUTE_DTYPES[config.dtype]
  return TextTransformer(
      width=s.width, depth=s.depth, num_heads=s.num_heads, mlp_dim=s.mlp_dim,
      context_length=s.context_length, vocab_size=s.vocab_size, causal=s.causal,
      pooling=s.pooling, eot_id=eot_id, pad_id=pad_id, mask_padding=t.get("mask_padding", True),
      activation=s.activation, layer_norm_eps=s.layer_norm_eps, dtype=dtype,
      remat=config.model.get("remat", "none"), scan=config.model.get("scan", False),
      attention_impl=vit.resolve_attention_impl(config.model.get("attention_impl", "auto"), dtype),
      embed_norm=t.get("embed_norm", False), post_ln=t.get("post_ln", False),
      pooler=t.get("pooler", False))
